"""FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo Labeling.
Zhang et al., NeurIPS 2021, arXiv 2110.08263.

The idea: FixMatch with one change, Curriculum Pseudo Labeling (CPL). FixMatch's fixed confidence
threshold tau becomes one threshold per class that follows how well the model has learned that class:
a class the model seldom predicts confidently gets a low threshold, so more of its pseudo-labels are used,
while a well-learned class keeps a threshold near tau. The learning effect of a class costs no extra
forward pass: it is the number of unlabeled images whose latest confident (>= tau) prediction is that class.

    selected_label[i] = argmax q_i from the last step in which image i had max q_i >= tau (-1: never yet)
    sigma(c) = #{i among all N unlabeled images : selected_label[i] = c}                  (learning effect)
    beta(c)  = sigma(c) / max(max_c' sigma(c'), #{i : selected_label[i] = -1})   (threshold warm-up, default)
    beta(c)  = sigma(c) / max_c' sigma(c')                  (--no-threshold-warmup; 0 when that max is 0)
    T(c)     = tau * M(beta(c)),   M(x) = x / (2 - x) (convex, default)  or  M(x) = x (--mapping linear)

    L   = L_s + lambda_u * L_u
    L_s = 1/B        sum_b  H(y_b, p(y | weak(x_b)))
    L_u = 1/(mu B)   sum_b  1[max q_b >= T(argmax q_b)] * H(argmax q_b, p(y | strong(u_b))),   q_b = p(y | weak(u_b))

q_b comes from the model being trained (not the EMA model), without gradient. The labeled batch and
both unlabeled views go through the network in one forward pass, so BatchNorm sees one batch. A step's
thresholds come from selected_label as it stands before the step; after the step, the batch's confident
predictions are written into it. selected_label is part of the checkpoint, so a resumed run is exact.

Defaults are FixMatch's CIFAR-10 setting, which FlexMatch keeps: B = 64, mu = 7, tau = 0.95,
lambda_u = 1, SGD with Nesterov momentum 0.9, lr 0.03 with cosine decay lr * cos(7 pi k / (16 K)),
weight decay 5e-4, K = 2^20 steps, WRN-28-2, evaluation with an EMA (0.999) of the weights; threshold
warm-up on and the convex mapping, FlexMatch's defaults.
--augment ctaugment: CTAugment in place of RandAugment, run as fixmatch.py's (docs/algorithms.md).

    python flexmatch.py --n-labeled 4000                      # the paper's setting on a CUDA GPU
    python flexmatch.py --n-labeled 250 --device cpu --depth 10 --widen-factor 1 --epochs 2 --steps-per-epoch 20
"""

import argparse
import contextlib
import copy
import fcntl
import io
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from common import (CIFAR10_MEAN, CIFAR10_STD, DATASETS, MODEL_FILE_VERSION, NUM_CLASSES, DataError, RandomBatches,
                    WideResNet, check_data_args, check_device, labeled_split, load_dataset, normalize, parse_n_labeled,
                    cta_labeled_views, cta_probe, cta_rates, cta_strong_augment, strong_augment, weak_augment)

ALGORITHM = "flexmatch"


# ----------------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------------
def pseudo_labels(logits_weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels argmax q and their confidence max q, q = softmax(weak-view logits)."""
    probs = torch.softmax(logits_weak.detach().float(), dim=1)
    confidence, labels = probs.max(dim=1)
    return labels, confidence


def learning_effect(selected_label: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma(c), the number of unlabeled images whose latest confident prediction is class c, [num_classes],
    and the number of unused images (never confident yet, selected_label -1), a 0-d tensor.

    Counted over the whole unlabeled set, not the batch. A scatter-add rather than torch.bincount, whose
    output size depends on the data and so reads it back to the host on CUDA.
    """
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=selected_label.device)
    counts.scatter_add_(0, selected_label + 1, torch.ones_like(selected_label))  # slot 0 counts the -1s
    return counts[1:], counts[0]


def class_thresholds(selected_label: torch.Tensor, num_classes: int, tau: float, warmup: bool = True,
                     mapping: str = "convex") -> torch.Tensor:
    """FlexMatch's flexible threshold T(c) = tau * M(beta(c)) for every class c, [num_classes] float32.

    beta(c) = sigma(c) / max(max_c' sigma(c'), unused) with threshold warm-up, sigma(c) / max_c' sigma(c')
    without; beta is 0 for every class when that denominator is 0 (without warm-up: no image selected yet).
    M(x) = x / (2 - x) (convex, the paper's default: thresholds stay low until a class is well learned)
    or M(x) = x (linear).

    The start, when all images are unused: with warm-up the denominator is N and every beta is 0, so every
    threshold is tau * M(0) = 0 (for the convex and the linear mapping alike) and every pseudo-label is used
    in the first steps. That is FlexMatch's design: it learns from all unlabeled data early, and a class's
    threshold rises only as the model becomes confident (>= tau) about images of that class.
    """
    sigma, unused = learning_effect(selected_label, num_classes)
    denominator = torch.maximum(sigma.max(), unused) if warmup else sigma.max()
    beta = sigma.float() / denominator.clamp(min=1).float()  # sigma is all 0 where the denominator is 0
    if mapping == "convex":
        return tau * beta / (2 - beta)
    if mapping == "linear":
        return tau * beta
    raise ValueError(f"mapping must be 'convex' or 'linear', got {mapping!r}")


