"""Shared code for every script: the data on the device, the labeled split, batched augmentation, WideResNet.

Nothing about any semi-supervised algorithm lives here: each algorithm script reads top to bottom on its
own and imports only these building blocks.

- Data: `load_dataset` reads CIFAR-10 or CIFAR-100 ("python version" pickles, read straight into uint8 tensors,
  no md5 check, so re-encoded copies load) or a folder of your own images (train/<class>/, test/<class>/ and
  optionally unlabeled/, resized to one square size). The whole set lives on the training device; batches are
  drawn by index.
- Split: `labeled_split` picks a balanced, seeded labeled subset. The unlabeled set is all training images,
  labeled ones included, as in the papers (plus a folder's unlabeled/ images, which have label -1).
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

import argparse
import os
import pickle
import shutil

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

NUM_CLASSES = 10  # CIFAR-10's; load_dataset returns each data set's own count
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Per-channel mean and std of the CIFAR-10 training images, on the 0..1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
# The same for CIFAR-100 (over all pixels of the 50,000 training images, population std, as CIFAR-10's).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
DATASETS = ["cifar10", "cifar100", "folder"]
# Classes of the built-in data sets; each has 50,000 training images of 32x32. Known before anything is read,
# so that an impossible --n-labeled is refused before a download.
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR_TRAIN_SIZE = 50000


class DataError(Exception):
    """Bad input the user can fix (missing or broken data, impossible split). Scripts print it and exit 2."""


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def _read_batch(path: str, label_key: bytes = b"labels", num_classes: int = NUM_CLASSES,
                name: str = "CIFAR-10") -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR pickle -> (uint8 images [N, 3, 32, 32], int64 labels [N]); DataError if it is not one."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data, labels = entry[b"data"], entry[label_key]
        images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(labels, dtype=torch.int64)
    except Exception as e:  # pickle raises many kinds of errors on a truncated or garbled file
        raise DataError(f"{path} is not a readable {name} batch ({type(e).__name__}: {e}); "
                        "delete the folder to download it again, or point --data-dir at a good copy") from None
    if len(images) != len(labels) or len(images) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{path} is not a valid {name} batch ({len(images)} images, {len(labels)} labels)")
    return images, labels


def _load_cifar(data_dir: str, download: bool, name: str, folder_name: str, files: dict[str, list[str]],
                label_key: bytes, num_classes: int) -> dict[str, torch.Tensor]:
    """Read the CIFAR pickles files["train"] and files["test"] from <data_dir>/<folder_name>/, downloading the
    set with torchvision's class `name` without the dash (CIFAR10, CIFAR100) when files are missing."""
    folder = os.path.join(data_dir, folder_name)
    expected = files["train"] + files["test"]
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing and download:
        created = not os.path.exists(data_dir)
        try:
            import torchvision.datasets
            getattr(torchvision.datasets, name.replace("-", ""))(root=data_dir, train=True, download=True)
        except Exception as e:
            if created:  # leave no empty or half-downloaded folder behind: it would look like a data set
                shutil.rmtree(data_dir, ignore_errors=True)
            raise DataError(f"{name} not found in {folder} and the download failed ({type(e).__name__}); "
                            f"pass --data-dir pointing at a folder that holds {folder_name}/") from None
        missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{name} not found in {folder} (missing {', '.join(missing)}); "
                        f"pass --data-dir pointing at a folder that holds {folder_name}/")
    out = {}
    for split in ("train", "test"):
        parts = [_read_batch(os.path.join(folder, f), label_key, num_classes, name) for f in files[split]]
        out[f"{split}_x"] = torch.cat([p[0] for p in parts])
        out[f"{split}_y"] = torch.cat([p[1] for p in parts])
    return out


def load_cifar10(data_dir: str, download: bool = True) -> dict[str, torch.Tensor]:
    """Read <data_dir>/cifar-10-batches-py/ into {train_x, train_y, test_x, test_y} (uint8 NCHW, int64).

    Missing files are downloaded with torchvision into data_dir when `download` is set.
    """
    files = {"train": TRAIN_FILES, "test": TEST_FILES}
    return _load_cifar(data_dir, download, "CIFAR-10", "cifar-10-batches-py", files, b"labels", NUM_CLASSES)


def load_cifar100(data_dir: str, download: bool = True) -> dict:
    """Read <data_dir>/cifar-100-python/{train,test} ("CIFAR-100 python version") with the 100 fine labels, and
    the class names from its meta file (numbers when there is none): the dict of `load_dataset`.

    Missing files are downloaded with torchvision into data_dir when `download` is set.
    """
    out = _load_cifar(data_dir, download, "CIFAR-100", "cifar-100-python", {"train": ["train"], "test": ["test"]},
                      b"fine_labels", 100)
    meta = os.path.join(data_dir, "cifar-100-python", "meta")
    classes = [str(c) for c in range(100)]
    if os.path.isfile(meta):
        try:
            with open(meta, "rb") as f:
                classes = [c.decode() for c in pickle.load(f, encoding="bytes")[b"fine_label_names"]]
            if len(classes) != 100:
                raise ValueError(f"{len(classes)} class names")
        except Exception as e:
            raise DataError(f"{meta} is not a readable CIFAR-100 meta file ({type(e).__name__}); "
                            "delete the folder to download it again, or point --data-dir at a good copy") from None
    return {**out, "num_classes": 100, "classes": classes, "mean": CIFAR100_MEAN, "std": CIFAR100_STD}


