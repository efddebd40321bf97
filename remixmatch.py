"""ReMixMatch: Semi-Supervised Learning with Distribution Alignment and Augmentation Anchoring.
Berthelot et al., ICLR 2020, arXiv 1911.09785.

The idea: MixMatch (mixmatch.py), with the guessed label taken from one weakly augmented view of each
unlabeled image (the anchor) and used as the target for K strongly augmented views of it (augmentation
anchoring). Before sharpening, the guess is multiplied by p(y) / p~(y), the labeled class distribution over
the model's running average prediction on unlabeled images, so that the predictions on unlabeled data
match the label distribution in aggregate (distribution alignment). Cross-entropy replaces the squared
error, and two extra losses on the first strong view stabilise training: its un-mixed cross-entropy with
the guess, and predicting its rotation (Sections 3.1-3.3, Algorithm 1).

    q_b    = Sharpen(Normalize(p(y | weak(u_b)) * p(y) / p~(y)), T)
    X^     = (weak(x_b), onehot(y_b)),     U^ = ((weak(u_b), q_b), (strong_k(u_b), q_b) for k = 1..K)
    X', U' = MixUp(X^_i, W_i),  MixUp(U^_i, W_(i+|X^|)),   W = Shuffle(Concat(X^, U^)),  as in MixMatch
    L   = L_x + ramp(step) * (lambda_u * L_u + lambda_u1 * L_u1) + lambda_rot * L_rot
    L_x   = 1/|X'|  sum_{(x, p) in X'}  H(p, p(y | x))
    L_u   = 1/|U'|  sum_{(u, q) in U'}  H(q, p(y | u))
    L_u1  = 1/B     sum_b  H(q_b, p(y | strong_1(u_b)))                                (pre-mixup loss)
    L_rot = 1/B     sum_b  H(r_b, p_rot(r | Rotate(strong_1(u_b), 90 r_b deg)))       (r_b in 0..3)

p~(y) is the mean of the model's predictions on the weak views over the last 128 batches; p(y) is the
class distribution of the labeled split. q_b comes from the model being trained, without gradient.
p_rot is a separate linear head on the network's pooled features (RotationHead).

Defaults are the paper's CIFAR-10 setting (Sections 3.3 and 4, and the reference code,
github.com/google-research/remixmatch, remixmatch_no_cta.py and cta/cta_remixmatch.py): B = 64 labeled and
64 unlabeled images, K = 8 strong views, T = 0.5, alpha = 0.75, lambda_u = 1.5, lambda_u1 = 0.5,
lambda_rot = 0.5; lambda_u and lambda_u1 (not lambda_rot, not L_x) ramp up linearly from 0 over the first
16,384 steps (the reference's warmup_kimg = 1,024 at B = 64); WRN-28-2, EMA 0.999, 2^20 steps. The
optimiser is, by default, the shared recipe of every script (fixmatch.py: SGD with Nesterov momentum
0.9, lr 0.03 with cosine decay, weight decay 5e-4 not on BatchNorm and biases), so that the algorithms are
compared under one recipe. `--optimizer adam` is the paper's own (the reference's, the same as MixMatch's):
Adam with a constant lr 0.002 and weight decay applied to the weights after every step, w <- w (1 - 0.02 lr).

Strong augmentation is the paper's CTAugment (Section 3.2.2, common.py), run as the reference runs it
(google-research/fixmatch libml/augment.py AugmentPoolCTA, cta/lib/train.py): the labeled images are weak + a CTA
policy (Algorithm 1 augments them strongly) and give a probe that the EMA model scores after every step, which
updates CTAugment's rates; each strong view is weak + a CTA policy of its own. --augment randaugment uses
common.strong_augment (RandAugment with random magnitudes + Cutout, as FixMatch) instead.

What differs from the paper:
- p(y) is computed once from the labeled split; the reference estimates it as a running average of the
  labeled batches' labels, which converges to the same distribution.
- The rotations are assigned by position (0, 90, 180, 270 degrees in turn), as the reference does, not
  drawn at random: the unlabeled batch is in random order, so each image still gets a random rotation.
- With --augment randaugment, the labeled images are weakly augmented by default (--labeled-aug weak), as in
  the PyTorch RandAugment-based implementations (TorchSSL, USB; remixmatch_no_cta.py is no precedent: its
  --augment d.d.d has no strong views at all). RandAugment at random magnitudes with Cutout has none of
  CTAugment's feedback from labeled probes, and with it on the labeled batch the labeled loss stays high and
  most of the pass that sets BatchNorm's statistics is strongly augmented. --labeled-aug strong is Algorithm 1
  with RandAugment (the README's ablation compares the two).
As in the reference, the weak view of every unlabeled image joins the K strong views in U^
(remixmatch_no_cta.py mixes all K + 1 views).

    python remixmatch.py --n-labeled 4000                      # the paper's setting on a CUDA GPU
    python remixmatch.py --n-labeled 250 --device cpu --depth 10 --widen-factor 1 --k-strong 2 --epochs 2 \\
        --steps-per-epoch 20
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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (CIFAR10_MEAN, CIFAR10_STD, DATASETS, MODEL_FILE_VERSION, NUM_CLASSES, DataError, RandomBatches,
                    WideResNet, check_data_args, check_device, labeled_split, load_dataset, normalize, parse_n_labeled,
                    cta_labeled_views, cta_probe, cta_rates, cta_strong_augment, strong_augment, weak_augment)

ALGORITHM = "remixmatch"


# ----------------------------------------------------------------------------------------------------
# Algorithm
# ----------------------------------------------------------------------------------------------------
def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T) over the last dimension (MixMatch, Section 3.2, eq. 7)."""
    p = p ** (1 / temperature)
    return p / p.sum(dim=-1, keepdim=True)