def flexmatch_mask(confidence: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """1 where an image's confidence reaches the threshold of its own predicted class, max q >= T(argmax q)."""
    return (confidence >= thresholds[labels]).float()


def update_selected_label(selected_label: torch.Tensor, idx: torch.Tensor, confidence: torch.Tensor,
                          labels: torch.Tensor, tau: float) -> torch.Tensor:
    """selected_label with selected_label[idx[b]] = labels[b] for every confident image b (confidence >= tau,
    the fixed tau, not the class threshold); a new tensor, the input is left as it is.

    An image can appear twice in one batch (a batch that crosses an epoch of the index stream). Then the
    result is that of writing the batch in order: the last confident occurrence wins. A plain indexed write
    with repeated indices leaves the winner unspecified (on CUDA, to whichever thread writes last), so the
    winner's position is found first, with a scatter of positions reduced by max; no host sync.
    """
    position = torch.arange(len(idx), device=idx.device)
    confident_position = torch.where(confidence >= tau, position, -1)
    # last[i]: position in the batch of image i's last confident occurrence, -1 if it has none.
    last = torch.full_like(selected_label, -1).scatter_reduce_(0, idx, confident_position, reduce="amax")
    return torch.where(last >= 0, labels[last.clamp(min=0)], selected_label)


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
def train_step(model, optimizer, x_l, y_l, x_uw, x_us, idx_u, selected_label, args, amp: bool,
               mean_std: tuple = (CIFAR10_MEAN, CIFAR10_STD),
               num_classes: int = NUM_CLASSES) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One FlexMatch step on the labeled batch and the two views of the unlabeled one; updates selected_label in
    place with the confident predictions on the unlabeled batch idx_u. Returns the step's statistics by name
    (tensors on the device: no host sync; threshold_min/mean/max summarise the class thresholds T(c), and
    unused_fraction is the share of all unlabeled images never confident yet), and the pseudo-labels and their
    mask, whose accuracy the loop measures. mean_std is the data set's (mean, std) for normalize."""
    b = x_l.shape[0]
    x = normalize(torch.cat([x_l, x_uw, x_us]), *mean_std).contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    logits_l, logits_uw, logits_us = logits[:b], *logits[b:].chunk(2)
    loss_x = F.cross_entropy(logits_l.float(), y_l)
    thresholds = class_thresholds(selected_label, num_classes, args.threshold, args.threshold_warmup, args.mapping)
    labels, confidence = pseudo_labels(logits_uw)
    mask = flexmatch_mask(confidence, labels, thresholds)  # each image against its predicted class's threshold
    unused_fraction = (selected_label == -1).float().mean()  # of the state the thresholds come from
    loss_u = fixmatch_unlabeled_loss(logits_us, labels, mask)
    loss = loss_x + args.lambda_u * loss_u
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    selected_label.copy_(update_selected_label(selected_label, idx_u, confidence, labels, args.threshold))
    stats = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "mask_rate": mask.mean(),
             "threshold_min": thresholds.min(), "threshold_mean": thresholds.mean(),
             "threshold_max": thresholds.max(), "unused_fraction": unused_fraction}
    return stats, labels, mask