def _visible(names: list[str]) -> list[str]:
    """Sorted, without hidden entries (.DS_Store, ._* and the like)."""
    return sorted(n for n in names if not n.startswith("."))


def _image_paths(folder: str) -> list[str]:
    """Every visible file under folder, subfolders included, in a fixed order (sorted names, depth first)."""
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = _visible(dirs)  # os.walk descends in this order
        paths += [os.path.join(root, f) for f in _visible(files)]
    return paths


def _class_folders(split_dir: str) -> list[str]:
    """The class folder names of train/ or test/, sorted; DataError if there are none or a file lies beside them."""
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir} not found: --dataset folder reads <data-dir>/train/<class>/*, "
                        "<data-dir>/test/<class>/* and optionally <data-dir>/unlabeled/*")
    names = _visible(os.listdir(split_dir))
    stray = [n for n in names if not os.path.isdir(os.path.join(split_dir, n))]
    if stray:
        raise DataError(f"{os.path.join(split_dir, stray[0])} is not in a class folder: "
                        f"{split_dir} must hold one folder of images per class")
    if len(names) < 2:
        found = f"only the class folder {names[0]!r}" if names else "no class folders"
        raise DataError(f"{split_dir} holds {found}; it needs one folder of images per class, at least 2 classes")
    return names


def _class_images(split_dir: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """The image files of train/ or test/ and their labels (the class's position in `classes`)."""
    paths, labels = [], []
    for c, name in enumerate(classes):
        found = _image_paths(os.path.join(split_dir, name))
        if not found:
            raise DataError(f"{os.path.join(split_dir, name)} holds no images; every class needs at least one "
                            "training and one test image")
        paths += found
        labels += [c] * len(found)
    return paths, labels


def _read_images(paths: list[str], size: int) -> torch.Tensor:
    """Images of any format and size -> uint8 [N, 3, size, size]: the centred square of side min(width, height)
    resized to size x size (the shorter side to `size`, then a centre crop, in one resampling)."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)  # filled in place: large sets are not copied
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                if "transparency" in img.info:  # straight to RGB, Pillow warns (on stderr) for palette images
                    img = img.convert("RGBA")
                img = img.convert("RGB")
                w, h = img.size
                side = min(w, h)
                box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
                out[i] = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box)).transpose(2, 0, 1)
        except Exception as e:  # Pillow raises many kinds of errors on a file it cannot decode
            reason = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"{path} is not an image Pillow can read ({type(e).__name__}: {reason}); "
                            "remove it or replace it") from None
    return torch.from_numpy(out)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (over all pixels, population std) of uint8 images [N, 3, H, W], on the 0..1
    scale, as CIFAR10_MEAN/STD. Summed in float64 chunks, so large sets need no float copy of themselves."""
    total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for chunk in x.split(max(1, 2**20 // (x.shape[2] * x.shape[3]))):
        f = chunk.double()
        total += f.sum((0, 2, 3))
        squares += (f * f).sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = (squares / n - mean * mean).clamp(min=0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def load_image_folder(data_dir: str, image_size: int) -> dict:
    """Read your own images: <data_dir>/train/<class>/*, <data_dir>/test/<class>/* and, optionally,
    <data_dir>/unlabeled/* (subfolders included everywhere), into the dict of `load_dataset`.

    Classes are the train/ folder names, sorted; test/ must have the same folders. Every visible file must be
    an image Pillow reads (any format, any size): it is resized to image_size x image_size (shorter side,
    then a centre crop). The unlabeled/ images follow the train/ ones in train_x, with label -1. The mean and
    std are those of the train/ images.
    """
    train_dir, test_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "test")
    classes = _class_folders(train_dir)
    test_classes = _class_folders(test_dir)
    if test_classes != classes:
        missing, extra = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise DataError(f"{test_dir} must hold the same class folders as {train_dir} "
                        f"(missing from test/: {missing or 'none'}; not in train/: {extra or 'none'})")
    # Every file is listed before any is decoded, so that a layout error shows at once, not after minutes.
    train_paths, train_labels = _class_images(train_dir, classes)
    test_paths, test_labels = _class_images(test_dir, classes)
    unlabeled_dir = os.path.join(data_dir, "unlabeled")
    extra_paths = _image_paths(unlabeled_dir) if os.path.isdir(unlabeled_dir) else []
    train_x = _read_images(train_paths + extra_paths, image_size)  # one tensor: no concatenated copy
    mean, std = channel_stats(train_x[:len(train_paths)])
    return {"train_x": train_x, "train_y": torch.tensor(train_labels + [-1] * len(extra_paths), dtype=torch.int64),
            "test_x": _read_images(test_paths, image_size), "test_y": torch.tensor(test_labels, dtype=torch.int64),
            "num_classes": len(classes), "classes": classes, "mean": mean, "std": std}


def load_dataset(name: str, data_dir: str, image_size: int = 32, download: bool = True) -> dict:
    """The data set `name` ("cifar10", "cifar100" or "folder") as {train_x, train_y, test_x, test_y: uint8
    [N, 3, S, S] images and int64 labels; num_classes; classes: the class names; mean, std: per-channel, 0..1}.

    train_y is -1 for an image without a label (folder data's unlabeled/): labeled_split never picks it and
    the scripts' unlabeled set, all of train_x, includes it. CIFAR images are 32x32 (image_size is for folder
    data); CIFAR-10 and CIFAR-100 are downloaded into data_dir when missing and `download` is set.
    """
    if name == "cifar10":
        return {**load_cifar10(data_dir, download), "num_classes": NUM_CLASSES, "classes": CIFAR10_CLASSES,
                "mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    if name == "cifar100":
        return load_cifar100(data_dir, download)
    if name == "folder":
        return load_image_folder(data_dir, image_size)
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")


def parse_n_labeled(text: str) -> int | str:
    """--n-labeled's type: a number of images, or "all" (every training image that has a label)."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'all', got {text!r}") from None


def check_data_args(dataset: str, n_labeled: int | str, image_size: int) -> None:
    """Refuse --dataset, --n-labeled and --image-size settings that cannot work, before any data is read or
    downloaded (DataError). A folder data set's size is known only once read: labeled_split checks it then."""
    if dataset in CIFAR_CLASSES:
        low = CIFAR_CLASSES[dataset]
        if n_labeled != "all" and not low <= n_labeled <= CIFAR_TRAIN_SIZE:
            raise DataError(f"--n-labeled must be between {low} and {CIFAR_TRAIN_SIZE}, got {n_labeled}")
        if image_size != 32:
            raise DataError(f"--image-size is for --dataset folder; {dataset} images are 32x32, got {image_size}")
    elif n_labeled != "all" and n_labeled < 1:
        raise DataError(f"--n-labeled must be a positive number or 'all', got {n_labeled}")
    if image_size < 8:  # a smaller image leaves the weak shift (12.5%) no pixel
        raise DataError(f"--image-size must be >= 8, got {image_size}")


def labeled_split(labels: torch.Tensor, n_labeled: int | str, seed: int,
                  num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Sorted indices of a balanced labeled subset: exactly n_labeled, per-class counts differ by <= 1.

    A pure function of (labels, n_labeled, seed). When n_labeled is not a multiple of the number of classes,
    the classes that get one extra image are drawn with the same seed. Images labeled -1 (no label) are never
    picked; n_labeled "all" takes every image that has a label, balanced or not.
    """
    known = torch.nonzero(labels >= 0).flatten()
    if n_labeled == "all":
        return known
    if not num_classes <= n_labeled <= len(known):
        raise DataError(f"--n-labeled must be between {num_classes} and {len(known)} (the training set), "
                        f"got {n_labeled}")
    g = torch.Generator().manual_seed(seed)
    per_class = torch.full((num_classes,), n_labeled // num_classes, dtype=torch.int64)
    per_class[torch.randperm(num_classes, generator=g)[: n_labeled % num_classes]] += 1
    chosen = []
    for c in range(num_classes):
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


def normalize(x: torch.Tensor, mean: tuple = CIFAR10_MEAN, std: tuple = CIFAR10_STD) -> torch.Tensor:
    """uint8 images -> float, standardized per channel with the data set's mean and std on the 0..1 scale
    (CIFAR-10's by default; load_dataset returns each set's): the network's input."""
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255
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


def weak_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int | None = None) -> torch.Tensor:
    """FixMatch's weak augmentation: random horizontal flip, random translation by up to max_shift px, by default
    12.5% of the image size (4 px at 32x32, as FixMatch)."""
    b = x.shape[0]
    if max_shift is None:
        max_shift = min(x.shape[2:]) // 8
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


def strong_augment(x: torch.Tensor, generator: torch.Generator, n_ops: int = 2,
                   cutout_size: int | None = None) -> torch.Tensor:
    """FixMatch's strong augmentation: weak, then RandAugment (2 random ops with random magnitudes per
    image), then Cutout (a gray square at a random position, by default of half the image size: 16 px at 32)."""
    x = randaugment(weak_augment(x, generator), generator, n_ops)
    centre = _to_device(torch.randint(0, x.shape[2], (2, x.shape[0]), generator=generator), x.device)
    return cutout(x, centre[0], centre[1], x.shape[2] // 2 if cutout_size is None else cutout_size)


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