def labeled_distribution(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """p(y): the class frequencies of the labeled split."""
    return torch.bincount(labels, minlength=num_classes).float() / len(labels)


def distribution_alignment(probs: torch.Tensor, p_data: torch.Tensor, p_model: torch.Tensor) -> torch.Tensor:
    """Normalize(q * p(y) / p~(y)) for every row q of probs (Section 3.1): classes the model predicts more
    often than the labels occur are scaled down, rarer ones up; each row stays a distribution."""
    aligned = probs * (p_data / p_model)
    return aligned / aligned.sum(dim=-1, keepdim=True)


class PredictionHistory:
    """p~(y): the model's mean prediction on unlabeled images over the last `size` batches (Section 3.1,
    128 batches), kept as a ring buffer of batch means on the device. It starts as `size` uniform rows, like
    the reference's PMovingAverage; the order of the rows does not matter for their mean.
    """

    def __init__(self, num_classes: int, size: int, device: torch.device):
        self.buffer = torch.full((size, num_classes), 1.0 / num_classes, device=device)
        self.pos = 0

    def __call__(self) -> torch.Tensor:
        p = self.buffer.mean(dim=0)
        return p / p.sum()

    def update(self, probs: torch.Tensor) -> None:
        self.buffer[self.pos] = probs.mean(dim=0)  # a host integer index: no sync
        self.pos = (self.pos + 1) % len(self.buffer)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.copy_(state["buffer"])
        self.pos = state["pos"]


def guess_labels(logits_weak: torch.Tensor, p_data: torch.Tensor, p_model: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """The guessed label q_b = Sharpen(Normalize(p(y | weak(u_b)) p(y) / p~(y)), T) from the weak view's logits
    [B, C] (Algorithm 1): distribution alignment, then sharpening; without gradient."""
    probs = torch.softmax(logits_weak.detach().float(), dim=-1)
    return sharpen(distribution_alignment(probs, p_data, p_model), temperature)


def rotate_batch(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Image i of x [B, C, H, W] (square) rotated by r_i * 90 degrees counter-clockwise, r_i in 0..3."""
    rotations = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    return rotations[r, torch.arange(len(x), device=x.device)]


class RotationHead(nn.Linear):
    """p_rot: the rotation classifier, a linear head from the network's pooled features to the 4 rotations,
    beside the class head `fc` (initialised like the reference's classify_rot: Glorot-normal weights, zero
    bias). Attached to the network as `model.rot_head` before the EMA copy and the optimizer are made, it is
    trained, decayed (the reference decays its kernel too), averaged into the EMA, checkpointed (rot_head.weight
    and rot_head.bias in the model's state_dict) and moved with the rest."""

    def __init__(self, num_features: int):
        super().__init__(num_features, 4)  # nn.Linear's own initialisation first, then the reference's
        nn.init.xavier_normal_(self.weight)
        nn.init.zeros_(self.bias)


def sample_mixup(rng: np.random.Generator, n: int, alpha: float,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor,
          perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp of every example i with example perm[i] of the same pool, images and targets alike:
    l' = max(l, 1 - l), x'_i = l'_i x_i + (1 - l'_i) x_perm[i] (MixMatch, Section 3.3, eqs. 8-11).

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
    """Logits for each part, from one forward pass over the len(parts) interleaved batches (each holds a slice of
    every part) in which BatchNorm normalises each batch with its own statistics (common.ghost_batch_norm).

    Why BatchNorm needs this: the reference sends the mixed labeled batch and the K + 1 mixed unlabeled
    batches through the network in separate forward passes of B images, in training mode, so every pass
    is normalised with its own batch statistics; and it keeps the running-statistics update of one pass
    only (the last; the guessing, pre-mixup and rotation passes update nothing; our interleaved batches are
    all the same mix, so we keep the first). Passed as they are, the labeled pass would be normalised with
    statistics of (mostly) labeled images, the unlabeled passes with statistics of unlabeled ones, and the
    running statistics used at test time would come from the labeled pass alone (MixMatch's reference)
    or from an unlabeled one (ReMixMatch's). The reference's interleave swaps slices between
    the batches so that each pass holds one slice of labeled images and the rest unlabeled, the proportion
    of the whole; ours goes one step further, every batch holds a slice of every part. We keep the reference's
    statistics per batch of about B images and its single running-statistics update (the first batch's) in one
    pass, which computes the logits and gradients of a pass per batch (to float rounding) and keeps a GPU busier.
    """
    batches = interleave(parts)
    sizes = [len(batch) for batch in batches]
    with torch.autocast(batches[0].device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(torch.cat(batches).contiguous(memory_format=torch.channels_last), bn_groups=sizes)
    return deinterleave(list(logits.split(sizes)))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1/N sum_n H(targets_n, softmax(logits_n)) for soft targets [N, C]: L_x, L_u and L_u1 (Section 3.3)."""
    return F.cross_entropy(logits.float(), targets)


def linear_rampup(step: int, rampup_steps: int) -> float:
    """The factor of lambda_u and lambda_u1 at (0-based) step: step / rampup_steps, then 1 (the reference's
    clip(step / warmup, 0, 1) on w_match and w_kl; w_rot is not ramped)."""
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
def train_step(model, optimizer, x_l, y_l, u, step: int, p_data, p_model, rngs: tuple, args, amp: bool,
               mean_std: tuple = (CIFAR10_MEAN, CIFAR10_STD), rates=None) -> tuple[dict, torch.Tensor, tuple | None]:
    """One ReMixMatch step, the whole of Algorithm 1, at (0-based) step `step` on the labeled images x_l and the
    unlabeled images u [B, ...], both uint8 and not yet augmented: the views, label guessing with distribution
    alignment (p_data, the labeled class distribution; p_model, the PredictionHistory, updated here), MixUp, the
    four losses and the update. rngs = (aug_generator, mixup_rng) draw the augmentations and the MixUp draws.
    Returns the step's statistics by name (tensors on the device: no host sync), and the guessed labels q [B, C],
    whose accuracy (of argmax q) the loop measures. mean_std is the data set's (mean, std) for normalize. With
    --augment ctaugment, `rates` are CTAugment's, and the step also returns the probe that cta_probe scores."""
    aug_generator, mixup_rng = rngs
    k, b, cta = args.k_strong, len(u), args.augment == "ctaugment"
    # Augmentation anchoring's views: a weak anchor and K strong views of every unlabeled image. The labeled
    # images: with CTAugment weak + CTA, and a probe (AugmentPoolCTA); with RandAugment weak by default, as in
    # every RandAugment-based reference (see the docstring).
    augment_labeled = strong_augment if args.labeled_aug == "strong" else weak_augment
    x_l = augment_labeled(x_l, aug_generator)
    x_l, probe = cta_labeled_views(x_l, rates, aug_generator) if cta else (x_l, None)
    x_uw = weak_augment(u, aug_generator)
    x_us = (cta_strong_augment(u, rates, aug_generator, views=k) if cta
            else strong_augment(u, aug_generator, views=k))  # [K, B, ...]
    lam, perm = sample_mixup(mixup_rng, (k + 2) * b, args.alpha, u.device)  # MixUp over X^ and the K + 1 views
    ramp = linear_rampup(step, args.rampup_steps)
    # Label guessing on the weak view in training mode, as the reference, leaving BatchNorm's running statistics alone.
    with (torch.no_grad(), frozen_bn_statistics(model),
          torch.autocast(x_uw.device.type, dtype=torch.bfloat16, enabled=amp)):
        logits_uw = model(normalize(x_uw, *mean_std).contiguous(memory_format=torch.channels_last))
    q = guess_labels(logits_uw, p_data, p_model(), args.temperature)
    p_model.update(torch.softmax(logits_uw.float(), dim=1))  # after use: this batch counts from the next step on
    # The first strong view, un-mixed (pre-mixup loss) and rotated (rotation loss): passes of their own with
    # gradient, as in the reference. Rotations by position: 0, 90, 180, 270, 0, ... degrees.
    r = torch.arange(b, device=x_us.device) % 4
    with frozen_bn_statistics(model), torch.autocast(x_us.device.type, dtype=torch.bfloat16, enabled=amp):
        logits_u1 = model(normalize(x_us[0], *mean_std).contiguous(memory_format=torch.channels_last))
        rotated = normalize(rotate_batch(x_us[0], r), *mean_std).contiguous(memory_format=torch.channels_last)
        logits_rot = model.rot_head(model.features(rotated))
    x = normalize(torch.cat([x_l, x_uw, x_us.flatten(0, 1)]), *mean_std)  # X^ then U^, view by view
    targets = torch.cat([F.one_hot(y_l, q.shape[1]).float(), q.repeat(k + 1, 1)])
    x_mix, targets_mix = mixup(x, targets, lam, perm)
    logits = forward_interleaved(model, list(x_mix.split(b)), amp)
    loss_x = soft_cross_entropy(logits[0], targets_mix[:b])
    loss_u = soft_cross_entropy(torch.cat(logits[1:]), targets_mix[b:])
    loss_u1 = soft_cross_entropy(logits_u1, q)
    loss_rot = F.cross_entropy(logits_rot.float(), r)
    loss = loss_x + ramp * (args.lambda_u * loss_u + args.lambda_u1 * loss_u1) + args.lambda_rot * loss_rot
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    stats = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_u1": loss_u1.detach(),
             "loss_rot": loss_rot.detach(), "ramp": torch.full_like(loss, ramp)}
    return stats, q, probe


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
    model.rot_head = RotationHead(model.num_features)  # attached before the EMA copy and the optimizer are made
    model = model.to(device, memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model)
    optimizer = make_optimizer(model, args, device)
    forward = torch.compile(model) if args.compile else model
    # Index streams over the labeled subset and over all training images (the unlabeled set includes the
    # labeled ones, as in the paper, and a folder's unlabeled/ images);
    # augmentation parameters and MixUp draws come from their own generators.
    labeled_batches = RandomBatches(labeled.to(device), args.batch_size, seed=args.seed)
    unlabeled_batches = RandomBatches(torch.arange(len(train_x), device=device), args.batch_size, seed=args.seed + 1)
    aug_generator = torch.Generator().manual_seed(args.seed + 2)
    mixup_rng = np.random.default_rng(args.seed + 3)
    cta, rates = args.augment == "ctaugment", cta_rates()  # CTAugment's rates, on the host (common.py)
    # Distribution alignment: p(y) from the labeled split, p~(y) from the model's recent predictions.
    p_data = labeled_distribution(train_y[labeled.to(device)], data["num_classes"])
    p_model = PredictionHistory(data["num_classes"], args.da_batches, device)

    # ---- Resume and the loop: the same in every script, but for the parts listed and the step itself ----
    total_steps = args.epochs * args.steps_per_epoch
    warn_if_slow(args, model, device, total_steps)
    # Everything a checkpoint saves and a resume restores, besides the step and the time spent.
    parts = {"model": model, "ema_model": ema_model, "optimizer": optimizer, "labeled_batches": labeled_batches,
             "unlabeled_batches": unlabeled_batches, "aug_generator": aug_generator, "mixup_rng": mixup_rng,
             "p_model": p_model, **({"cta_rates": rates} if cta else {})}
    step, elapsed, ckpt_step = 0, 0.0, None
    ckpt_path, metrics_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "metrics.jsonl")
    if ckpt is not None:
        restore_training_state(parts, ckpt)
        step, elapsed, ckpt_step = ckpt["step"], ckpt["elapsed"], ckpt["step"]
        print(f"resuming {args.out} from step {step}")
    # metrics.jsonl holds exactly the checkpoint's rows: rows written after it and a half-written line go.
    metrics = read_metrics(metrics_path, step)
    write_metrics(metrics_path, metrics)

    # Images through the network per step: the weak view (forward only), the first strong view un-mixed and
    # rotated, then the labeled batch and all K + 1 views again, mixed (forward and backward).
    images_per_step = args.batch_size * (5 + args.k_strong + cta)  # CTA: + the probe (forward only)
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
            # Adam: constant, as in the paper
            lr = cosine_lr(step, total_steps, args.lr) if args.optimizer == "sgd" else args.lr
            set_lr(optimizer, lr)
            idx_l, idx_u = labeled_batches(), unlabeled_batches()
            # index_select: x[idx] is ~15x slower for this on CPU
            x_l, u = train_x.index_select(0, idx_l), train_x.index_select(0, idx_u)
            step_stats, q, probe = train_step(forward, optimizer, x_l, train_y[idx_l], u, step, p_data, p_model,
                                              (aug_generator, mixup_rng), args, amp, mean_std, rates)
            ema_update(ema_model, model, args.ema_decay)
            if cta:  # CTAugment's feedback, after the step and the EMA update: the EMA model's probe predictions
                rates.copy_(cta_probe(ema_model, probe, train_y[idx_l], rates, amp, mean_std))
            stats = {**step_stats, **pseudo_label_stats(q.argmax(dim=1), None, train_y[idx_u])}
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
                      f"(x {mean['loss_x']:.3f}, u {mean['loss_u']:.3f}, u1 {mean['loss_u1']:.3f}, "
                      f"rot {mean['loss_rot']:.3f}) | ramp {mean['ramp']:.2f} "
                      f"| guess-acc {mean['pseudo_acc'] or 0:.2f} | lr {lr:.4f} "
                      f"| {steps_summed * images_per_step / (now - t_eval):.0f} img/s | ETA {format_time(eta)}",
                      flush=True)
                next_line = now + PROGRESS_SECONDS

            if step % args.eval_every == 0 or step == total_steps:
                row = {"step": step, "epoch": step / args.steps_per_epoch, "lr": lr,
                       **summarize(names, sums, steps_summed),
                       "img_per_s": steps_summed * images_per_step / (time.perf_counter() - t_eval)}
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
                   "(balanced over classes; 250/4000 in the paper), or 'all': every training image with a label")
    p.add_argument("--batch-size", type=int, default=64,
                   help="labeled batch size B (the unlabeled batch is B images too)")
    p.add_argument("--k-strong", type=int, default=8, help="K: strongly augmented views of each unlabeled image "
                   "trained towards the label guessed on its weak view")
    p.add_argument("--temperature", type=float, default=0.5, help="sharpening temperature T of the guessed labels")
    p.add_argument("--alpha", type=float, default=0.75, help="MixUp: lambda ~ Beta(alpha, alpha), one per example")
    p.add_argument("--lambda-u", type=float, default=1.5,
                   help="weight of the mixed unlabeled cross-entropy once ramped up")
    p.add_argument("--lambda-u1", type=float, default=0.5,
                   help="weight of the pre-mixup loss on the first strong view once ramped up")
    p.add_argument("--lambda-rot", type=float, default=0.5, help="weight of the rotation loss (not ramped)")
    p.add_argument("--rampup-steps", type=int, default=16384,
                   help="lambda_u and lambda_u1 ramp up linearly from 0 over this many steps")
    p.add_argument("--augment", choices=["ctaugment", "randaugment"], default="ctaugment", help="strong "
                   "augmentation: CTAugment, the paper's (the labeled batch weak + CTA, as google-research/fixmatch's "
                   "AugmentPoolCTA), or RandAugment + Cutout (common.strong_augment)")
    p.add_argument("--labeled-aug", choices=["weak", "strong"], default="weak",
                   help="with --augment randaugment, the labeled batch's augmentation: weak (flip + shift, as every "
                   "RandAugment-based reference) or strong (RandAugment + Cutout, Algorithm 1 with RandAugment)")
    p.add_argument("--da-batches", type=int, default=128, help="distribution alignment: p~(y) averages the "
                   "predictions of this many recent batches")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="sgd: the shared recipe of all scripts "
                   "(Nesterov, cosine lr decay); "
                   "adam: the paper's (constant lr, weight decay w <- w (1 - wd lr) every step)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate; None means 0.03 with --optimizer sgd, 0.002 with adam")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (not on BatchNorm parameters and "
                   "biases); None means 5e-4 with sgd, 0.02 with adam")
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
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the labeled split, the initialisation, the batches and the MixUp draws")
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
    args = p.parse_args(argv)
    run_name = ALGORITHM if args.dataset == "cifar10" else f"{ALGORITHM}_{args.dataset}"
    args.out = getattr(args, "out", None) or os.path.join("runs", f"{run_name}_n{args.n_labeled}_seed{args.seed}")
    if args.lr is None:
        args.lr = {"sgd": 0.03, "adam": 0.002}[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = {"sgd": 5e-4, "adam": 0.02}[args.optimizer]
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible settings with one line (DataError -> exit status 2)."""
    check_data_args(args.dataset, args.n_labeled, args.image_size)  # before any data is read or downloaded
    checks = [
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.k_strong >= 1, f"--k-strong must be >= 1, got {args.k_strong}"),
        (args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (args.alpha > 0, f"--alpha must be > 0, got {args.alpha}"),
        (min(args.lambda_u, args.lambda_u1, args.lambda_rot) >= 0,
         "--lambda-u, --lambda-u1 and --lambda-rot must be >= 0"),
        (args.rampup_steps >= 0, f"--rampup-steps must be >= 0, got {args.rampup_steps}"),
        (args.da_batches >= 1, f"--da-batches must be >= 1, got {args.da_batches}"),
        (args.augment == "randaugment" or args.labeled_aug == "weak", "--labeled-aug strong needs --augment "
         "randaugment (with ctaugment the labeled batch is always weak + CTA, as the reference's)"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (min(args.epochs, args.steps_per_epoch, args.eval_every, args.log_every) >= 1,
         "--epochs, --steps-per-epoch, --eval-every and --log-every must be >= 1"),
        (args.depth >= 10 and (args.depth - 4) % 6 == 0,
         f"--depth must be 6n+4 (10, 16, 22, 28, ...), got {args.depth}"),
        (args.widen_factor >= 1, f"--widen-factor must be >= 1, got {args.widen_factor}"),
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