# ----------------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------------
def train(args: argparse.Namespace, argv: list[str] | None, lock: contextlib.ExitStack) -> int:
    # ---- Run folder, data and device: the same in every script ----
    check_args(args)
    ckpt = check_run_dir(args)  # before the data loads: bad input costs no wait and writes nothing
    results_path = os.path.join(args.out, "results.json")
    if os.path.exists(results_path) and not args.overwrite:
        print(f"{args.out} already holds a finished run (results.json); nothing to do")
        return 0
    stop = catch_stop_signals(lock)  # from here on, SIGTERM and SIGUSR1 only ask the loop to checkpoint and exit
    data = load_dataset(args.dataset, args.data_dir, args.image_size)
    labeled = labeled_split(data["train_y"], args.n_labeled, args.seed, data["num_classes"])
    prepare_run_dir(args, labeled, lock)  # after the data loaded: a failed start leaves nothing behind

    device = torch.device(args.device)
    amp = device.type == "cuda" if args.amp == "auto" else args.amp
    torch.backends.cudnn.benchmark = True
    train_x, train_y = data["train_x"].to(device), data["train_y"].to(device)
    test_x, test_y = data["test_x"].to(device), data["test_y"].to(device)
    mean_std = (data["mean"], data["std"])  # the data set's per-channel statistics, for normalize

    # ---- ALGORITHM: the networks, the optimizer, the batch streams and the algorithm's own state ----
    torch.manual_seed(args.seed)
    model = WideResNet(data["num_classes"], depth=args.depth, widen_factor=args.widen_factor)
    model = model.to(device, memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model)
    optimizer = make_optimizer(model, args, device)
    forward = torch.compile(model) if args.compile else model
    # Index streams over the labeled subset and over all training images (the unlabeled set includes the
    # labeled ones, as in the paper, and a folder's unlabeled/ images);
    # augmentation parameters come from their own CPU generator.
    labeled_batches = RandomBatches(labeled.to(device), args.batch_size, seed=args.seed)
    unlabeled_batches = RandomBatches(torch.arange(len(train_x), device=device), args.mu * args.batch_size,
                                      seed=args.seed + 1)
    aug_generator = torch.Generator().manual_seed(args.seed + 2)
    cta, rates = args.augment == "ctaugment", cta_rates()  # CTAugment's rates, on the host (common.py)
    # FlexMatch's state: for each of the len(train_x) unlabeled images (all of them, not a batch), its latest
    # confident prediction, -1 while it has none. The class thresholds are computed from it at every step.
    selected_label = torch.full((len(train_x),), -1, dtype=torch.int64, device=device)

    def update(x_l, y_l, x_uw, x_us, idx_u, y_u) -> dict:  # the step's device work: one CUDA graph with --cuda-graph
        step_stats, labels, mask = train_step(forward, optimizer, x_l, y_l, x_uw, x_us, idx_u, selected_label, args,
                                              amp, mean_std, data["num_classes"])
        ema_update(ema_model, model, args.ema_decay)
        return {**step_stats, **pseudo_label_stats(labels, mask, y_u)}
    update = cuda_graph(update, optimizer, device) if args.cuda_graph else update

    # ---- Resume and the loop: the same in every script, but for the parts listed and the step itself ----
    total_steps = args.epochs * args.steps_per_epoch
    warn_if_slow(args, model, device, total_steps)
    # Everything a checkpoint saves and a resume restores, besides the step and the time spent.
    parts = {"model": model, "ema_model": ema_model, "optimizer": optimizer, "labeled_batches": labeled_batches,
             "unlabeled_batches": unlabeled_batches, "aug_generator": aug_generator, "selected_label": selected_label,
             **({"cta_rates": rates} if cta else {})}
    step, elapsed, ckpt_step = 0, 0.0, None
    ckpt_path, metrics_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "metrics.jsonl")
    if ckpt is not None:
        restore_training_state(parts, ckpt)
        step, elapsed, ckpt_step = ckpt["step"], ckpt["elapsed"], ckpt["step"]
        print(f"resuming {args.out} from step {step}")
    # metrics.jsonl holds exactly the checkpoint's rows: rows written after it and a half-written line go.
    metrics = read_metrics(metrics_path, step)
    write_metrics(metrics_path, metrics)

    images_per_step = args.batch_size * (1 + 2 * args.mu + cta)  # images through the network per step (CTA: probe)
    print(f"{ALGORITHM}: {args.n_labeled} labels, WRN-{args.depth}-{args.widen_factor}, {total_steps} steps of "
          f"{images_per_step} images on {device}{' (bf16)' if amp else ''}; run folder {args.out}")
    # Statistics are summed on the device over the steps since the last evaluation (or start, or the checkpoint of a
    # SIGTERM), and timed from then: progress lines show their running means, metrics.jsonl their means.
    names, sums, steps_summed, interval_s = interval_state(ckpt, device)
    t_eval, next_line, first_line = time.perf_counter() - interval_s, time.perf_counter() + PROGRESS_SECONDS, step + 3
    result = None
    try:
        while step < total_steps:
            # ALGORITHM: one step
            lr = cosine_lr(step, total_steps, args.lr)
            set_lr(optimizer, lr)
            idx_l, idx_u = labeled_batches(), unlabeled_batches()
            x_l = weak_augment(train_x.index_select(0, idx_l), aug_generator)
            x_l, probe = cta_labeled_views(x_l, rates, aug_generator) if cta else (x_l, None)  # AugmentPoolCTA's
            u = train_x.index_select(0, idx_u)  # index_select: x[idx] is ~15x slower for this on CPU
            x_uw = weak_augment(u, aug_generator)
            x_us = cta_strong_augment(u, rates, aug_generator) if cta else strong_augment(u, aug_generator)
            stats = update(x_l, train_y[idx_l], x_uw, x_us, idx_u, train_y[idx_u])
            if cta:  # CTAugment's feedback, after the step and the EMA update: the EMA model's probe predictions
                rates.copy_(cta_probe(ema_model, probe, train_y[idx_l], rates, amp, mean_std))
            values = torch.stack(list(stats.values()))
            sums = values if sums is None else sums + values
            names, steps_summed, step = list(stats), steps_summed + 1, step + 1

            # The same in every script but for the fields logged: progress line, evaluation, checkpoint
            now = time.perf_counter()
            # Progress lines: every --log-every steps, at least every PROGRESS_SECONDS, and after the first 3
            # steps of a (re)start, so that the ETA is known at once.
            if (step % args.log_every == 0 or step % args.eval_every == 0 or step in (total_steps, first_line)
                    or now >= next_line):
                mean = summarize(names, sums, steps_summed)  # the only host sync between evaluations
                if not math.isfinite(mean["loss"]):  # checked here, not per step: no host sync in the step
                    return stop_diverged(args.out, step, mean["loss"], ckpt_step)
                eta = (now - t_eval) / steps_summed * (total_steps - step)
                print(f"step {step}/{total_steps} | loss {mean['loss']:.3f} "
                      f"(x {mean['loss_x']:.3f}, u {mean['loss_u']:.3f}) | mask {mean['mask_rate']:.2f} "
                      f"| pl-acc {mean['pseudo_acc_masked'] or 0:.2f} | lr {lr:.4f} "
                      f"| thr {mean['threshold_min']:.2f}/{mean['threshold_mean']:.2f}/{mean['threshold_max']:.2f} "
                      f"unused {mean['unused_fraction']:.2f} "
                      f"| {steps_summed * images_per_step / (now - t_eval):.0f} img/s | ETA {format_time(eta)}",
                      flush=True)
                next_line = now + PROGRESS_SECONDS

            if step % args.eval_every == 0 or step == total_steps:
                row = {"step": step, "epoch": step / args.steps_per_epoch, "lr": lr,
                       **summarize(names, sums, steps_summed),
                       "img_per_s": steps_summed * images_per_step / (time.perf_counter() - t_eval)}
                # The per-class thresholds the next step will use (the summary above is a mean over the steps).
                row["class_thresholds"] = class_thresholds(selected_label, data["num_classes"], args.threshold,
                                                           args.threshold_warmup, args.mapping).tolist()
                result = evaluate(ema_model, test_x, test_y, amp, mean_std=mean_std)
                elapsed += time.perf_counter() - t_eval
                row.update(test_top1=result["top1"], test_top5=result["top5"], test_loss=result["loss"],
                           elapsed_s=elapsed)
                metrics.append(row)
                write_metrics(metrics_path, metrics)
                print(f"eval step {step}: EMA top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
                      f"loss {result['loss']:.3f}", flush=True)
                save_checkpoint(ckpt_path, {"step": step, "elapsed": elapsed, **training_state(parts)})
                ckpt_step = step
                sums, steps_summed, t_eval = None, 0, time.perf_counter()
            if stop and step < total_steps:  # SIGTERM or SIGUSR1 came: checkpoint the step just done, then exit
                return stop_preempted(stop[0], ckpt_path, step, elapsed, parts, (names, sums, steps_summed, t_eval))
    except KeyboardInterrupt:
        return stop_interrupted(step, ckpt_path)

    if result is None:  # resumed from the final checkpoint: results.json was not written yet
        result = evaluate(ema_model, test_x, test_y, amp, mean_std=mean_std)
    top1 = [m["test_top1"] for m in metrics]
    results = {
        "algorithm": ALGORITHM, "n_labeled": args.n_labeled, "seed": args.seed,
        "best_top1": max(top1), "median_last20_top1": statistics.median(top1[-20:]),
        "final_top1": result["top1"], "final_top5": result["top5"], "final_loss": result["loss"],
        "per_class_top1": result["per_class_top1"], "evaluations": len(metrics), "steps": total_steps,
        "classes": data["classes"],
        "wall_time_s": elapsed,
        "command": " ".join(["python", os.path.basename(__file__)] + (sys.argv[1:] if argv is None else argv)),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "args": vars(args),
    }
    save_model(os.path.join(args.out, "model.pt"), ema_model, args, data, result["top1"])
    write_json(results_path, results)
    print(f"done: final EMA top-1 {100 * results['final_top1']:.2f}%, median of last 20 evals "
          f"{100 * results['median_last20_top1']:.2f}%, best {100 * results['best_top1']:.2f}% -> {results_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input or a file that cannot be read or written (one line), 3 diverged, 75 stopped
    by SIGTERM or SIGUSR1 (preemption, time limit) with a checkpoint of that step to resume from, 130 interrupted."""
    args = parse_args(argv)
    with contextlib.ExitStack() as lock:
        try:
            return train(args, argv, lock)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
        except OSError as e:  # writing the run folder: a full disk, a permission, a vanished folder
            print(f"error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-labeled", type=parse_n_labeled, default=4000, help="number of labeled training images "
                   "(balanced over classes; 40/250/4000 in the paper), or 'all': every training image with a label")
    p.add_argument("--batch-size", type=int, default=64, help="labeled batch size B")
    p.add_argument("--mu", type=int, default=7, help="unlabeled batch = mu * B")
    p.add_argument("--threshold", type=float, default=0.95, help="pre-defined threshold tau (FlexMatch, arXiv "
                   "2110.08263): class thresholds are tau * M(beta(c)) <= tau; max q >= tau marks an image as learned")
    p.add_argument("--threshold-warmup", action=argparse.BooleanOptionalAction, default=True, help="FlexMatch's "
                   "threshold warm-up: beta(c) = sigma(c) / max(max_c sigma(c), unused images), "
                   "else sigma(c) / max_c sigma(c)")
    p.add_argument("--mapping", choices=["convex", "linear"], default="convex", help="FlexMatch's M in T(c) = tau * "
                   "M(beta(c)): convex x / (2 - x) (the paper's default) or linear x")
    p.add_argument("--lambda-u", type=float, default=1.0, help="weight of the unlabeled loss")
    p.add_argument("--augment", choices=["randaugment", "ctaugment"], default="randaugment", help="strong "
                   "augmentation: RandAugment + Cutout (the paper's main setting) or CTAugment, with the labeled batch "
                   "weak + CTA too, as google-research/fixmatch's AugmentPoolCTA (docs/algorithms.md, FixMatch)")
    p.add_argument("--lr", type=float, default=0.03, help="initial learning rate (SGD, Nesterov momentum 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay (not on BatchNorm parameters and biases)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the weight EMA used for evaluation")
    p.add_argument("--epochs", type=int, default=1024, help="number of 'epochs' of --steps-per-epoch steps (2^20 "
                   "steps in all by default)")
    p.add_argument("--steps-per-epoch", type=int, default=1024,
                   help="steps per epoch; the lr schedule spans epochs * steps-per-epoch")
    p.add_argument("--eval-every", type=int, default=1024, help="evaluate the EMA model on the test set and "
                   "checkpoint every this many steps")
    p.add_argument("--log-every", type=int, default=256, help="print a progress line every this many steps")
    p.add_argument("--depth", type=int, default=28, help="WideResNet depth (6n+4)")
    p.add_argument("--widen-factor", type=int, default=2, help="WideResNet widen factor")
    p.add_argument("--seed", type=int, default=0, help="seed of the labeled split, the initialisation and the batches")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10", help="cifar10, cifar100 (both downloaded into "
                   "--data-dir if missing), or folder: your own images (README, 'Your own data')")
    p.add_argument("--image-size", type=int, default=32, help="--dataset folder: the size images are resized to "
                   "(the shorter side, then a centre crop); CIFAR images are 32")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ or cifar-100-python/, "
                   "or, for --dataset folder, train/<class>/, test/<class>/ and optionally unlabeled/")
    p.add_argument("--out", default=argparse.SUPPRESS, help="run folder (default: "
                   f"runs/{ALGORITHM}_n<n-labeled>_seed<seed>, "
                   f"runs/{ALGORITHM}_<dataset>_n<n-labeled>_seed<seed> for other data sets than cifar10)")
    p.add_argument("--overwrite", action="store_true", help="start over in --out even if it holds another run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default="auto", help="bf16 autocast; auto: on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network: forward and backward, any device")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA: replay the step, the EMA and the statistics from "
                   "one CUDA graph after 3 eager steps (the same step; not yet timed on a GPU: benchmarks/README.md)")
    args = p.parse_args(argv)
    run_name = ALGORITHM if args.dataset == "cifar10" else f"{ALGORITHM}_{args.dataset}"
    args.out = getattr(args, "out", None) or os.path.join("runs", f"{run_name}_n{args.n_labeled}_seed{args.seed}")
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible settings with one line (DataError -> exit status 2)."""
    check_data_args(args.dataset, args.n_labeled, args.image_size)  # before any data is read or downloaded
    checks = [
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.mu >= 1, f"--mu must be >= 1, got {args.mu}"),
        (0 < args.threshold <= 1, f"--threshold must be in (0, 1], got {args.threshold}"),
        (args.lambda_u >= 0, f"--lambda-u must be >= 0, got {args.lambda_u}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (min(args.epochs, args.steps_per_epoch, args.eval_every, args.log_every) >= 1,
         "--epochs, --steps-per-epoch, --eval-every and --log-every must be >= 1"),
        (args.depth >= 10 and (args.depth - 4) % 6 == 0,
         f"--depth must be 6n+4 (10, 16, 22, 28, ...), got {args.depth}"),
        (args.widen_factor >= 1, f"--widen-factor must be >= 1, got {args.widen_factor}"),
        (not (args.cuda_graph and args.augment == "ctaugment"),
         "--cuda-graph is not yet tested with --augment ctaugment (per-step host work); use one or the other"),
        (not args.cuda_graph or args.device.startswith("cuda"), "--cuda-graph needs --device cuda"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)
    check_device(args.device)


# ====================================================================================================
# Shared plumbing. Everything below is the same, letter for letter, in all seven scripts (the supervised
# baseline lacks pseudo_label_stats); tests/test_skeleton.py holds them so. Edit fixmatch.py's copy, then run
# `python tools/sync_plumbing.py` to write it into the other six.
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, batch_size: int = 1000,
             mean_std: tuple = (CIFAR10_MEAN, CIFAR10_STD)) -> dict:
    """Top-1, top-5, mean cross-entropy and per-class top-1 of `model` on (x, y), in eval mode; mean_std is the
    data set's (mean, std) for normalize."""
    model.eval()
    loss, top1, top5 = 0.0, torch.zeros_like(y, dtype=torch.bool), torch.zeros_like(y, dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i:i + batch_size], *mean_std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(xb).float()
        yb = y[i:i + batch_size]
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # with fewer than 5 classes, all of them
        top1[i:i + batch_size] = top[:, 0] == yb
        top5[i:i + batch_size] = (top == yb[:, None]).any(1)
    model.train()
    per_class = [top1[y == c].float().mean().item() for c in range(logits.shape[1])]
    return {"top1": top1.float().mean().item(), "top5": top5.float().mean().item(), "loss": loss / len(x),
            "per_class_top1": per_class}


