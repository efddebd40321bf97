"""Times a peer's FixMatch training step, its own data pipeline included: gpu_check.py's part 5 ("peers").

    python benchmarks/peers_harness.py kekmodel --peers-dir benchmarks/peers --data-dir DATA --workers 4 --out r.json
    python benchmarks/peers_harness.py usb --peers-dir benchmarks/peers --data-dir DATA --workers 4 --out r.json

The peers' code is timed, not copied into this project: it lives in a folder that git ignores (benchmarks/README.md,
"Peers", says how to put it there) and is imported from there.
- kekmodel: github.com/kekmodel/FixMatch-pytorch, in <peers-dir>/kekmodel. Its datasets, transforms (per-image
  Pillow RandAugment in DataLoader workers), WideResNet, optimizer, schedule and EMA, built as its train.py
  builds them, and its training loop's body: batches from its two DataLoaders, the interleaved forward pass, the
  losses, backward, SGD step, scheduler step, EMA update, and the .item() calls it makes every step.
- usb: the `semilearn` package (USB, github.com/microsoft/Semi-supervised-learning), installed into
  <peers-dir>/usb. Its FixMatch object, built as its train.py builds it (single GPU, no DDP), and its own
  AlgorithmBase.train() loop with all its hooks; a hook of ours only reads the clock.
Both read CIFAR-10 through torchvision.datasets.CIFAR10, whose constructor checks torchvision's md5 sums (they fail
on a re-encoded or re-pickled copy such as ours) and downloads when they fail (no network on a GPU machine). The
harness replaces that class by a subclass whose constructor takes the arrays from common.load_cifar10 instead;
everything after the constructor (indexing, PIL conversion, the peers' transforms) is torchvision's and the peers'.
Modules that the peers import but whose code paths FixMatch on CIFAR-10 never runs (OPTIONAL below: tensorboard,
tqdm, transformers, torchaudio, scikit-image, wandb, aim, timm, scikit-learn) are stood in for by empty modules,
only when they are not installed; the result lists every stand-in used.

Writes one JSON object: steps/s and images/s of the timed steps (after warm-up), the seconds per step spent waiting
for the DataLoader, the precision, the stand-ins and notes.
"""

import argparse
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import sys
import time
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

# What each peer imports without using it for FixMatch on CIFAR-10: tensorboard (torch's SummaryWriter), tqdm
# (progress bars), and USB's text, audio, medical-image, ViT, experiment-tracking and metrics dependencies.
OPTIONAL = {"kekmodel": ["tensorboard", "tqdm"],
            "usb": ["tensorboard", "tqdm", "transformers", "torchaudio", "skimage", "wandb", "aim", "timm", "sklearn"]}
STOOD_IN: list[str] = []
# The names the peers import from modules that may have to be stood in for by sys.modules entries.
USED_NAMES = {"torch.utils.tensorboard": ["SummaryWriter"], "timm.models.layers": ["DropPath", "to_2tuple"],
              "sklearn.metrics": ["accuracy_score", "balanced_accuracy_score", "precision_score", "recall_score",
                                  "f1_score", "confusion_matrix", "top_k_accuracy_score"]}


