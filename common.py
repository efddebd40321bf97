"""Shared code for every script: CIFAR-10 on the device, the labeled split, batched augmentation, WideResNet.

Nothing about any semi-supervised algorithm lives here: each algorithm script reads top to bottom on its
own and imports only these building blocks.

- Data: the "CIFAR-10 python version" pickles read straight into uint8 tensors (no md5 check, so
  re-encoded copies load). The whole set lives on the training device; batches are drawn by index.
- Split: `labeled_split` picks a balanced, seeded labeled subset. The unlabeled set is all 50,000
  training images, labeled ones included, as in the papers.
- Augmentation: `weak_augment` (flip + translate, FixMatch's "weak") and `strong_augment` (weak +
  RandAugment with a random magnitude per op + Cutout, FixMatch's "strong"), batched and random per
  image. Every RandAugment op is one of three kinds, which is what makes a per-image policy cheap on a
  whole batch: a per-channel lookup table (AutoContrast, Equalize, Posterize, Solarize, Identity), a
  blend with a degenerate image (Brightness, Color, Contrast, Sharpness), or an affine warp (Rotate,
  ShearX/Y, TranslateX/Y). Each op reproduces Pillow's result for the same image and magnitude.
  The RandAugment variant: both ops are always applied, as in TorchSSL and USB, each with a magnitude drawn
  uniformly from the FixMatch paper's range (Table 12). google-research/fixmatch (libml/augment.py,
  AugmentPoolRAM) and kekmodel/FixMatch-pytorch (RandAugmentMC) apply each op with probability 0.5, so about
  a quarter of their images get no op at all: this project's strong augmentation is harsher than theirs.
- Model: WideResNet as in the FixMatch reference (WRN-28-2 by default, 1,467,610 parameters).
"""

import os
import pickle
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
# Per-channel mean and std of the CIFAR-10 training images, on the 0..1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class DataError(Exception):
    """Bad input the user can fix (missing or broken data, impossible split). Scripts print it and exit 2."""


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def _read_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 pickle -> (uint8 images [N, 3, 32, 32], int64 labels [N]); DataError if it is not one."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data, labels = entry[b"data"], entry[b"labels"]
        images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(labels, dtype=torch.int64)
    except Exception as e:  # pickle raises many kinds of errors on a truncated or garbled file
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                        "delete the folder to download it again, or point --data-dir at a good copy") from None
    if len(images) != len(labels) or len(images) == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{path} is not a valid CIFAR-10 batch ({len(images)} images, {len(labels)} labels)")
    return images, labels


def load_cifar10(data_dir: str, download: bool = True) -> dict[str, torch.Tensor]:
    """Read <data_dir>/cifar-10-batches-py/ into {train_x, train_y, test_x, test_y} (uint8 NCHW, int64).

    Missing files are downloaded with torchvision into data_dir when `download` is set.
    """
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    missing = [f for f in TRAIN_FILES + TEST_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing and download:
        created = not os.path.exists(data_dir)
        try:
            from torchvision.datasets import CIFAR10
            CIFAR10(root=data_dir, train=True, download=True)
        except Exception as e:
            if created:  # leave no empty or half-downloaded folder behind: it would look like a data set
                shutil.rmtree(data_dir, ignore_errors=True)
            raise DataError(f"CIFAR-10 not found in {folder} and the download failed ({type(e).__name__}); "
                            "pass --data-dir pointing at a folder that holds cifar-10-batches-py/") from None
        missing = [f for f in TRAIN_FILES + TEST_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"CIFAR-10 not found in {folder} (missing {', '.join(missing)}); "
                        "pass --data-dir pointing at a folder that holds cifar-10-batches-py/")
    out = {}
    for split, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        parts = [_read_batch(os.path.join(folder, f)) for f in files]
        out[f"{split}_x"] = torch.cat([p[0] for p in parts])
        out[f"{split}_y"] = torch.cat([p[1] for p in parts])
    return out


def labeled_split(labels: torch.Tensor, n_labeled: int, seed: int) -> torch.Tensor:
    """Sorted indices of a balanced labeled subset: exactly n_labeled, per-class counts differ by <= 1.

    A pure function of (labels, n_labeled, seed). When n_labeled is not a multiple of 10, the classes
    that get one extra image are drawn with the same seed.
    """
    if not NUM_CLASSES <= n_labeled <= len(labels):
        raise DataError(f"--n-labeled must be between {NUM_CLASSES} and {len(labels)} (the training set), "
                        f"got {n_labeled}")
    g = torch.Generator().manual_seed(seed)
    per_class = torch.full((NUM_CLASSES,), n_labeled // NUM_CLASSES, dtype=torch.int64)
    per_class[torch.randperm(NUM_CLASSES, generator=g)[: n_labeled % NUM_CLASSES]] += 1
    chosen = []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class[c]:
            raise DataError(f"class {c} has {len(idx)} training images, fewer than the {int(per_class[c])} "
                            f"a balanced split of {n_labeled} needs")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[: per_class[c]]])
    return torch.cat(chosen).sort().values