# ----------------------------------------------------------------------------------------------------
# Statistics: summed on the device over the steps since the last evaluation, read at log points
# ----------------------------------------------------------------------------------------------------
def pseudo_label_stats(labels: torch.Tensor, mask: torch.Tensor | None, y_u: torch.Tensor) -> dict:
    """A diagnostic outside the algorithm, which never sees y_u, the unlabeled images' true labels: the fractions
    of the batch that are correctly pseudo-labeled and whose label is known (-1, an image of a folder's
    unlabeled/, is neither), and with a mask also those that are confident too."""
    correct, known = (labels == y_u).float(), (y_u >= 0).float()
    stats = {"pseudo_acc": correct.mean(), "known_rate": known.mean()}
    if mask is None:
        return stats
    return {"masked_correct_rate": (correct * mask).mean(), **stats, "masked_known_rate": (known * mask).mean()}


def summarize(names: list[str], sums: torch.Tensor, steps: int) -> dict:
    """Mean statistics from their sums over `steps` steps (a host sync: log points only). Pseudo-label accuracies
    are ratios of sums, over the unlabeled images whose label is known (all of them with CIFAR): pseudo_acc of
    all pseudo-labels, pseudo_acc_masked of those used; None while there is none."""
    mean = dict(zip(names, (sums / steps).tolist()))
    known, masked_known = mean.pop("known_rate", 0.0), mean.pop("masked_known_rate", 0.0)
    if "pseudo_acc" in mean:
        mean["pseudo_acc"] = mean["pseudo_acc"] / known if known > 0 else None
    if "masked_correct_rate" in mean:
        masked_correct = mean.pop("masked_correct_rate")
        mean["pseudo_acc_masked"] = masked_correct / masked_known if masked_known > 0 else None
    return mean


