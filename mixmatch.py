"""MixMatch: A Holistic Approach to Semi-Supervised Learning.
Berthelot et al., NeurIPS 2019, arXiv 1905.02249.

The idea: guess a label for every unlabeled image by averaging the model's predictions over K weakly
augmented views (flip + shift) and sharpening the average, which lowers its entropy. Then MixUp every
labeled and unlabeled example with a random partner drawn from both sets, images and (soft) labels alike,
and train on the mixed examples: cross-entropy on the mixed labeled ones, squared error on the mixed
unlabeled ones. Consistency, entropy minimisation and MixUp in one loss (Section 3, Algorithm 1).

    q_b     = Sharpen(1/K sum_k p(y | weak_k(u_b)), T),   Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T)
    W       = Shuffle(Concat(X^, U^)),  X^ = (weak(x_b), onehot(y_b)),  U^ = ((weak_k(u_b), q_b) for all k)
    X', U'  = MixUp(X^_i, W_i),  MixUp(U^_i, W_(i+|X^|)),   MixUp(a, b) = l' a + (1 - l') b,
              l' = max(l, 1 - l),  l ~ Beta(alpha, alpha) per example, images and targets alike
    L   = L_x + lambda_u * ramp(step) * L_u
    L_x = 1/|X'|      sum_{(x, p) in X'}  H(p, p(y | x))
    L_u = 1/(L |U'|)  sum_{(u, q) in U'}  || q - p(y | u) ||^2          (L = 10 classes)

q_b comes from the model being trained, without gradient. The K + 1 mixed batches go through the network
in K + 1 forward passes of about B images, interleaved so that each pass holds a slice of every batch (see
`forward_interleaved` for why BatchNorm needs this).

Defaults are the paper's CIFAR-10 setting (Sections 3.5 and 4.1, and the reference code,
github.com/google-research/mixmatch): B = 64 labeled and 64 unlabeled images, K = 2, T = 0.5,
alpha = 0.75, lambda_u = 75 ramped up linearly from 0 over the first 16,384 steps (the reference's
1,024 kimg at B = 64), WRN-28-2, evaluation with an EMA (0.999) of the weights, 2^20 steps.
The optimiser is, by default, the shared recipe of all four scripts (fixmatch.py: SGD with Nesterov
momentum 0.9, lr 0.03 with cosine decay, weight decay 5e-4 not on BatchNorm and biases), so that the
algorithms are compared under one recipe. `--optimizer adam` is the MixMatch paper's own: Adam with a
constant lr 0.002 and weight decay applied to the weights after every step, w <- w (1 - 0.02 lr)
(reference mixmatch.py: `wd *= lr`, `v * (1 - wd)`).

    python mixmatch.py --n-labeled 4000                      # the paper's setting on a CUDA GPU
    python mixmatch.py --n-labeled 250 --device cpu --depth 10 --widen-factor 1 --epochs 2 --steps-per-epoch 20
"""

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import NUM_CLASSES, DataError, RandomBatches, WideResNet, labeled_split, load_cifar10, normalize, weak_augment

