"""FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence.
Sohn et al., NeurIPS 2020, arXiv 2001.07685.

The idea: for every unlabeled image, predict a class on a weakly augmented view (flip + shift). If the
model is confident (max probability >= tau), that class becomes a hard pseudo-label, and the model is
trained to predict it on a strongly augmented view (RandAugment + Cutout) of the same image.
Unconfident images contribute nothing. Labeled images get ordinary cross-entropy.

    L   = L_s + lambda_u * L_u
    L_s = 1/B        sum_b  H(y_b, p(y | weak(x_b)))
    L_u = 1/(mu B)   sum_b  1[max q_b >= tau] * H(argmax q_b, p(y | strong(u_b))),   q_b = p(y | weak(u_b))

q_b comes from the model being trained (not the EMA model), without gradient. The labeled batch and
both unlabeled views go through the network in one forward pass, so BatchNorm sees one batch.

Defaults are the paper's CIFAR-10 setting (Section 4, Appendix B.1): B = 64, mu = 7, tau = 0.95,
lambda_u = 1, SGD with Nesterov momentum 0.9, lr 0.03 with cosine decay lr * cos(7 pi k / (16 K)),
weight decay 5e-4, K = 2^20 steps, WRN-28-2, evaluation with an EMA (0.999) of the weights.

    python fixmatch.py --n-labeled 4000                      # the paper's setting on a CUDA GPU
    python fixmatch.py --n-labeled 250 --device cpu --depth 10 --widen-factor 1 --epochs 2 --steps-per-epoch 20
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common import (NUM_CLASSES, DataError, RandomBatches, WideResNet, labeled_split, load_cifar10, normalize,
                    strong_augment, weak_augment)

ALGORITHM = "fixmatch"


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-labeled", type=int, default=4000, help="number of labeled training images (balanced over classes; 40/250/4000 in the paper)")
    p.add_argument("--batch-size", type=int, default=64, help="labeled batch size B")
    p.add_argument("--mu", type=int, default=7, help="unlabeled batch = mu * B")
    p.add_argument("--threshold", type=float, default=0.95, help="confidence threshold tau for pseudo-labels")
    p.add_argument("--lambda-u", type=float, default=1.0, help="weight of the unlabeled loss")
    p.add_argument("--lr", type=float, default=0.03, help="initial learning rate (SGD, Nesterov momentum 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (not on BatchNorm parameters and biases)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the weight EMA used for evaluation")
    p.add_argument("--epochs", type=int, default=1024, help="number of 'epochs' of --steps-per-epoch steps (2^20 steps in all by default)")
    p.add_argument("--steps-per-epoch", type=int, default=1024, help="steps per epoch; the lr schedule spans epochs * steps-per-epoch")
    p.add_argument("--eval-every", type=int, default=1024, help="evaluate the EMA model on the test set and checkpoint every this many steps")
    p.add_argument("--log-every", type=int, default=256, help="print a progress line every this many steps")
    p.add_argument("--depth", type=int, default=28, help="WideResNet depth (6n+4)")
    p.add_argument("--widen-factor", type=int, default=2, help="WideResNet widen factor")
    p.add_argument("--seed", type=int, default=0, help="seed of the labeled split, the initialisation and the batches")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (downloaded there if missing)")
    p.add_argument("--out", default=None, help="run folder (default: runs/fixmatch_n<n-labeled>_seed<seed>)")
    p.add_argument("--overwrite", action="store_true", help="start over in --out even if it holds another run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default="auto", help="bf16 autocast; auto: on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network: forward and backward, any device")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", f"{ALGORITHM}_n{args.n_labeled}_seed{args.seed}")
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible settings with one line (DataError -> exit status 2)."""
    checks = [
        (10 <= args.n_labeled <= 50000, f"--n-labeled must be between 10 and 50000, got {args.n_labeled}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.mu >= 1, f"--mu must be >= 1, got {args.mu}"),
        (0 < args.threshold <= 1, f"--threshold must be in (0, 1], got {args.threshold}"),
        (args.lambda_u >= 0, f"--lambda-u must be >= 0, got {args.lambda_u}"),
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
def pseudo_labels(logits_weak: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels argmax q and the confidence mask max q >= tau, q = softmax(weak-view logits)."""
    probs = torch.softmax(logits_weak.detach().float(), dim=1)
    confidence, labels = probs.max(dim=1)
    return labels, (confidence >= threshold).float()


def fixmatch_unlabeled_loss(logits_strong: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_u = 1/(mu B) sum_b mask_b * H(label_b, p(y | strong view)): averaged over the whole unlabeled
    batch, masked images included, so fewer confident images means a smaller loss (as in the paper)."""
    return (F.cross_entropy(logits_strong.float(), labels, reduction="none") * mask).mean()


# ----------------------------------------------------------------------------------------------------
# Optimisation: the shared recipe (SGD + Nesterov, cosine decay, weight decay off BN/biases, weight EMA)
# ----------------------------------------------------------------------------------------------------
def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """lr * cos(7 pi k / (16 K)): decays to about 0.2 lr at the end rather than to 0 (FixMatch, Sec. 4)."""
    return base_lr * math.cos(7 * math.pi * step / (16 * total_steps))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]      # conv and linear weights
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BatchNorm scales/shifts and biases
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, fused=device.type == "cuda")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for the weights; BatchNorm statistics are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    torch._foreach_copy_(list(ema.buffers()), list(model.buffers()))


# ----------------------------------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------------------------------
# Per-step statistics, summed on the device between log points. masked_correct_rate is the fraction of
# the unlabeled batch that is both confident and correctly pseudo-labeled.
STATS = ["loss", "loss_x", "loss_u", "mask_rate", "masked_correct_rate", "pseudo_acc"]


def summarize(stats: torch.Tensor, steps: int) -> dict:
    """Mean statistics since the last log point, read from the device (a host sync: log points only)."""
    mean = dict(zip(STATS, (stats / steps).tolist()))
    # Accuracy of the pseudo-labels that were used (confident ones); None while none is confident.
    masked_correct = mean.pop("masked_correct_rate")
    mean["pseudo_acc_masked"] = masked_correct / mean["mask_rate"] if mean["mask_rate"] > 0 else None
    return mean


def train_step(model, optimizer, x_l, y_l, x_uw, x_us, y_u, args, amp: bool) -> torch.Tensor:
    """One FixMatch step. Returns the step's statistics as a tensor on the device (no host sync);
    y_u, the true labels of the unlabeled batch, only measure pseudo-label accuracy."""
    b = x_l.shape[0]
    x = normalize(torch.cat([x_l, x_uw, x_us])).contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    logits_l, logits_uw, logits_us = logits[:b], *logits[b:].chunk(2)
    loss_x = F.cross_entropy(logits_l.float(), y_l)
    labels, mask = pseudo_labels(logits_uw, args.threshold)
    loss_u = fixmatch_unlabeled_loss(logits_us, labels, mask)
    loss = loss_x + args.lambda_u * loss_u
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (labels == y_u).float()
    return torch.stack([loss, loss_x, loss_u, mask.mean(), (correct * mask).mean(), correct.mean()]).detach()


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
    # labeled ones, as in the paper); augmentation parameters come from their own CPU generator.
    labeled_batches = RandomBatches(labeled.to(device), args.batch_size, seed=args.seed)
    unlabeled_batches = RandomBatches(torch.arange(len(train_x), device=device), args.mu * args.batch_size, seed=args.seed + 1)
    aug_generator = torch.Generator().manual_seed(args.seed + 2)

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
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        metrics = read_metrics(metrics_path, step)
        with open(metrics_path, "w") as f:  # drop lines written after the checkpoint
            f.writelines(json.dumps(m) + "\n" for m in metrics)
        print(f"resuming {args.out} from step {step}")

    images_per_step = args.batch_size * (1 + 2 * args.mu)  # images through the network per step
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
            lr = cosine_lr(step, total_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx_l, idx_u = labeled_batches(), unlabeled_batches()
            x_l = weak_augment(train_x.index_select(0, idx_l), aug_generator)
            u = train_x.index_select(0, idx_u)  # index_select: x[idx] is ~15x slower for this on CPU
            x_uw, x_us = weak_augment(u, aug_generator), strong_augment(u, aug_generator)
            step_stats = train_step(forward, optimizer, x_l, train_y[idx_l], x_uw, x_us, train_y[idx_u], args, amp)
            ema_update(ema_model, model, args.ema_decay)
            log_stats += step_stats
            eval_stats += step_stats
            step, log_steps, eval_steps = step + 1, log_steps + 1, eval_steps + 1

            if step % args.log_every == 0 or step % args.eval_every == 0 or step == total_steps:
                mean = summarize(log_stats, log_steps)  # the only host sync between evaluations
                now = time.perf_counter()
                eta = (now - t_start) / (step - step_start) * (total_steps - step)
                print(f"step {step}/{total_steps} | loss {mean['loss']:.3f} (x {mean['loss_x']:.3f}, u {mean['loss_u']:.3f}) "
                      f"| mask {mean['mask_rate']:.2f} | pl-acc {mean['pseudo_acc_masked'] or 0:.2f} | lr {lr:.4f} "
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
                    "unlabeled_batches": unlabeled_batches.state_dict(), "aug_generator": aug_generator.get_state()})
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