# ----------------------------------------------------------------------------------------------------
# Run folder, checkpoint and resume
# ----------------------------------------------------------------------------------------------------
# Flags that do not change what is computed, or where it runs: a rerun may change them and still resume.
NOT_COMPARED = {"out", "overwrite", "log_every", "compile", "cuda_graph", "data_dir", "device"}
# Exit statuses besides 0 (see main, the README and docs/cluster.md). 75 is sysexits.h's EX_TEMPFAIL, "try again":
# grid.sbatch requeues a task that ends with it.
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 3, 75, 130
PROGRESS_SECONDS = 30  # a progress line at least this often, whatever --log-every says
# Flags added after runs were made, with what those runs used: an args.json without one of them is read with this
# value (CIFAR-10 before --dataset; RandAugment before --augment, which is no longer remixmatch.py's default).
PREDATING = {"dataset": "cifar10", "image_size": 32, "augment": "randaugment"}


def check_run_dir(args: argparse.Namespace) -> dict | None:
    """Before the data loads and before anything is written: refuse an --out that cannot be written, that
    holds another run, or whose checkpoint cannot be read (DataError, one line). Returns the checkpoint
    to resume from (on the CPU), or None to start at step 0."""
    existing = os.path.abspath(args.out)
    while not os.path.exists(existing):  # the folder itself, or the nearest parent that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(f"cannot use --out {args.out}: {existing} is a file, not a folder")
    try:  # a probe file: catches read-only file systems, missing permissions and full disks alike
        with tempfile.TemporaryFile(dir=existing) as f:
            f.write(b"probe")
            f.flush()
    except OSError as e:
        raise DataError(f"cannot write to --out {args.out}: {e.strerror or e}") from None
    path = os.path.join(args.out, "args.json")
    if os.path.exists(path) and not args.overwrite:
        try:
            with open(path) as f:
                old = {k: v for k, v in PREDATING.items() if k in vars(args)} | json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is not readable ({e}); pass another --out, or --overwrite to start over") from None
        if old.get("algorithm", ALGORITHM) != ALGORITHM:
            raise DataError(f"{args.out} holds a {old['algorithm']} run, not a {ALGORITHM} one; "
                            "pass another --out, or --overwrite to replace it")
        if "algorithm" not in old and old.get("amp") is True:  # older runs: True meant "on for CUDA only"
            old["amp"] = "auto"
        new = vars(args)
        diff = [f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                if k not in NOT_COMPARED | {"algorithm"} and old.get(k) != new.get(k)]
        if diff:
            raise DataError(f"{args.out} holds a run with other arguments ({'; '.join(diff)}); "
                            "pass another --out, or --overwrite to start that run over")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if args.overwrite or not os.path.exists(ckpt_path):
        return None
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty or garbled: torch raises many kinds of errors
        raise DataError(f"{ckpt_path} is not a readable checkpoint ({type(e).__name__}); delete it to restart "
                        "the run from step 0, or pass --overwrite to start the whole run over") from None