class RandomBatches:
    """An endless stream of index batches over `indices`: epochs without replacement, reshuffled each epoch.

    Shuffling runs on the indices' device with its own generator, so drawing a batch never waits for the
    host; `state_dict`/`load_state_dict` make the continuation after a resume exact.
    """

    def __init__(self, indices: torch.Tensor, batch_size: int, seed: int):
        self.indices, self.batch_size = indices, batch_size
        self.generator = torch.Generator(device=indices.device).manual_seed(seed)
        self.perm, self.pos = self._shuffle(), 0

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(len(self.indices), generator=self.generator, device=self.indices.device)

    def __call__(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need > 0:  # a batch larger than the set spans several epochs
            if self.pos == len(self.perm):
                self.perm, self.pos = self._shuffle(), 0
            take = min(need, len(self.perm) - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        return self.indices[torch.cat(parts)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm.cpu(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"].to(self.indices.device), state["pos"]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float, standardized per channel (the network's input)."""
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


# ----------------------------------------------------------------------------------------------------
# Augmentation primitives. Images are uint8 [B, 3, H, W] (float with integer values works too); per-image
# parameters are [B] tensors (or scalars) on the images' device.
# ----------------------------------------------------------------------------------------------------
def _per_sample(v, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """A scalar or [B] parameter -> a [B] tensor on x's device."""
    return torch.as_tensor(v, dtype=dtype, device=x.device).expand(x.shape[0])


def _identity_lut(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(256, device=x.device, dtype=torch.float64).expand(x.shape[0], x.shape[1], 256)


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map every pixel through a per-image, per-channel lookup table lut [B, 3, 256]."""
    b, c, h, w = x.shape
    return lut.to(x.dtype).gather(2, x.reshape(b, c, h * w).long()).reshape(b, c, h, w)


def autocontrast_lut(x: torch.Tensor, v=None) -> torch.Tensor:
    """PIL ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255] (identity if constant)."""
    flat = x.reshape(*x.shape[:2], -1)
    lo, hi = flat.amin(2, keepdim=True).double(), flat.amax(2, keepdim=True).double()
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # not 255 / t: torch computes that as 255 * (1/t)
    # Pillow truncates toward zero; floor differs only below 0, which the clamp maps to 0 either way (and
    # floor is vectorised for float64 on CPU, trunc is not: 0.19 ms against 0.01 ms here).
    lut = (_identity_lut(x) * scale - lo * scale).floor().clamp(0, 255)
    return torch.where(hi > lo, lut, _identity_lut(x))


def equalize_lut(x: torch.Tensor, v=None) -> torch.Tensor:
    """PIL ImageOps.equalize: map each channel through its cumulative histogram.

    Pillow's rule: step = (pixels - count of the last non-empty bin) // 255, lut[i] = (step // 2 +
    pixels below i) // step, identity when step is 0 (Pillow before 10 divided by 256).
    """
    b, c = x.shape[:2]
    flat = x.reshape(b * c, -1).long()  # a scatter, not torch.bincount: on CUDA, bincount reads its input's max back
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    hist = hist.reshape(b, c, 256)
    last = 255 - (hist > 0).flip(2).long().argmax(2, keepdim=True)
    step = (hist.sum(2, keepdim=True) - hist.gather(2, last)) // 255
    below = hist.cumsum(2) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(0, 255).double()
    return torch.where(step > 0, lut, _identity_lut(x))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 luma in fixed point, rounded), [B, 1, H, W]."""
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).to(x.dtype)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.SMOOTH: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13, rounded; the 1-px border is copied."""
    f = x.float()
    rows = f[:, :, :-2] + f[:, :, 1:-1] + f[:, :, 2:]  # box sums by shifted adds: a depthwise conv is slower on CPU
    box = rows[:, :, :, :-2] + rows[:, :, :, 1:-1] + rows[:, :, :, 2:]
    out = f.clone()
    out[:, :, 1:-1, 1:-1] = torch.floor((box + 4 * f[:, :, 1:-1, 1:-1]) / 13 + 0.5).clamp(0, 255)
    return out.to(x.dtype)


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor) -> torch.Tensor:
    """PIL Image.blend(degenerate, x, factor): degenerate + factor * (x - degenerate), clipped, truncated.

    This is ImageEnhance's `enhance(factor)`: factor 1 returns x, factor 0 the degenerate image.
    """
    f = _per_sample(factor, x, torch.float32).view(-1, 1, 1, 1)
    d = degenerate.float()
    return (d + f * (x.float() - d)).clamp(0, 255).floor().to(x.dtype)


def warp(x: torch.Tensor, matrix: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """PIL Image.transform(size, AFFINE, matrix, NEAREST) with matrix [B, 6] = (a, b, c, d, e, f).

    Output pixel (row i, column j) takes the input pixel under (a*(j+.5) + b*(i+.5) + c,
    d*(j+.5) + e*(i+.5) + f), floored; pixels from outside the image get `fill` (PIL's default, black).
    The arithmetic is Pillow's, so that sample points that fall exactly on a pixel edge land where they
    land in Pillow: 16.16 fixed point for a general matrix (Geometry.c, affine_fixed), floating point for
    a pure translation (Pillow's scale path).
    """
    bsz, ch, h, w = x.shape
    a, b, c, d, e, f = matrix.double().view(bsz, 6, 1, 1).unbind(1)
    i = torch.arange(h, device=x.device, dtype=torch.int64).view(1, h, 1)
    j = torch.arange(w, device=x.device, dtype=torch.int64).view(1, 1, w)

    def fix(t):  # to 16.16 fixed point, rounded as Pillow's FIX()
        return torch.floor(t * 65536 + 0.5).long()

    # The sample point of pixel (0, 0). A pure translation takes Pillow's floating-point path, which floors
    # offset + j: the same as fixed point with the offset floored first.
    ox, oy = c + 0.5 * a + 0.5 * b, f + 0.5 * d + 0.5 * e
    translation = (b == 0) & (d == 0)
    ox = torch.where(translation, torch.floor(ox).long() << 16, fix(ox))
    oy = torch.where(translation, torch.floor(oy).long() << 16, fix(oy))
    u = (ox + i * fix(b) + j * fix(a)) >> 16  # source column
    v = (oy + i * fix(e) + j * fix(d)) >> 16  # source row
    # Source pixels outside the image read an extra pixel of value `fill` appended after the last one.
    inside = (u == u.clamp(0, w - 1)) & (v == v.clamp(0, h - 1))
    src = (h * w + inside * (v * w + u - h * w)).view(bsz, 1, h * w).expand(bsz, ch, h * w)
    padded = torch.cat([x.reshape(bsz, ch, h * w), torch.full((bsz, ch, 1), fill, dtype=x.dtype, device=x.device)], 2)
    return padded.gather(2, src).reshape(bsz, ch, h, w)


def _affine(x: torch.Tensor, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> torch.Tensor:
    """Per-image affine matrices [B, 6] from scalars or [B] tensors."""
    return torch.stack([_per_sample(v, x) for v in (a, b, c, d, e, f)], 1)


# ----------------------------------------------------------------------------------------------------
# The 14 RandAugment ops. Each is one of three kinds, and its function returns, for images x and one
# value v per image, the argument of its kind: a lookup table for `apply_lut`, a degenerate image for
# `blend` (v is the enhance factor), or an affine matrix for `warp`. `apply_op` runs one op.
# ----------------------------------------------------------------------------------------------------
def identity_lut(x, v):
    return _identity_lut(x)


def posterize_lut(x, bits):
    """PIL ImageOps.posterize(x, int(bits)): keep the top bits of every value."""
    shift = 2 ** (8 - torch.floor(_per_sample(bits, x)).clamp(max=8)).view(-1, 1, 1)  # a draw can round up to 9
    return torch.floor(_identity_lut(x) / shift) * shift


def solarize_lut(x, threshold):
    """PIL ImageOps.solarize(x, int(threshold)): invert every value at or above the threshold."""
    lut = _identity_lut(x)
    return torch.where(lut < torch.floor(_per_sample(threshold, x)).view(-1, 1, 1), lut, 255 - lut)


def brightness_degenerate(x, v):
    """PIL ImageEnhance.Brightness blends with black."""
    return torch.zeros_like(x)


def color_degenerate(x, v):
    """PIL ImageEnhance.Color blends with the grayscale image."""
    return grayscale(x).expand_as(x)


def contrast_degenerate(x, v):
    """PIL ImageEnhance.Contrast blends with the image's mean gray level (rounded), everywhere."""
    mean = torch.floor(grayscale(x).double().mean((1, 2, 3), keepdim=True) + 0.5)
    return mean.to(x.dtype).expand_as(x)


def sharpness_degenerate(x, v):
    """PIL ImageEnhance.Sharpness blends with the smoothed image."""
    return smooth(x)


def rotate_matrix(x, degrees):
    """PIL Image.rotate(degrees): counter-clockwise about the image centre (black corners)."""
    h, w = x.shape[2:]
    angle = -torch.deg2rad(_per_sample(degrees, x))
    cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)  # as PIL
    cx, cy = w / 2, h / 2
    return _affine(x, cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def shear_x_matrix(x, s):
    return _affine(x, b=s)


def shear_y_matrix(x, s):
    return _affine(x, d=s)


def translate_x_matrix(x, fraction):
    return _affine(x, c=_per_sample(fraction, x) * x.shape[3])


def translate_y_matrix(x, fraction):
    return _affine(x, f=_per_sample(fraction, x) * x.shape[2])


# FixMatch's RandAugment pool: name -> (kind, function, low, high); each op's value is drawn uniformly
# from [low, high] (FixMatch paper, arXiv 2001.07685, Table 12; the same ranges as TorchSSL/USB).
# Ops of one kind are listed together, so that sorting a batch by op also groups it by kind.
RANDAUGMENT_OPS = {
    "Identity": ("lut", identity_lut, 0, 0),
    "AutoContrast": ("lut", autocontrast_lut, 0, 0),
    "Equalize": ("lut", equalize_lut, 0, 0),
    "Posterize": ("lut", posterize_lut, 4, 9),                   # bits kept, floored: 4..8 equally often
    "Solarize": ("lut", solarize_lut, 0, 256),                   # threshold, floored (the paper's T x 256)
    "Brightness": ("blend", brightness_degenerate, 0.05, 0.95),  # enhance factor: 0 = black, 1 = unchanged
    "Color": ("blend", color_degenerate, 0.05, 0.95),            # 0 = grayscale
    "Contrast": ("blend", contrast_degenerate, 0.05, 0.95),      # 0 = flat mean gray
    "Sharpness": ("blend", sharpness_degenerate, 0.05, 0.95),    # 0 = smoothed
    "Rotate": ("warp", rotate_matrix, -30, 30),                  # degrees
    "ShearX": ("warp", shear_x_matrix, -0.3, 0.3),
    "ShearY": ("warp", shear_y_matrix, -0.3, 0.3),
    "TranslateX": ("warp", translate_x_matrix, -0.3, 0.3),       # fraction of the image size
    "TranslateY": ("warp", translate_y_matrix, -0.3, 0.3),
}
OP_NAMES = list(RANDAUGMENT_OPS)


def _apply_kind(kind: str, x: torch.Tensor, arg: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if kind == "lut":
        return apply_lut(x, arg)
    if kind == "blend":
        return blend(arg, x, v)
    return warp(x, arg)


def apply_op(name: str, x: torch.Tensor, v) -> torch.Tensor:
    """Apply RandAugment op `name` to images x with value v (a scalar or one per image, in the op's units)."""
    kind, fn, _, _ = RANDAUGMENT_OPS[name]
    v = _per_sample(v, x)
    return _apply_kind(kind, x, fn(x, v), v)


def cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int = 16, fill: int = 127) -> torch.Tensor:
    """Gray out a size x size square centred at (cy, cx) per image, clipped at the border (FixMatch's Cutout)."""
    h, w = x.shape[2:]
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    cy, cx = cy.view(-1, 1, 1), cx.view(-1, 1, 1)
    box = ((rows >= cy - size // 2) & (rows < cy + size // 2)) & ((cols >= cx - size // 2) & (cols < cx + size // 2))
    box = box.unsqueeze(1).to(x.dtype)
    return x * (1 - box) + box * fill  # arithmetic, not where/masked_fill: those are ~15x slower on uint8 on CPU


def flip_translate(x: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Horizontal flip where `flip`, then shift by (dy, dx) pixels with reflect padding, per image.

    The same as reflect-padding and cropping at offset (pad + dy, pad + dx), done as one gather.
    """
    b, c, h, w = x.shape

    def reflect(i, n):  # reflect padding without repeating the edge: -1 -> 1, n -> n - 2
        return torch.where(i < 0, -i, torch.where(i >= n, 2 * (n - 1) - i, i))

    rows = reflect(torch.arange(h, device=x.device).view(1, h) + dy.view(-1, 1), h)
    cols = reflect(torch.arange(w, device=x.device).view(1, w) + dx.view(-1, 1), w)
    cols = torch.where(flip.view(-1, 1), w - 1 - cols, cols)
    src = (rows.view(b, h, 1) * w + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, src).reshape(b, c, h, w)


# ----------------------------------------------------------------------------------------------------
# Weak and strong augmentation. Their random parameters (a few numbers per image) are drawn on the host
# from a CPU generator and sent to the device without a sync: the same seed gives the same
# augmentations on CPU and GPU, the generator state is easy to checkpoint, and the host knows which
# images drew which op, so each op runs on its own images only.
# ----------------------------------------------------------------------------------------------------
def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def weak_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """FixMatch's weak augmentation: random horizontal flip, random translation by up to 4 px (12.5%)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    shift = torch.randint(-max_shift, max_shift + 1, (2, b), generator=generator)
    flip, shift = _to_device(flip, x.device), _to_device(shift, x.device)
    return flip_translate(x, flip, shift[0], shift[1])


def randaugment(x: torch.Tensor, generator: torch.Generator, n_ops: int = 2) -> torch.Tensor:
    """RandAugment with random magnitudes: n_ops ops per image, each drawn uniformly from the 14-op pool
    (with replacement, independently for every image) with a value drawn uniformly from its range. Every
    drawn op is applied (TorchSSL, USB), not with probability 0.5 as in google-research/fixmatch."""
    b = x.shape[0]
    for _ in range(n_ops):
        op = torch.randint(0, len(OP_NAMES), (b,), generator=generator)
        u = torch.rand(b, generator=generator, dtype=torch.float64)
        order = torch.argsort(op, stable=True)  # images grouped by op; the host knows each group's size
        counts = torch.bincount(op, minlength=len(OP_NAMES)).tolist()
        back = torch.argsort(order)  # grouped position -> the image's own position
        order, back, u = (_to_device(t, x.device) for t in (order, back, u[order]))
        grouped, out, start = x.index_select(0, order), torch.empty_like(x), 0
        # Ops of one kind are adjacent in OP_NAMES, so each kind is one block of `grouped`: one lookup,
        # one blend and one warp per round, whatever mix of ops the images drew.
        for kind in ("lut", "blend", "warp"):
            args, values, end = [], [], start
            for (op_kind, fn, lo, hi), n in zip(RANDAUGMENT_OPS.values(), counts):
                if op_kind == kind and n:
                    values.append(lo + (hi - lo) * u[end:end + n])
                    args.append(fn(grouped[end:end + n], values[-1]))
                    end += n
            if end > start:
                out[start:end] = _apply_kind(kind, grouped[start:end], torch.cat(args), torch.cat(values))
            start = end
        x = out.index_select(0, back)
    return x


def strong_augment(x: torch.Tensor, generator: torch.Generator, n_ops: int = 2, cutout_size: int = 16) -> torch.Tensor:
    """FixMatch's strong augmentation: weak, then RandAugment (2 random ops with random magnitudes per
    image), then Cutout (a 16 px gray square at a random position)."""
    x = randaugment(weak_augment(x, generator), generator, n_ops)
    centre = _to_device(torch.randint(0, x.shape[2], (2, x.shape[0]), generator=generator), x.device)
    return cutout(x, centre[0], centre[1], cutout_size)


# ----------------------------------------------------------------------------------------------------
# WideResNet (Zagoruyko & Komodakis 2016), as in the FixMatch reference (libml/models.py)
# ----------------------------------------------------------------------------------------------------
def _bn(channels: int) -> nn.BatchNorm2d:
    # TF's momentum 0.999 is PyTorch's 0.001: running statistics move slowly, which is why early
    # evaluations of a fresh model look poor.
    return nn.BatchNorm2d(channels, momentum=0.001)


class ResidualBlock(nn.Module):
    """Pre-activation block: BN -> leaky ReLU -> conv3x3 -> BN -> leaky ReLU -> conv3x3, plus shortcut.

    With `activate_before_residual` (first block of the network) the shortcut also takes the activated
    input, as in the reference; a 1x1 conv shortcut is used where the width or resolution changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool = False):
        super().__init__()
        self.bn1, self.conv1 = _bn(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = _bn(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if (c_in != c_out or stride != 1) else None
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.leaky_relu(self.bn1(x), 0.1)
        if self.activate_before_residual:
            x = a
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(a)), 0.1))
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: conv3x3(16), three groups of (depth-4)/6 blocks at 16k, 32k, 64k channels.

    `features(x)` returns the pooled features; `fc` is the class head, so a script can add its own
    head on the same features (ReMixMatch's rotation classifier).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, depth: int = 28, widen_factor: int = 2):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                c_in = widths[g] if i == 0 else widths[g + 1]
                layers.append(ResidualBlock(c_in, widths[g + 1], stride if i == 0 else 1,
                                            activate_before_residual=(g == 0 and i == 0)))
        self.body = nn.Sequential(*layers)
        self.bn = _bn(widths[3])
        self.num_features = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # the reference's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.bn(self.body(x)), 0.1).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