# ----------------------------------------------------------------------------------------------------
# Stand-ins for modules the timed code paths never use
# ----------------------------------------------------------------------------------------------------
class _Unused:
    """What any attribute of a stand-in module is: importable, and an error only if something uses it."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} is a stand-in (its module is absent or failed to import) and was used")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unused(f"{self.name}.{attr}")

    def __mro_entries__(self, bases):
        return (object,)  # `class X(stand_in.Base)` still defines X


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: reached only for modules that no real finder found, and only for `names`."""

    def __init__(self, names: list[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.names:
            return None
        if fullname.split(".")[0] not in STOOD_IN:
            STOOD_IN.append(fullname.split(".")[0])
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _Unused(spec.name).__getattr__  # `from x import Name` gets a stand-in Name
        return module

    def exec_module(self, module):
        pass


def install_stand_ins(peer: str) -> None:
    import torch._dynamo  # noqa: F401  (it probes for optional libraries at import: let it see only real ones)

    sys.meta_path.append(_StandInFinder(OPTIONAL[peer]))
    # Installed but failing modules: torch's SummaryWriter raises ImportError without tensorboard (both peers import
    # it); USB's ViT imports timm.models.layers, a module newer timm releases may drop (the GPU machines have timm).
    for name in ["torch.utils.tensorboard"] + (["timm.models.layers", "sklearn.metrics"] if peer == "usb" else []):
        try:
            importlib.import_module(name)
        except Exception:  # any failure: the timed code paths only import it
            sys.modules[name] = types.SimpleNamespace(**{attr: _Unused(f"{name}.{attr}") for attr in USED_NAMES[name]})
            STOOD_IN.append(name)


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 without torchvision's md5 check
# ----------------------------------------------------------------------------------------------------
def patch_cifar10(data_dir: str) -> None:
    """torchvision.datasets.CIFAR10 becomes a subclass whose constructor reads `data_dir` with common.py's reader
    (the same pixels and labels: HWC uint8 arrays and a list of ints, as torchvision's own constructor leaves)."""
    import torchvision.datasets

    arrays = common.load_cifar10(data_dir, download=False)
    original = torchvision.datasets.CIFAR10

    class CIFAR10FromArrays(original):
        def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
            torchvision.datasets.VisionDataset.__init__(self, root, transform=transform,
                                                        target_transform=target_transform)
            self.train = train
            x, y = (arrays["train_x"], arrays["train_y"]) if train else (arrays["test_x"], arrays["test_y"])
            self.data = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
            self.targets = y.tolist()
            self.classes = [str(c) for c in range(10)]

    torchvision.datasets.CIFAR10 = CIFAR10FromArrays


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# kekmodel/FixMatch-pytorch
# ----------------------------------------------------------------------------------------------------
def time_kekmodel(a: argparse.Namespace, device: torch.device) -> dict:
    """kekmodel's train.py: its data, model, optimizer, schedule and EMA, then its loop body, timed."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, RandomSampler

    sys.path.insert(0, os.path.join(a.peers_dir, "kekmodel"))
    import train as kek  # its train.py: interleave, de_interleave, the cosine schedule
    from dataset.cifar import DATASET_GETTERS
    from models.ema import ModelEMA
    from models.wideresnet import build_wideresnet

    # train.py's defaults, with --expand-labels as in its README's CIFAR-10 commands.
    args = argparse.Namespace(num_labeled=a.n_labeled, num_classes=10, expand_labels=True, batch_size=a.batch_size,
                              eval_step=1024, mu=a.mu, device=device, lr=0.03, wdecay=5e-4, nesterov=True,
                              ema_decay=0.999, T=1.0, threshold=0.95, lambda_u=1.0, total_steps=2 ** 20, warmup=0)
    np.random.seed(0)
    torch.manual_seed(0)
    labeled, unlabeled, _ = DATASET_GETTERS["cifar10"](args, "./data")
    labeled_loader = DataLoader(labeled, sampler=RandomSampler(labeled), batch_size=args.batch_size,
                                num_workers=a.workers, drop_last=True)
    unlabeled_loader = DataLoader(unlabeled, sampler=RandomSampler(unlabeled), batch_size=args.batch_size * args.mu,
                                  num_workers=a.workers, drop_last=True)
    model = build_wideresnet(depth=a.depth, widen_factor=a.widen_factor, dropout=0, num_classes=10).to(device)
    no_decay = ["bias", "bn"]
    grouped = [{"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
                "weight_decay": args.wdecay},
               {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
                "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(grouped, lr=args.lr, momentum=0.9, nesterov=args.nesterov)
    scheduler = kek.get_cosine_schedule_with_warmup(optimizer, args.warmup, args.total_steps)
    ema = ModelEMA(args, model, args.ema_decay)
    model.train()
    model.zero_grad()
    iters = {"labeled": iter(labeled_loader), "unlabeled": iter(unlabeled_loader)}

    def batch(name, loader):
        # train.py calls iterator.next(), which DataLoader iterators no longer have (its comments say so), inside
        # a bare except that starts a new epoch: next() with StopIteration is what that code means.
        try:
            return next(iters[name])
        except StopIteration:
            iters[name] = iter(loader)
            return next(iters[name])

    def step() -> float:
        """One iteration of train.py's loop body; returns the seconds spent waiting for the two batches."""
        start = time.perf_counter()
        inputs_x, targets_x = batch("labeled", labeled_loader)
        (inputs_u_w, inputs_u_s), _ = batch("unlabeled", unlabeled_loader)
        waited = time.perf_counter() - start
        batch_size = inputs_x.shape[0]
        inputs = kek.interleave(torch.cat((inputs_x, inputs_u_w, inputs_u_s)), 2 * args.mu + 1).to(device)
        targets_x = targets_x.to(device)
        logits = kek.de_interleave(model(inputs), 2 * args.mu + 1)
        logits_x = logits[:batch_size]
        logits_u_w, logits_u_s = logits[batch_size:].chunk(2)
        del logits
        loss_x = F.cross_entropy(logits_x, targets_x, reduction="mean")
        pseudo_label = torch.softmax(logits_u_w.detach() / args.T, dim=-1)
        max_probs, targets_u = torch.max(pseudo_label, dim=-1)
        mask = max_probs.ge(args.threshold).float()
        loss_u = (F.cross_entropy(logits_u_s, targets_u, reduction="none") * mask).mean()
        loss = loss_x + args.lambda_u * loss_u
        loss.backward()
        loss.item(), loss_x.item(), loss_u.item()  # its AverageMeters read these every step: host syncs
        optimizer.step()
        scheduler.step()
        ema.update(model)
        model.zero_grad()
        mask.mean().item()
        return waited

    result = timed_loop(step, a, device)
    result.update(precision="fp32 (its --amp needs NVIDIA apex, which is not installed; it has no bf16 option)",
                  notes=["DataLoader iterators are advanced with next() (train.py's .next() fails on current "
                         "PyTorch)", "timed steps exclude the start of a new unlabeled epoch (every "
                         f"{len(unlabeled) // (args.batch_size * args.mu)} steps), which restarts its workers"])
    return result


# ----------------------------------------------------------------------------------------------------
# USB (semilearn)
# ----------------------------------------------------------------------------------------------------
class _StopTiming(Exception):
    pass


def time_usb(a: argparse.Namespace, device: torch.device, work: str) -> dict:
    """USB's FixMatch: its config for CIFAR-10 (classic_cv fixmatch_cifar10_*.yaml) on one GPU, its train() loop."""
    site = os.path.join(a.peers_dir, "usb")
    sys.path.insert(0, site)
    # USB caches its labeled split in <site>/data/ and reuses it by label count and seed alone: a cache left by the
    # CPU rehearsal's synthetic data must not stand in for the real data's split.
    shutil.rmtree(os.path.join(site, "data"), ignore_errors=True)
    import semilearn
    from semilearn.core.hooks import Hook

    total = a.warmup + a.steps + 2  # train() evaluates in its last step: the clock stops the loop before it
    config = {"algorithm": "fixmatch", "net": "wrn_28_2", "dataset": "cifar10", "num_classes": 10,
              "num_labels": a.n_labeled, "batch_size": a.batch_size, "uratio": a.mu, "eval_batch_size": 256,
              "epoch": 1, "num_train_iter": total, "num_eval_iter": 10 ** 9, "num_log_iter": 10 ** 9,
              "hard_label": True, "T": 0.5, "p_cutoff": 0.95, "ulb_loss_ratio": 1.0, "ema_m": 0.999,
              "crop_ratio": 0.875, "img_size": 32, "optim": "SGD", "lr": 0.03, "momentum": 0.9,
              "weight_decay": 5e-4, "layer_decay": 1.0, "amp": device.type == "cuda", "clip_grad": 0.0,
              "use_cat": True, "data_dir": os.path.join(work, "data"), "train_sampler": "RandomSampler",
              "num_workers": a.workers, "seed": 0, "save_dir": work, "save_name": "usb_fixmatch", "resume": False,
              "gpu": 0 if device.type == "cuda" else None, "distributed": False, "multiprocessing_distributed": False,
              "world_size": 1, "rank": 0}
    args = semilearn.get_config(config)
    args.distributed = False
    torch.manual_seed(0)
    np.random.seed(0)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, True  # as its train.py sets them
    net_builder = semilearn.get_net_builder(args.net, False)
    if (a.depth, a.widen_factor) != (28, 2):  # the CPU rehearsal's small network, USB's own WideResNet class
        from semilearn.nets.wrn.wrn import WideResNet

        def net_builder(num_classes, pretrained=False, pretrained_path=None):
            return WideResNet(first_stride=1, depth=a.depth, widen_factor=a.widen_factor, num_classes=num_classes)
    alg = semilearn.get_algorithm(args, net_builder, tb_log=None, logger=None)
    alg.model, alg.ema_model = alg.model.to(device), alg.ema_model.to(device)  # its send_model_cuda without DDP
    notes = ["one GPU without DDP (its configs set multiprocessing_distributed, which wraps the model in DDP "
             "with SyncBatchNorm even on one GPU)", f"num_workers {a.workers}: {a.workers} for the labeled loader "
             f"and {2 * a.workers} for the unlabeled one (its configs: 1)"]
    if device.type != "cuda":  # the CPU rehearsal only: USB's code calls .cuda() and records CUDA events
        alg.process_batch = lambda input_args=None, **kw: {
            k: v.to(device) for k, v in kw.items() if k in ("x_lb", "y_lb", "x_ulb_w", "x_ulb_s")}
        alg._hooks = [h for h in alg._hooks if h.name != "TimerHook"]  # register_hook rebuilds hooks_dict from it
        alg.hooks_dict.pop("TimerHook")
        notes.append("CPU rehearsal: batches moved with .to() and USB's CUDA-event TimerHook removed")

    stamps, waits = [], []

    class Clock(Hook):
        def after_train_step(self, algorithm):
            synchronize(device)
            stamps.append(time.perf_counter())
            waits.append(algorithm.log_dict.get("train/prefetch_time", float("nan")))
            if len(stamps) == a.warmup + a.steps + 1 or (
                    len(stamps) > a.warmup + 1 and stamps[-1] - stamps[a.warmup] > a.max_s):
                raise _StopTiming

    alg.register_hook(Clock(), None, "LOWEST")
    try:
        alg.train()
    except _StopTiming:
        pass
    timed = len(stamps) - 1 - a.warmup
    seconds = stamps[-1] - stamps[a.warmup]
    images = a.batch_size * (1 + 2 * a.mu)
    return {"steps": timed, "seconds": seconds, "steps_per_s": timed / seconds, "img_per_s": images * timed / seconds,
            "wait_s_per_step": float(np.nanmean(waits[a.warmup + 1:])) if device.type == "cuda" else None,
            "precision": "fp16 autocast + GradScaler (its amp option; it has no bf16 option)"
            if device.type == "cuda" else "fp32 (CPU)", "notes": notes}


# ----------------------------------------------------------------------------------------------------
# Timing and the command line
# ----------------------------------------------------------------------------------------------------
def timed_loop(step, a: argparse.Namespace, device: torch.device) -> dict:
    """a.warmup untimed steps, then up to a.steps timed ones, stopping early after a.max_s seconds."""
    for _ in range(a.warmup):
        step()
    synchronize(device)
    start, waited, steps = time.perf_counter(), 0.0, 0
    while steps < a.steps and (steps == 0 or time.perf_counter() - start < a.max_s):
        waited += step()
        steps += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    images = a.batch_size * (1 + 2 * a.mu)
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds, "img_per_s": images * steps / seconds,
            "wait_s_per_step": waited / steps}


def peer_code_path(peers_dir: str, peer: str) -> str:
    """The file whose presence says the peer's code is there."""
    return os.path.join(peers_dir, *{"kekmodel": ["kekmodel", "train.py"],
                                     "usb": ["usb", "semilearn", "__init__.py"]}[peer])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("peer", choices=["kekmodel", "usb"])
    p.add_argument("--peers-dir", default=os.path.join(ROOT, "benchmarks", "peers"), help="where the peers' code is")
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--out", required=True, help="JSON file for the result")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--widen-factor", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--n-labeled", type=int, default=1020, help="a multiple of 10: both peers' splits need one")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (USB: twice as many for unlabeled)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (worker start-up, cuDNN's choices)")
    p.add_argument("--steps", type=int, default=30, help="timed steps at most")
    p.add_argument("--max-s", type=float, default=10.0, help="stop timing after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    a = p.parse_args()
    a.peers_dir, a.out = os.path.abspath(a.peers_dir), os.path.abspath(a.out)  # the harness changes directory
    if a.threads:
        torch.set_num_threads(a.threads)
    if not os.path.isfile(peer_code_path(a.peers_dir, a.peer)):
        print(f"peer code not found at {peer_code_path(a.peers_dir, a.peer)}", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    install_stand_ins(a.peer)
    patch_cifar10(a.data_dir)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="peer_") as work:
        os.chdir(work)  # whatever a peer writes relative to the working directory (logs, ./data) lands here
        result = time_kekmodel(a, device) if a.peer == "kekmodel" else time_usb(a, device, work)
    result.update(peer=a.peer, workers=a.workers, device=str(device), stand_ins=STOOD_IN,
                  sizes={"depth": a.depth, "widen_factor": a.widen_factor, "batch_size": a.batch_size, "mu": a.mu,
                         "n_labeled": a.n_labeled, "warmup": a.warmup})
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