def prepare_run_dir(args: argparse.Namespace, labeled: torch.Tensor, lock: contextlib.ExitStack) -> None:
    """Create --out and lock it for this process (a second process on the same folder exits with one line),
    then write args.json and the labeled indices. --overwrite removes the previous run's files."""
    os.makedirs(args.out, exist_ok=True)
    fd = os.open(args.out, os.O_RDONLY)  # an advisory lock on the folder itself, released when the process ends
    lock.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(f"another process is training in {args.out}; wait for it to finish, "
                        "or pass another --out") from None
    previous_run = ["checkpoint.pt", "metrics.jsonl", "model.pt", "results.json"]  # a stale model.pt would mislead
    stale = ["diverged.json"] + (previous_run if args.overwrite else [])
    for name in stale:
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    write_json(os.path.join(args.out, "args.json"), {"algorithm": ALGORITHM, **vars(args)})
    write_json(os.path.join(args.out, "labeled_indices.json"), labeled.tolist())


def strict(value):
    """NaN and infinities -> None, in nested lists and dicts: files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    return [strict(v) for v in value] if isinstance(value, list) else value


def write_atomic(path: str, data: bytes) -> None:
    """Write a file so that a crash or a full disk leaves the previous version intact (and no .tmp file)."""
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except BaseException as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path  # "no space left on device" says nothing without the file's name
        raise


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(strict(obj), indent=1, allow_nan=False).encode())


def write_metrics(path: str, rows: list[dict]) -> None:
    """metrics.jsonl: one strict-JSON line per evaluation, rewritten whole and atomically."""
    write_atomic(path, "".join(json.dumps(strict(r), allow_nan=False) + "\n" for r in rows).encode())


def read_metrics(path: str, up_to_step: int) -> list[dict]:
    """The rows of metrics.jsonl that the checkpoint of `up_to_step` stands behind: later rows (written after
    the last checkpoint) and a half-written line (a crash or a full disk during the write) are dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in rows if isinstance(r, dict) and r.get("step", math.inf) <= up_to_step]