ALGORITHM = "mixmatch"


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-labeled", type=int, default=4000, help="number of labeled training images (balanced over classes; 250/4000 in the paper)")
    p.add_argument("--batch-size", type=int, default=64, help="labeled batch size B (the unlabeled batch is B images too)")
    p.add_argument("--k", type=int, default=2, help="K: weakly augmented views of each unlabeled image whose predictions are averaged to guess its label")
    p.add_argument("--temperature", type=float, default=0.5, help="sharpening temperature T of the guessed labels")
    p.add_argument("--alpha", type=float, default=0.75, help="MixUp: lambda ~ Beta(alpha, alpha), one per example")
    p.add_argument("--lambda-u", type=float, default=75.0, help="weight of the unlabeled (squared-error) loss once ramped up")
    p.add_argument("--rampup-steps", type=int, default=16384, help="lambda_u ramps up linearly from 0 over this many steps")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="sgd: the shared recipe of all scripts (Nesterov, cosine lr decay); "
                   "adam: the MixMatch paper's (constant lr, weight decay w <- w (1 - wd lr) every step)")
    p.add_argument("--lr", type=float, default=None, help="learning rate; None means 0.03 with --optimizer sgd, 0.002 with adam")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (not on BatchNorm parameters and biases); None means 5e-4 with sgd, 0.02 with adam")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the weight EMA used for evaluation")
    p.add_argument("--epochs", type=int, default=1024, help="number of 'epochs' of --steps-per-epoch steps (2^20 steps in all by default)")
    p.add_argument("--steps-per-epoch", type=int, default=1024, help="steps per epoch; the lr schedule spans epochs * steps-per-epoch")
    p.add_argument("--eval-every", type=int, default=1024, help="evaluate the EMA model on the test set and checkpoint every this many steps")
    p.add_argument("--log-every", type=int, default=256, help="print a progress line every this many steps")
    p.add_argument("--depth", type=int, default=28, help="WideResNet depth (6n+4)")
    p.add_argument("--widen-factor", type=int, default=2, help="WideResNet widen factor")
    p.add_argument("--seed", type=int, default=0, help="seed of the labeled split, the initialisation, the batches and the MixUp draws")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (downloaded there if missing)")
    p.add_argument("--out", default=None, help="run folder (default: runs/mixmatch_n<n-labeled>_seed<seed>)")
    p.add_argument("--overwrite", action="store_true", help="start over in --out even if it holds another run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default="auto", help="bf16 autocast; auto: on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network: forward and backward, any device")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", f"{ALGORITHM}_n{args.n_labeled}_seed{args.seed}")
    if args.lr is None:
        args.lr = {"sgd": 0.03, "adam": 0.002}[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = {"sgd": 5e-4, "adam": 0.02}[args.optimizer]
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible settings with one line (DataError -> exit status 2)."""
    checks = [
        (10 <= args.n_labeled <= 50000, f"--n-labeled must be between 10 and 50000, got {args.n_labeled}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.k >= 1, f"--k must be >= 1, got {args.k}"),
        (args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (args.alpha > 0, f"--alpha must be > 0, got {args.alpha}"),
        (args.lambda_u >= 0, f"--lambda-u must be >= 0, got {args.lambda_u}"),
        (args.rampup_steps >= 0, f"--rampup-steps must be >= 0, got {args.rampup_steps}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (min(args.epochs, args.steps_per_epoch, args.eval_every, args.log_every) >= 1,
         "--epochs, --steps-per-epoch, --eval-every and --log-every must be >= 1"),
        (args.depth >= 10 and (args.depth - 4) % 6 == 0, f"--depth must be 6n+4 (10, 16, 22, 28, ...), got {args.depth}"),
        (args.widen_factor >= 1, f"--widen-factor must be >= 1, got {args.widen_factor}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {args.device} asked for, but CUDA is not available; pass --device cpu")


# ----------------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------------
def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T) over the last dimension (Section 3.2, eq. 7)."""
    p = p ** (1 / temperature)
    return p / p.sum(dim=-1, keepdim=True)


def guess_labels(logits_views: torch.Tensor, temperature: float) -> torch.Tensor:
    """The guessed label q_b = Sharpen(1/K sum_k softmax(logits of view k of u_b), T), from logits [K, B, C];
    without gradient (the reference's tf.stop_gradient)."""
    probs = torch.softmax(logits_views.detach().float(), dim=-1).mean(dim=0)
    return sharpen(probs, temperature)


def sample_mixup(rng: np.random.Generator, n: int, alpha: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp's random draws for n examples: lambda ~ Beta(alpha, alpha) for every example, as the reference
    does (libml/layers.py, MixMode.augment_pair draws a [batch, 1, 1, 1] lambda; the paper's eq. 8 is per
    pair too), and the permutation that shuffles W.

    Drawn on the host from a numpy Generator whose state goes into the checkpoint (torch's Beta sampler
    takes no generator), then sent to the device without a host sync, like the augmentation parameters.
    """
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=n)).float()
    perm = torch.from_numpy(rng.permutation(n))
    if device.type == "cuda":
        return lam.pin_memory().to(device, non_blocking=True), perm.pin_memory().to(device, non_blocking=True)
    return lam, perm


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp of every example i with example perm[i] of the same pool, images and targets alike:
    l' = max(l, 1 - l), x'_i = l'_i x_i + (1 - l'_i) x_perm[i] (Section 3.3, eqs. 8-11).

    l' >= 1/2 keeps each mixed example closer to its own image, so the first |X^| outputs stay "labeled"
    examples and the rest "unlabeled" ones, with their own losses.
    """
    lam = torch.maximum(lam, 1 - lam)
    lam_x = lam.view(-1, *[1] * (x.ndim - 1))
    lam_t = lam.view(-1, *[1] * (targets.ndim - 1))
    return lam_x * x + (1 - lam_x) * x[perm], lam_t * targets + (1 - lam_t) * targets[perm]


def interleave(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """n tensors of the same length -> n batches; batch j holds slice j of every part (slices differ in size
    by at most 1 when n does not divide the length). `deinterleave` undoes it."""
    slices = [part.tensor_split(len(parts)) for part in parts]
    return [torch.cat([s[j] for s in slices]) for j in range(len(parts))]


def deinterleave(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of `interleave`: batch j is n equal slices, slice i of it belongs to part i."""
    slices = [batch.tensor_split(len(batches)) for batch in batches]
    return [torch.cat([s[i] for s in slices]) for i in range(len(batches))]


@contextlib.contextmanager
def frozen_bn_statistics(model: torch.nn.Module):
    """Forward passes inside normalise with their batch's statistics (train mode) but leave BatchNorm's
    running statistics alone: a BatchNorm layer in training mode with track_running_stats off neither
    reads nor updates them. (Restoring saved statistics afterwards would trip autograd's in-place check.)"""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    tracking = [m.track_running_stats for m in bns]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, track in zip(bns, tracking):
            m.track_running_stats = track


def forward_interleaved(model: torch.nn.Module, parts: list[torch.Tensor], amp: bool) -> list[torch.Tensor]:
    """Logits for each part, computed in len(parts) forward passes that each hold a slice of every part.

    Why BatchNorm needs this: the reference sends the mixed labeled batch and the K mixed unlabeled
    batches through the network in separate forward passes of B images, in training mode, so every pass
    is normalised with its own batch statistics; and it keeps the running-statistics update of one pass
    only (the first; the label-guessing passes update nothing). Passed as they are, the labeled pass
    would be normalised with statistics of (mostly) labeled images, the unlabeled passes with statistics
    of unlabeled ones, and the running statistics used at test time would come from the labeled pass
    alone (MixMatch's reference) or from an unlabeled one. The reference's interleave swaps slices between
    the batches so that each pass holds one slice of labeled images and the rest unlabeled, the proportion
    of the whole; ours goes one step further, every pass holds a slice of every part. We keep the
    reference's one pass per part, each of about B images, and its single update of the running statistics.
    """
    batches = interleave(parts)
    with torch.autocast(batches[0].device.type, dtype=torch.bfloat16, enabled=amp):
        logits = [model(batches[0].contiguous(memory_format=torch.channels_last))]
        with frozen_bn_statistics(model):
            logits += [model(batch.contiguous(memory_format=torch.channels_last)) for batch in batches[1:]]
    return deinterleave(logits)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1/N sum_n H(targets_n, softmax(logits_n)) for soft targets [N, C] (L_x, eq. 3)."""
    return F.cross_entropy(logits.float(), targets)


def mixmatch_unlabeled_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_u = 1/(L |U'|) sum ||q - softmax(logits)||^2: the squared error averaged over examples and classes
    (eq. 4; the reference's reduce_mean of the squared difference)."""
    return (torch.softmax(logits.float(), dim=1) - targets).pow(2).mean()


def linear_rampup(step: int, rampup_steps: int) -> float:
    """The factor of lambda_u at (0-based) step: step / rampup_steps, then 1 (Section 4.1; the reference's
    clip(step / warmup, 0, 1))."""
    return min(step / rampup_steps, 1.0) if rampup_steps > 0 else 1.0


# ----------------------------------------------------------------------------------------------------
# Optimisation: the shared recipe (SGD + Nesterov, cosine decay, weight decay off BN/biases, weight EMA),
# or the paper's Adam with a constant lr and decoupled weight decay
# ----------------------------------------------------------------------------------------------------
def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """lr * cos(7 pi k / (16 K)): decays to about 0.2 lr at the end rather than to 0 (FixMatch, Sec. 4)."""
    return base_lr * math.cos(7 * math.pi * step / (16 * total_steps))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]      # conv and linear weights
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BatchNorm scales/shifts and biases
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "adam":
        # The paper's Adam. AdamW's decoupled decay, w <- w (1 - lr wd) every step, is the reference's
        # post-step `v * (1 - wd * lr)` on the conv and dense kernels (applied just before the Adam update
        # instead of just after it: the difference is of order lr^2).
        return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")
    return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, fused=device.type == "cuda")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for the weights; BatchNorm statistics are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    torch._foreach_copy_(list(ema.buffers()), list(model.buffers()))


# ----------------------------------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------------------------------
# Per-step statistics, summed on the device between log points. ramp is the ramp-up factor of lambda_u;
# pseudo_acc is the accuracy of the guessed labels (argmax q) on the unlabeled batch.
STATS = ["loss", "loss_x", "loss_u", "ramp", "pseudo_acc"]


def summarize(stats: torch.Tensor, steps: int) -> dict:
    """Mean statistics since the last log point, read from the device (a host sync: log points only)."""
    return dict(zip(STATS, (stats / steps).tolist()))


def train_step(model, optimizer, x_l, y_l, x_u, y_u, lam, perm, ramp: float, args, amp: bool) -> torch.Tensor:
    """One MixMatch step on the labeled batch x_l [B, ...] and K weak views x_u [K, B, ...] of the unlabeled
    batch, with the MixUp draws lam, perm [(K + 1) B]. Returns the step's statistics as a tensor on the
    device (no host sync); y_u, the true labels of the unlabeled batch, only measure guessed-label accuracy."""
    k, b = x_u.shape[:2]
    # Label guessing: one pass per view in training mode, as the reference, leaving BatchNorm's running
    # statistics alone.
    with (torch.no_grad(), frozen_bn_statistics(model),
          torch.autocast(x_u.device.type, dtype=torch.bfloat16, enabled=amp)):
        logits_u = torch.stack([model(normalize(view).contiguous(memory_format=torch.channels_last)) for view in x_u])
    q = guess_labels(logits_u, args.temperature)
    x = normalize(torch.cat([x_l, x_u.flatten(0, 1)]))  # X^ then U^, view by view
    targets = torch.cat([F.one_hot(y_l, NUM_CLASSES).float(), q.repeat(k, 1)])
    x_mix, targets_mix = mixup(x, targets, lam, perm)
    logits = forward_interleaved(model, list(x_mix.split(b)), amp)
    loss_x = soft_cross_entropy(logits[0], targets_mix[:b])
    loss_u = mixmatch_unlabeled_loss(torch.cat(logits[1:]), targets_mix[b:])
    loss = loss_x + args.lambda_u * ramp * loss_u
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (q.argmax(dim=1) == y_u).float()
    return torch.stack([loss, loss_x, loss_u, torch.full_like(loss, ramp), correct.mean()]).detach()


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, batch_size: int = 1000) -> dict:
    """Top-1, top-5, mean cross-entropy and per-class top-1 of `model` on (x, y), in eval mode."""
    model.eval()
    loss, top1, top5 = 0.0, torch.zeros_like(y, dtype=torch.bool), torch.zeros_like(y, dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i:i + batch_size]).contiguous(memory_format=torch.channels_last)
        with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(xb).float()
        yb = y[i:i + batch_size]
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        top = logits.topk(5, dim=1).indices
        top1[i:i + batch_size] = top[:, 0] == yb
        top5[i:i + batch_size] = (top == yb[:, None]).any(1)
    model.train()
    per_class = [top1[y == c].float().mean().item() for c in range(NUM_CLASSES)]
    return {"top1": top1.float().mean().item(), "top5": top5.float().mean().item(), "loss": loss / len(x),
            "per_class_top1": per_class}


# ----------------------------------------------------------------------------------------------------
# Run folder, checkpoint and resume
# ----------------------------------------------------------------------------------------------------
# Flags that do not change what is computed, or where it runs: a rerun may change them and still resume.
NOT_COMPARED = {"out", "overwrite", "log_every", "compile", "data_dir", "device"}


def prepare_run_dir(args: argparse.Namespace) -> None:
    """Create --out, or check that the run in it was started with the same arguments."""
    path = os.path.join(args.out, "args.json")
    if os.path.exists(path) and not args.overwrite:
        with open(path) as f:
            old = json.load(f)
        new = vars(args)
        diff = [f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                if k not in NOT_COMPARED and old.get(k) != new.get(k)]
        if diff:
            raise DataError(f"{args.out} holds a run with other arguments ({'; '.join(diff)}); "
                            "pass another --out, or --overwrite to start that run over")
    if args.overwrite:
        for name in ("checkpoint.pt", "metrics.jsonl", "results.json"):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(vars(args), f, indent=1)


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_metrics(path: str, up_to_step: int) -> list[dict]:
    """metrics.jsonl lines up to the checkpoint's step (later ones were written after the last checkpoint)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["step"] <= up_to_step]


def format_time(seconds: float) -> str:
    h, m = divmod(int(seconds) // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{int(seconds) % 60:02d}s"


# ----------------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        data = load_cifar10(args.data_dir)
        labeled = labeled_split(data["train_y"], args.n_labeled, args.seed)
        prepare_run_dir(args)  # after the data loaded: a failed start leaves nothing behind
        results_path = os.path.join(args.out, "results.json")
        if os.path.exists(results_path):
            print(f"{args.out} already holds a finished run (results.json); nothing to do")
            return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "labeled_indices.json"), "w") as f:
        json.dump(labeled.tolist(), f)

    device = torch.device(args.device)
    amp = device.type == "cuda" if args.amp == "auto" else args.amp
    torch.backends.cudnn.benchmark = True
    train_x, train_y = data["train_x"].to(device), data["train_y"].to(device)
    test_x, test_y = data["test_x"].to(device), data["test_y"].to(device)

    torch.manual_seed(args.seed)
    model = WideResNet(depth=args.depth, widen_factor=args.widen_factor).to(device, memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model)
    optimizer = make_optimizer(model, args, device)
    forward = torch.compile(model) if args.compile else model
    # Index streams over the labeled subset and over all 50,000 images (the unlabeled set includes the
    # labeled ones, as in the paper); augmentation parameters and MixUp draws come from their own generators.
    labeled_batches = RandomBatches(labeled.to(device), args.batch_size, seed=args.seed)
    unlabeled_batches = RandomBatches(torch.arange(len(train_x), device=device), args.batch_size, seed=args.seed + 1)
    aug_generator = torch.Generator().manual_seed(args.seed + 2)
    mixup_rng = np.random.default_rng(args.seed + 3)

    total_steps = args.epochs * args.steps_per_epoch
    step, elapsed, metrics = 0, 0.0, []
    ckpt_path, metrics_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "metrics.jsonl")
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema_model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        labeled_batches.load_state_dict(ckpt["labeled_batches"])
        unlabeled_batches.load_state_dict(ckpt["unlabeled_batches"])
        aug_generator.set_state(ckpt["aug_generator"])
        mixup_rng.bit_generator.state = ckpt["mixup_rng"]
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        metrics = read_metrics(metrics_path, step)
        with open(metrics_path, "w") as f:  # drop lines written after the checkpoint
            f.writelines(json.dumps(m) + "\n" for m in metrics)
        print(f"resuming {args.out} from step {step}")

    # Images through the network per step: K guessing views (forward only), then the labeled batch and the
    # K views again, mixed (forward and backward).
    images_per_step = args.batch_size * (1 + 2 * args.k)
    print(f"{ALGORITHM}: {args.n_labeled} labels, WRN-{args.depth}-{args.widen_factor}, {total_steps} steps of "
          f"{images_per_step} images on {device}{' (bf16)' if amp else ''}; run folder {args.out}")
    # Statistics are summed on the device over the steps since the last progress line and since the last
    # evaluation; metrics.jsonl gets the latter (per-epoch means with the default flags).
    log_stats, eval_stats = torch.zeros(len(STATS), device=device), torch.zeros(len(STATS), device=device)
    log_steps = eval_steps = 0
    t_start, step_start = time.perf_counter(), step
    t_log = t_eval = t_start
    result = None
    try:
        while step < total_steps:
            lr = cosine_lr(step, total_steps, args.lr) if args.optimizer == "sgd" else args.lr  # Adam: constant, as the paper
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx_l, idx_u = labeled_batches(), unlabeled_batches()
            x_l = weak_augment(train_x.index_select(0, idx_l), aug_generator)
            u = train_x.index_select(0, idx_u)  # index_select: x[idx] is ~15x slower for this on CPU
            x_u = torch.stack([weak_augment(u, aug_generator) for _ in range(args.k)])
            lam, perm = sample_mixup(mixup_rng, (1 + args.k) * args.batch_size, args.alpha, device)
            ramp = linear_rampup(step, args.rampup_steps)
            step_stats = train_step(forward, optimizer, x_l, train_y[idx_l], x_u, train_y[idx_u], lam, perm, ramp, args, amp)
            ema_update(ema_model, model, args.ema_decay)
            log_stats += step_stats
            eval_stats += step_stats
            step, log_steps, eval_steps = step + 1, log_steps + 1, eval_steps + 1

            if step % args.log_every == 0 or step % args.eval_every == 0 or step == total_steps:
                mean = summarize(log_stats, log_steps)  # the only host sync between evaluations
                now = time.perf_counter()
                eta = (now - t_start) / (step - step_start) * (total_steps - step)
                print(f"step {step}/{total_steps} | loss {mean['loss']:.3f} (x {mean['loss_x']:.3f}, u {mean['loss_u']:.4f}) "
                      f"| w_u {args.lambda_u * mean['ramp']:.1f} | guess-acc {mean['pseudo_acc']:.2f} | lr {lr:.4f} "
                      f"| {log_steps * images_per_step / (now - t_log):.0f} img/s | ETA {format_time(eta)}", flush=True)
                log_stats.zero_()
                log_steps, t_log = 0, now

            if step % args.eval_every == 0 or step == total_steps:
                row = {"step": step, "epoch": step / args.steps_per_epoch, "lr": lr, **summarize(eval_stats, eval_steps),
                       "img_per_s": eval_steps * images_per_step / (time.perf_counter() - t_eval)}
                result = evaluate(ema_model, test_x, test_y, amp)
                elapsed += time.perf_counter() - t_start
                row.update(test_top1=result["top1"], test_top5=result["top5"], test_loss=result["loss"], elapsed_s=elapsed)
                metrics.append(row)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"eval step {step}: EMA top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
                      f"loss {result['loss']:.3f}", flush=True)
                save_checkpoint(ckpt_path, {
                    "step": step, "elapsed": elapsed, "model": model.state_dict(), "ema_model": ema_model.state_dict(),
                    "optimizer": optimizer.state_dict(), "labeled_batches": labeled_batches.state_dict(),
                    "unlabeled_batches": unlabeled_batches.state_dict(), "aug_generator": aug_generator.get_state(),
                    "mixup_rng": mixup_rng.bit_generator.state})
                eval_stats.zero_()
                eval_steps, step_start = 0, step
                t_start = t_log = t_eval = time.perf_counter()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130

    if result is None:  # resumed from the final checkpoint: results.json was not written yet
        result = evaluate(ema_model, test_x, test_y, amp)
    top1 = [m["test_top1"] for m in metrics]
    results = {
        "algorithm": ALGORITHM, "n_labeled": args.n_labeled, "seed": args.seed,
        "best_top1": max(top1), "median_last20_top1": statistics.median(top1[-20:]),
        "final_top1": result["top1"], "final_top5": result["top5"], "final_loss": result["loss"],
        "per_class_top1": result["per_class_top1"], "evaluations": len(metrics), "steps": total_steps,
        "wall_time_s": elapsed, "command": " ".join(["python", os.path.basename(__file__)] + (sys.argv[1:] if argv is None else argv)),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "args": vars(args),
    }
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"done: final EMA top-1 {100 * results['final_top1']:.2f}%, median of last 20 evals "
          f"{100 * results['median_last20_top1']:.2f}%, best {100 * results['best_top1']:.2f}% -> {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