def training_state(parts: dict) -> dict:
    """What a checkpoint holds of each part of the training: a tensor's values, a generator's state (torch or
    numpy), or state_dict()."""
    def state(part):
        if isinstance(part, torch.Tensor):
            return part
        if isinstance(part, torch.Generator):
            return part.get_state()
        return part.bit_generator.state if hasattr(part, "bit_generator") else part.state_dict()
    return {name: state(part) for name, part in parts.items()}


def restore_training_state(parts: dict, ckpt: dict) -> None:
    """The inverse of training_state: every part back to its state in the checkpoint."""
    for name, part in parts.items():
        if isinstance(part, torch.Tensor):
            part.copy_(ckpt[name])
        elif isinstance(part, torch.Generator):
            part.set_state(ckpt[name])
        elif hasattr(part, "bit_generator"):
            part.bit_generator.state = ckpt[name]
        else:
            part.load_state_dict(ckpt[name])


def save_checkpoint(path: str, state: dict) -> None:
    """Serialise in memory, then write atomically: a crash mid-write leaves the previous checkpoint intact, and
    a full disk raises an OSError that names the file rather than an error from torch's zip writer."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getbuffer())


def save_model(path: str, ema_model: torch.nn.Module, args: argparse.Namespace, data: dict, top1: float) -> None:
    """model.pt, what it takes to apply the trained network elsewhere (common.load_model reads it, predict.py uses
    it): the EMA model's classifier weights, its architecture, the class names, the data set's mean, std and
    image size, and where it came from. Plain data only, so that torch.load(..., weights_only=True) reads it.
    Written before results.json, which marks the run finished: a crash between the two leaves a run that a rerun
    finishes, writing both."""
    with torch.device("meta"):  # the classifier's keys, without allocating or drawing random numbers
        keys = WideResNet(data["num_classes"], depth=args.depth, widen_factor=args.widen_factor).state_dict().keys()
    # A head used only in training (ReMixMatch's rotation head, in the model's state_dict) is left out; weights
    # are saved contiguous on the CPU, so the file loads anywhere whatever the training's memory format.
    weights = {k: v.detach().cpu().contiguous() for k, v in ema_model.state_dict().items() if k in keys}
    save_checkpoint(path, {
        "version": MODEL_FILE_VERSION, "weights": weights,
        "architecture": {"name": "WideResNet", "depth": args.depth, "widen_factor": args.widen_factor,
                         "num_classes": data["num_classes"]},
        "classes": list(data["classes"]), "mean": list(data["mean"]), "std": list(data["std"]),
        "image_size": args.image_size, "algorithm": ALGORITHM, "dataset": args.dataset, "n_labeled": args.n_labeled,
        "seed": args.seed, "steps": args.epochs * args.steps_per_epoch, "final_top1": top1})


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's learning rate, in every parameter group: written into the group's device tensor where
    device_lr made one (a captured SGD step reads it there at every replay), else set as a number."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def device_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """The learning rate as a float32 tensor on `device` in every group, which the fused SGD step reads on the
    device, so that a CUDA graph of the step follows the schedule (the step is made the fused one: a checkpoint of
    a CPU run says unfused, and the unfused step reads the tensor back to the host). state_dict turns it back into
    a number, so that a checkpoint is the same as an eager run's and resumes on any device."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        group["fused"], group["foreach"] = True, False

    def as_numbers(_, state: dict) -> dict:
        return {**state, "param_groups": [{**g, "lr": float(g["lr"])} for g in state["param_groups"]]}
    optimizer.register_state_dict_post_hook(as_numbers)


def cuda_graph(update, optimizer: torch.optim.Optimizer, device: torch.device, warmup: int = 3):
    """--cuda-graph: `update` (tensors in, a dict of tensors out; the same shapes at every call and no host sync)
    runs eagerly for its first `warmup` calls, on a side stream as capture requires (cuDNN picks its algorithms,
    SGD makes its momentum buffers), then is captured once in a CUDA graph. Every later call copies its inputs
    into the graph's, replays it (one launch for the network's hundreds of kernels, the SGD step and the EMA:
    the host no longer paces the step) and returns copies of its outputs, which the next replay overwrites. The
    learning rate moves into device tensors at the capture, after any resume has loaded the optimizer's state."""
    side, graph, static, calls = torch.cuda.Stream(device), torch.cuda.CUDAGraph(), {}, [0]

    def replay(*inputs: torch.Tensor) -> dict:
        calls[0] += 1
        if calls[0] <= warmup:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                out = update(*inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            return out
        if not static:
            device_lr(optimizer, device)
            static["inputs"] = [t.clone() for t in inputs]
            with torch.cuda.graph(graph):
                static["outputs"] = update(*static["inputs"])
        for static_input, t in zip(static["inputs"], inputs):
            static_input.copy_(t)
        graph.replay()
        return {name: t.clone() for name, t in static["outputs"].items()}
    return replay


def format_time(seconds: float) -> str:
    d, rest = divmod(int(seconds), 86400)
    h, m = divmod(rest // 60, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{int(seconds) % 60:02d}s"


def warn_if_slow(args: argparse.Namespace, model: torch.nn.Module, device: torch.device, total_steps: int) -> None:
    """The command people type first trains WRN-28-2 for 2^20 steps: on a CPU that takes months. Say so."""
    if device.type == "cpu" and total_steps > 10_000 and sum(p.numel() for p in model.parameters()) > 1_000_000:
        print(f"warning: {total_steps} steps of WRN-{args.depth}-{args.widen_factor} on the CPU take months (the ETA "
              "follows after 3 steps); for a CPU-sized run use the README's reduced CPU protocol: --depth 10 "
              "--widen-factor 1 --batch-size 32 --epochs 5 --steps-per-epoch 1000 --eval-every 1000", file=sys.stderr)


def stop_diverged(out: str, step: int, loss: float, ckpt_step: int | None) -> int:
    """A non-finite loss: say where, keep the last good checkpoint, leave diverged.json (compare.py reads it)."""
    kept = f"the checkpoint of step {ckpt_step} is kept" if ckpt_step is not None else "no checkpoint was written yet"
    write_json(os.path.join(out, "diverged.json"), {"step": step, "loss": str(loss), "checkpoint_step": ckpt_step})
    print(f"error: the training loss is {loss} at step {step}: the run diverged ({kept}; try a smaller --lr)",
          file=sys.stderr)
    return EXIT_DIVERGED


def stop_interrupted(step: int, ckpt_path: str) -> int:
    """Ctrl-C: say from which step a rerun resumes, read from the checkpoint on disk (the interrupt may have come
    between writing it and returning)."""
    try:
        ckpt_step = torch.load(ckpt_path, map_location="cpu", weights_only=True)["step"]
    except Exception:  # no checkpoint yet
        ckpt_step = None
    if ckpt_step is None:
        print(f"\ninterrupted at step {step}, before the first checkpoint: rerunning the command starts over",
              file=sys.stderr)
    else:
        print(f"\ninterrupted at step {step}; rerun the same command to resume from the checkpoint of step "
              f"{ckpt_step}", file=sys.stderr)
    return EXIT_INTERRUPTED


def catch_stop_signals(stack: contextlib.ExitStack) -> list[int]:
    """SIGTERM (a cluster's preemption or time limit; `kill`) and SIGUSR1 (which grid.sbatch asks SLURM to send
    two minutes before the time limit) only append their number to the list returned: the loop reads it after
    each step (no host sync), writes a checkpoint of that step and exits (stop_preempted). The previous handlers
    come back when `stack` closes (main called twice in one process, as the tests do)."""
    caught = []
    try:
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            stack.callback(signal.signal, signum, signal.signal(signum, lambda number, frame: caught.append(number)))
    except ValueError:  # main called in a thread other than the main one: only the main thread can catch signals
        pass
    return caught


def interval_state(ckpt: dict | None, device: torch.device) -> tuple[list | None, torch.Tensor | None, int, float]:
    """(names, sums, steps_summed, seconds) of the statistics summed since the last evaluation, as stop_preempted
    checkpointed them; none for a start from step 0, a checkpoint written at an evaluation, or an older one."""
    if ckpt is None or ckpt.get("sums") is None:
        return None, None, 0, 0.0
    return ckpt["names"], ckpt["sums"].to(device), ckpt["steps_summed"], ckpt["interval_s"]


def stop_preempted(signum: int, ckpt_path: str, step: int, elapsed: float, parts: dict, interval: tuple) -> int:
    """SIGTERM or SIGUSR1: checkpoint the step just done with the statistics summed since the last evaluation
    (`interval`: names, sums, steps_summed and the time they started, t_eval; a rerun continues them, see
    interval_state), and say in one line from which step a rerun resumes."""
    names, sums, steps_summed, t_eval = interval
    save_checkpoint(ckpt_path, {"step": step, "elapsed": elapsed, **training_state(parts), "names": names,
                                "sums": sums, "steps_summed": steps_summed, "interval_s": time.perf_counter() - t_eval})
    print(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written: rerun the same "
          f"command to resume from step {step}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
