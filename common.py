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
  whole batch: a per-channel lookup table (AutoContrast, Equalize, Posterize, Solarize, Identity, and
  Brightness, a blend with black), a blend with a degenerate image (Color, Contrast, Sharpness), or an
  affine warp (Rotate, ShearX/Y, TranslateX/Y). Each op reproduces Pillow's result for the same image and
  magnitude. What follows from the random draws alone is computed on the host; the device runs a bounded
  number of operations per batch.
  The RandAugment variant: both ops are always applied, each with a magnitude drawn uniformly from the FixMatch
  paper's range (Table 12). google-research/fixmatch (libml/augment.py, AugmentPoolRAM) and
  kekmodel/FixMatch-pytorch (RandAugmentMC) apply each op with probability 0.5, so about a quarter of their
  images get no op at all; TorchSSL and USB apply 3 ops, always, and a Cutout of random size (docs/data.md).
  `cta_policy`, `cta_augment` and `cta_update` are CTAugment (ReMixMatch's), whose magnitudes are learned;
  `cta_labeled_views`, `cta_strong_augment` and `cta_probe` are its part of a training step (--augment ctaugment).
- Model: WideResNet as in the FixMatch reference (WRN-28-2 by default, 1,467,610 parameters). `model(x, bn_groups)`
  normalises consecutive groups of a batch with their own BatchNorm statistics (`ghost_batch_norm`), so that
  one pass computes what a pass per group would (MixMatch's and ReMixMatch's interleaved batches). `load_model`
  reads a finished run's model.pt back (its EMA weights, class names, mean and std), e.g. in another project:
      model, meta = load_model("runs/fixmatch_n250_seed0/model.pt")
      x = normalize(read_image("cat.jpg", meta["image_size"])[None], meta["mean"], meta["std"])
      print(meta["classes"][model(x).argmax()])
"""

import argparse
import functools
import math
import os
import pickle
import re
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


def image_files(folder: str) -> list[str]:
    """Every visible file under folder, subfolders included, in a fixed order (sorted names, depth first): the
    files --dataset folder reads as images, and predict.py too."""
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
        found = image_files(os.path.join(split_dir, name))
        if not found:
            raise DataError(f"{os.path.join(split_dir, name)} holds no images; every class needs at least one "
                            "training and one test image")
        paths += found
        labels += [c] * len(found)
    return paths, labels


def read_image(path: str, size: int) -> torch.Tensor:
    """An image file of any format and size -> uint8 [3, size, size], as --dataset folder reads it: the centred
    square of side min(width, height) resized to size x size (the shorter side to `size`, then a centre crop, in
    one resampling). DataError if Pillow cannot read it."""
    try:
        with Image.open(path) as img:
            if "transparency" in img.info:  # straight to RGB, Pillow warns (on stderr) for palette images
                img = img.convert("RGBA")
            img = img.convert("RGB")
            w, h = img.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            pixels = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box))
    except Exception as e:  # Pillow raises many kinds of errors on a file it cannot decode
        reason = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{path} is not an image Pillow can read ({type(e).__name__}: {reason}); "
                        "remove it or replace it") from None
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def _read_images(paths: list[str], size: int) -> torch.Tensor:
    """read_image for every path -> uint8 [N, 3, size, size]."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)  # filled in place: large sets are not copied
    for i, path in enumerate(paths):
        out[i] = read_image(path, size).numpy()
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
    extra_paths = image_files(unlabeled_dir) if os.path.isdir(unlabeled_dir) else []
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


def check_device(device: str) -> None:
    """--device: cpu, cuda or cuda:N of a GPU that exists; else DataError with one line (the scripts, predict.py)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise DataError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device} asked for, but CUDA is not available; pass --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise DataError(f"--device {device} asked for, but there are {torch.cuda.device_count()} CUDA devices")


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

    Each epoch's permutation is drawn on the host with its own CPU generator (the same stream on every
    device: CUDA's randperm draws other permutations than the CPU's) and copied to the indices' device
    without a sync, so drawing a batch never waits; `state_dict`/`load_state_dict` make the continuation
    after a resume exact.
    """

    def __init__(self, indices: torch.Tensor, batch_size: int, seed: int):
        self.indices, self.batch_size = indices, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos = self._shuffle(), 0

    def _shuffle(self) -> torch.Tensor:
        return _to_device(torch.randperm(len(self.indices), generator=self.generator), self.indices.device)

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


@functools.cache
def _normalize_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per data set and device: torch.tensor(..., device="cuda") on every call would be a blocking
    # host-to-device copy.
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize(x: torch.Tensor, mean: tuple = CIFAR10_MEAN, std: tuple = CIFAR10_STD) -> torch.Tensor:
    """uint8 images -> float, standardized per channel with the data set's mean and std on the 0..1 scale
    (CIFAR-10's by default; load_dataset returns each set's): the network's input."""
    mean, std = _normalize_constants(tuple(mean), tuple(std), x.device)
    return (x.float() - mean) / std


# ----------------------------------------------------------------------------------------------------
# Augmentation. Images are uint8 [B, C, H, W] (float with integer values works too), on any device.
#
# Every random choice (flip, shift, which op, its value, where to cut) is drawn on the host from a CPU
# generator, and everything that follows from the draws alone is computed there too, with numpy: which
# images share an op, the lookup tables of the ops that do not look at the pixels, the pixel each output
# pixel is read from for flips, shifts and affine warps, the Cutout squares. All of it goes to the device
# in one copy per dtype, without a sync. The device only runs what depends on the pixels, in a bounded number
# of operations per batch whatever ops the images drew: on a GPU every tensor operation is a kernel launch
# plus Python dispatch, so for batches this small their number, more than their size, sets the cost
# (benchmarks/README.md counts them). The host computes the same parameters whatever the device, so a seed
# gives the same images on CPU and GPU.
# ----------------------------------------------------------------------------------------------------
_RAMP = np.arange(256, dtype=np.float64)  # the 256 pixel values: the input side of every lookup table


@functools.cache
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the 256 pixel values as float64, Pillow's luma weights [1, 3, 1, 1], 255.0 as float64) on `device`, made once
    (rather than in every call: each would be an operation, and on CUDA a blocking copy)."""
    return (torch.arange(256, dtype=torch.float64, device=device),
            torch.tensor([19595, 38470, 7471], dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(255.0, dtype=torch.float64, device=device))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned memory: the copy runs asynchronously, the host does not wait for it
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _send(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays -> tensors of the same dtypes and shapes on `device`, in one copy per dtype."""
    out = [None] * len(arrays)
    for dtype in sorted({a.dtype.str for a in arrays}):
        which = [i for i, a in enumerate(arrays) if a.dtype.str == dtype]
        flat = torch.from_numpy(np.concatenate([arrays[i].reshape(-1) for i in which]))
        for i, piece in zip(which, _to_device(flat, device).split([arrays[i].size for i in which])):
            out[i] = piece.view(arrays[i].shape) if arrays[i].ndim > 1 else piece  # even a view is an operation
    return out


def _host(v, n: int) -> np.ndarray:
    """A scalar or [n] parameter (number, tensor or array) -> a float64 [n] numpy array."""
    return np.broadcast_to(torch.as_tensor(v, dtype=torch.float64).cpu().numpy(), (n,))


# The three ways an op can transform an image, run on the device. Per-image parameters are tensors on x's device.
def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map every pixel through a per-image lookup table lut [B, 1 or C, 256] (per channel if C)."""
    b, c, h, w = x.shape
    return lut.to(x.dtype).expand(b, c, 256).gather(2, x.reshape(b, c, h * w).long()).reshape(b, c, h, w)


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, x, factor): degenerate + factor * (x - degenerate), clipped, truncated.

    This is ImageEnhance's `enhance(factor)`: factor (float32 [B]) 1 returns x, 0 the degenerate image. Pillow
    computes in float32, and so does this, one rounding per operation as in Pillow.
    """
    d = degenerate.float()
    return (d + factor.view(-1, 1, 1, 1) * (x.float() - d)).clamp(0, 255).floor().to(x.dtype)


def warp(x: torch.Tensor, src: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """Output pixel p of image k is input pixel src[k, 0, p] (of the flattened H x W image); H * W reads `fill`."""
    b, c, h, w = x.shape
    padded = torch.cat([x.reshape(b, c, h * w), x.new_full((b, c, 1), fill)], 2)
    return padded.gather(2, src.expand(b, c, h * w)).reshape(b, c, h, w)


# ----------------------------------------------------------------------------------------------------
# The 14 RandAugment ops. Each is one of four kinds, by what its function returns for values v (one per image):
#   "table":       a lookup table [n, 256] computed on the host from v alone (numpy);
#   "pixel_table": a lookup table [n, C, 256] computed on the device from the images' pixels;
#   "blend":       a degenerate image computed on the device, blended with the image (v is the enhance factor);
#   "warp":        an affine matrix [n, 6] computed on the host from v, turned into a sampling grid on the device.
# Brightness is a blend with black, so its result depends on each pixel's value alone: a table.
# ----------------------------------------------------------------------------------------------------
def identity_table(v: np.ndarray) -> np.ndarray:
    return np.broadcast_to(_RAMP, (len(v), 256))


def posterize_table(bits: np.ndarray) -> np.ndarray:
    """PIL ImageOps.posterize(x, int(bits)): keep the top bits of every value."""
    shift = 2.0 ** (8 - np.minimum(np.floor(bits), 8))[:, None]  # a draw can round up to 9
    return np.floor(_RAMP / shift) * shift


def solarize_table(threshold: np.ndarray) -> np.ndarray:
    """PIL ImageOps.solarize(x, int(threshold)): invert every value at or above the threshold."""
    return np.where(_RAMP < np.floor(threshold)[:, None], _RAMP, 255 - _RAMP)


def brightness_table(factor: np.ndarray) -> np.ndarray:
    """PIL ImageEnhance.Brightness: `blend` with black, in float32 like it: floor(clip(factor * value))."""
    return np.floor(np.clip(factor.astype(np.float32)[:, None] * _RAMP.astype(np.float32), 0, 255))


def autocontrast_lut(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255] (identity if constant)."""
    ramp, _, c255 = _constants(x.device)
    lo, hi = torch.aminmax(x.reshape(*x.shape[:2], -1), dim=2, keepdim=True)
    lo = lo.double()
    scale = torch.div(c255, (hi - lo).clamp(min=1))  # not 255 / t: torch computes that as 255 * (1 / t)
    # Pillow truncates toward zero; floor differs only below 0, which the clamp maps to 0 either way (and
    # floor is vectorised for float64 on CPU, trunc is not: 0.19 ms against 0.01 ms here).
    lut = (ramp * scale - lo * scale).floor().clamp(0, 255)
    return torch.where(hi > lo, lut, ramp)


def equalize_lut(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize: map each channel through its cumulative histogram.

    Pillow's rule: step = (pixels - count of the last non-empty bin) // 255, lut[i] = (step // 2 +
    pixels below i) // step, identity when step is 0 (Pillow before 10 divided by 256).
    """
    b, c = x.shape[:2]
    flat = x.reshape(b * c, -1).long()  # a scatter, not torch.bincount: on CUDA, bincount reads its input's max back
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    last = flat.amax(1, keepdim=True)  # the brightest pixel's bin is the last non-empty one
    step = (flat.shape[1] - hist.gather(1, last)) // 255
    # In float64, exactly (integers below 2^53, quotients far from the next integer), and 4x faster than
    # integer division on CPU.
    lut = torch.floor((step // 2 + hist.cumsum(1) - hist).double() / step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, lut, _constants(x.device)[0]).view(b, c, 256)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 luma in fixed point, rounded), float32 [B, 1, H, W].

    (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16, in float32: exact (integers below 2^24; the division is by a
    power of 2), and its sum over the channels is vectorised on CPU, the int32 one is not (1.5x faster here).
    """
    return torch.floor(((x.float() * _constants(x.device)[1]).sum(1, keepdim=True) + 0x8000) / 0x10000)


def mean_level(gray: torch.Tensor) -> torch.Tensor:
    """The mean of grayscale images, rounded as Pillow's ImageEnhance.Contrast does (int(mean + 0.5)), float32
    [B, 1, 1, 1]. In integers, floor(s / n + 0.5) = (2 s + n) // (2 n): exact on every device (CUDA's mean
    multiplies by 1 / n, which is exact only for a power of 2)."""
    n = math.prod(gray.shape[1:])
    return torch.div(gray.sum((1, 2, 3), keepdim=True, dtype=torch.int64) * 2 + n, 2 * n, rounding_mode="floor").float()


def smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.SMOOTH: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13, rounded; the 1-px border is copied. float32."""
    f = x.float()
    # Box sums by shifted adds: on CPU, 5x faster than avg_pool2d and 10x faster than a depthwise convolution.
    rows = f[:, :, :-2] + f[:, :, 1:-1] + f[:, :, 2:]
    box = rows[:, :, :, :-2] + rows[:, :, :, 1:-1] + rows[:, :, :, 2:]
    out = f.clone()
    inner = out[:, :, 1:-1, 1:-1]
    # The sums are integers below 2^24 (exact in float32) and the result is at most 255.5 before the floor.
    inner.copy_(torch.floor(torch.add(box, inner, alpha=4) / 13 + 0.5))
    return out


def color_degenerate(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Color blends with the grayscale image."""
    return grayscale(x)


def contrast_degenerate(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Contrast blends with the image's mean gray level (rounded), everywhere."""
    return mean_level(grayscale(x))


def sharpness_degenerate(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Sharpness blends with the smoothed image."""
    return smooth(x)


def _affine(n: int, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> np.ndarray:
    """Per-image affine matrices [n, 6] from scalars or [n] arrays."""
    return np.stack([np.broadcast_to(np.asarray(t, dtype=np.float64), (n,)) for t in (a, b, c, d, e, f)], 1)


def rotate_matrix(degrees: np.ndarray, h: int, w: int) -> np.ndarray:
    """PIL Image.rotate(degrees): counter-clockwise about the image centre (black corners)."""
    angle = -(degrees * 0.017453292519943295769236907684886127134428718885417)  # torch.deg2rad's constant
    # torch, not numpy, for cos and sin: torch's vectorised ones can differ from numpy's in the last bit, and
    # these matrices must stay those of earlier versions (held by the tests' golden metrics).
    angle = torch.from_numpy(np.ascontiguousarray(angle))
    cos, sin = np.round(torch.stack([torch.cos(angle), torch.sin(angle)]).numpy(), 15)  # rounded as PIL does
    cx, cy = w / 2, h / 2
    return _affine(len(degrees), cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def shear_x_matrix(s: np.ndarray, h: int, w: int) -> np.ndarray:
    return _affine(len(s), b=s)


def shear_y_matrix(s: np.ndarray, h: int, w: int) -> np.ndarray:
    return _affine(len(s), d=s)


def translate_x_matrix(fraction: np.ndarray, h: int, w: int) -> np.ndarray:
    return _affine(len(fraction), c=fraction * w)


def translate_y_matrix(fraction: np.ndarray, h: int, w: int) -> np.ndarray:
    return _affine(len(fraction), f=fraction * h)


def warp_fixed_point(matrix: np.ndarray) -> np.ndarray:
    """The host's part of PIL Image.transform(size, AFFINE, matrix, NEAREST) for matrices [n, 6] =
    (a, b, c, d, e, f): [n, 2, 3] int64, for the source column and the source row, the sample point of output
    pixel (0, 0) and its steps per output row and per output column, in Pillow's 16.16 fixed point.

    Output pixel (row i, column j) takes the input pixel under (a*(j+.5) + b*(i+.5) + c,
    d*(j+.5) + e*(i+.5) + f), floored. The arithmetic is Pillow's, so that sample points that fall exactly on
    a pixel edge land where they land in Pillow: 16.16 fixed point for a general matrix (Geometry.c,
    affine_fixed), floating point for a pure translation (Pillow's scale path).
    """
    a, b, c, d, e, f = matrix.T

    def fix(t):  # to 16.16 fixed point, rounded as Pillow's FIX()
        return np.floor(t * 65536 + 0.5).astype(np.int64)

    # A pure translation takes Pillow's floating-point path, which floors offset + j: the same as fixed point
    # with the offset floored first.
    ox, oy = c + 0.5 * a + 0.5 * b, f + 0.5 * d + 0.5 * e
    translation = (b == 0) & (d == 0)
    ox = np.where(translation, np.floor(ox).astype(np.int64) << 16, fix(ox))
    oy = np.where(translation, np.floor(oy).astype(np.int64) << 16, fix(oy))
    return np.stack([np.stack([ox, fix(b), fix(a)], 1), np.stack([oy, fix(e), fix(d)], 1)], 1)


def warp_source(fixed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The device's part: from warp_fixed_point's [n, 2, 3], for every output pixel the flattened index of the
    input pixel it takes, [n, 1, H * W], and H * W for those that fall outside the image (they get the fill,
    PIL's default black). Integer arithmetic, so every device computes the same grid."""
    start, per_row, per_column = fixed.view(-1, 2, 3, 1, 1).unbind(2)  # each [n, 2, 1, 1]
    i, j = _pixel_coordinates(h, w, fixed.device)
    uv = (start + i * per_row + j * per_column) >> 16  # [n, 2, H, W]: source column, source row
    inside = ((uv >= 0) & (uv < _image_size(h, w, fixed.device))).all(1)
    u, v = uv.unbind(1)
    return torch.where(inside, v * w + u, h * w).view(-1, 1, h * w)


@functools.cache
def _pixel_coordinates(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column numbers, [1, 1, H, 1] and [1, 1, 1, W] int64 on `device`, made once."""
    return (torch.arange(h, device=device).view(1, 1, h, 1), torch.arange(w, device=device).view(1, 1, 1, w))


@functools.cache
def _image_size(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(W, H) as [1, 2, 1, 1] int64 on `device`: the bounds of (column, row), made once."""
    return torch.tensor([w, h], device=device).view(1, 2, 1, 1)


# FixMatch's RandAugment pool: name -> (kind, function, low, high); each op's value is drawn uniformly
# from [low, high] (FixMatch paper, arXiv 2001.07685, Table 12; the same ranges as TorchSSL/USB).
# The order of the names is the order of the draws (an op is drawn as its index): do not reorder.
RANDAUGMENT_OPS = {
    "Identity": ("table", identity_table, 0, 0),
    "AutoContrast": ("pixel_table", autocontrast_lut, 0, 0),
    "Equalize": ("pixel_table", equalize_lut, 0, 0),
    "Posterize": ("table", posterize_table, 4, 9),                 # bits kept, floored: 4..8 equally often
    "Solarize": ("table", solarize_table, 0, 256),                 # threshold, floored (the paper's T x 256)
    "Brightness": ("table", brightness_table, 0.05, 0.95),         # enhance factor: 0 = black, 1 = unchanged
    "Color": ("blend", color_degenerate, 0.05, 0.95),              # 0 = grayscale
    "Contrast": ("blend", contrast_degenerate, 0.05, 0.95),        # 0 = flat mean gray
    "Sharpness": ("blend", sharpness_degenerate, 0.05, 0.95),      # 0 = smoothed
    "Rotate": ("warp", rotate_matrix, -30, 30),                    # degrees
    "ShearX": ("warp", shear_x_matrix, -0.3, 0.3),
    "ShearY": ("warp", shear_y_matrix, -0.3, 0.3),
    "TranslateX": ("warp", translate_x_matrix, -0.3, 0.3),         # fraction of the image size
    "TranslateY": ("warp", translate_y_matrix, -0.3, 0.3),
}
OP_NAMES = list(RANDAUGMENT_OPS)
# Within one round of ops, images are grouped by op in this order, so that each kind is one block of the
# grouped batch (one table lookup, one blend, one warp per round), and so are the blocks that share work:
# Color and Contrast both need the grayscale image.
_GROUPED = ["Identity", "Posterize", "Solarize", "Brightness", "AutoContrast", "Equalize",
            "Color", "Contrast", "Sharpness", "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"]
_RANK = np.array([_GROUPED.index(name) for name in OP_NAMES])  # op index -> position in _GROUPED
_LO = np.array([float(RANDAUGMENT_OPS[name][2]) for name in OP_NAMES])
_SPAN = np.array([float(RANDAUGMENT_OPS[name][3] - RANDAUGMENT_OPS[name][2]) for name in OP_NAMES])


def _plan_ops(op: np.ndarray, v: np.ndarray, h: int, w: int) -> tuple[np.ndarray, dict, list[np.ndarray]]:
    """The host's part of one round of ops: op [B] (indices into OP_NAMES) with values v [B] ->
    (order: the images grouped as in _GROUPED, count of each op, [tables, blend factors, warp_fixed_point])."""
    order = np.argsort(_RANK[op], kind="stable")  # stable: within a group, images keep their order
    v = v[order]
    counts = dict(zip(_GROUPED, np.bincount(_RANK[op], minlength=len(_GROUPED)).tolist()))
    tables, factors, matrices, start = [np.empty((0, 1, 256))], [np.empty(0)], [np.empty((0, 6))], 0
    for name in _GROUPED:
        kind, fn, _, _ = RANDAUGMENT_OPS[name]
        values, start = v[start:start + counts[name]], start + counts[name]
        if kind == "table" and len(values):
            tables.append(fn(values)[:, None])
        elif kind == "blend":
            factors.append(values)
        elif kind == "warp" and len(values):
            matrices.append(fn(values, h, w))
    fixed = warp_fixed_point(np.concatenate(matrices))
    # Tables travel as uint8, factors as float32 (blend's precision, rounded as torch rounds float64 to float32).
    return order, counts, [np.concatenate(tables).astype(np.uint8), np.concatenate(factors).astype(np.float32), fixed]


def _run_ops(x: torch.Tensor, counts: dict, tables: torch.Tensor, factors: torch.Tensor,
             fixed: torch.Tensor) -> torch.Tensor:
    """The device's part of one round of ops, on images already grouped as in _GROUPED: one lookup, one
    blend and one warp, each on its own block of the batch; returns the images in the same order."""
    b, c, h, w = x.shape
    n = {kind: sum(counts[name] for name in _GROUPED if RANDAUGMENT_OPS[name][0] == kind)
         for kind in ("table", "pixel_table", "blend", "warp")}
    lut_x, blend_x, warp_x = x.split([n["table"] + n["pixel_table"], n["blend"], n["warp"]])
    out = []
    # Empty groups are skipped: every operation costs the same fixed overhead, however few images it has.
    if len(lut_x):
        _, ac_x, eq_x = lut_x.split([n["table"], counts["AutoContrast"], counts["Equalize"]])
        luts = [tables.expand(n["table"], c, 256)] if n["table"] else []
        luts += [autocontrast_lut(ac_x)] if len(ac_x) else []
        luts += [equalize_lut(eq_x)] if len(eq_x) else []
        out.append(apply_lut(lut_x, torch.cat(luts) if len(luts) > 1 else luts[0]))
    if len(blend_x):
        n_color, n_contrast = counts["Color"], counts["Contrast"]
        gray_x, sharp_x = blend_x.split([n_color + n_contrast, counts["Sharpness"]])
        degenerate = []
        if len(gray_x):
            gray_color, gray_contrast = grayscale(gray_x).split([n_color, n_contrast])
            degenerate += [gray_color.expand(n_color, c, h, w)] if n_color else []
            degenerate += [mean_level(gray_contrast).expand(n_contrast, c, h, w)] if n_contrast else []
        degenerate += [smooth(sharp_x)] if len(sharp_x) else []
        out.append(blend(torch.cat(degenerate) if len(degenerate) > 1 else degenerate[0], blend_x, factors))
    if len(warp_x):
        out.append(warp(warp_x, warp_source(fixed, h, w)))
    return torch.cat(out) if len(out) > 1 else out[0]


def apply_op(name: str, x: torch.Tensor, v) -> torch.Tensor:
    """Apply RandAugment op `name` to images x with value v (a scalar or one per image, in the op's units)."""
    b, _, h, w = x.shape
    _, counts, arrays = _plan_ops(np.full(b, OP_NAMES.index(name)), _host(v, b).copy(), h, w)
    return _run_ops(x, counts, *_send(arrays, x.device))


# ----------------------------------------------------------------------------------------------------
# The same RandAugment with fixed shapes. Grouped by op (above), each op gets only its own images, so how the
# batch splits depends on the draws: fine when every operation is launched as it comes, but a CUDA graph or a
# torch.compile graph needs every step to run the same operations on tensors of the same shapes. Here every
# image goes through the three kinds of op in turn (lookup table, blend, warp), and the two kinds it did not
# draw leave it unchanged: the identity table, a blend factor of 1 (d + 1 * (x - d) is x exactly: integers
# below 2^24 in float32), the identity warp. The same images bit for bit (tests/test_common.py) from the same
# draws, in about as many operations (316 top-level ones for 448 images, as grouped), but three times the
# arithmetic: 4x the grouped route's CPU time (63 against 15 ms for 448 images, one thread, on the development
# VM), so the scripts use the grouped route. This one is for a CUDA graph (benchmarks/gpu_check.py, part 3b).
# ----------------------------------------------------------------------------------------------------
_DEVICE_CHOSEN = ["AutoContrast", "Equalize", "Color", "Contrast"]  # ops the device must tell apart (Sharpness:
# the third degenerate image, chosen where neither Color nor Contrast was)


def _plan_ops_fixed(op: np.ndarray, v: np.ndarray, h: int, w: int) -> list[np.ndarray]:
    """The host's part of one round, in the images' own order: [chosen [4, B] bool (drew AutoContrast, Equalize,
    Color, Contrast), tables [B, 1, 256] uint8, blend factors [B] float32, warp_fixed_point [B, 2, 3]], each the
    identity for the images that drew an op of another kind."""
    b = len(op)
    tables, factors, matrices = np.tile(_RAMP, (b, 1)), np.ones(b), _affine(b)
    for i, name in enumerate(OP_NAMES):
        kind, fn, _, _ = RANDAUGMENT_OPS[name]
        drew = op == i
        if kind == "table" and drew.any():
            tables[drew] = fn(v[drew])
        elif kind == "blend":
            factors[drew] = v[drew]
        elif kind == "warp" and drew.any():
            matrices[drew] = fn(v[drew], h, w)
    chosen = np.stack([op == OP_NAMES.index(name) for name in _DEVICE_CHOSEN])
    return [chosen, tables[:, None].astype(np.uint8), factors.astype(np.float32), warp_fixed_point(matrices)]


def _run_ops_fixed(x: torch.Tensor, chosen: torch.Tensor, tables: torch.Tensor, factors: torch.Tensor,
                   fixed: torch.Tensor) -> torch.Tensor:
    """The device's part of one round: every image through a lookup, a blend and a warp, in the same operations
    whatever the draws."""
    autocontrast, equalize, color, contrast = chosen.unbind(0)
    lut = torch.where(autocontrast.view(-1, 1, 1), autocontrast_lut(x),
                      torch.where(equalize.view(-1, 1, 1), equalize_lut(x), tables))
    x = apply_lut(x, lut)
    gray = grayscale(x)
    degenerate = torch.where(color.view(-1, 1, 1, 1), gray,
                             torch.where(contrast.view(-1, 1, 1, 1), mean_level(gray), smooth(x)))
    x = blend(degenerate, x, factors)
    return warp(x, warp_source(fixed, *x.shape[2:]))


def _cutout_masks(centre: torch.Tensor, h: int, w: int, size: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the squares' centres [B, 2] (row, column) on the device: (1 outside each image's size x size square
    and 0 inside, fill inside and 0 outside), uint8 [B, 1, H, W]; the square is clipped at the border."""
    rows, cols = _pixel_coordinates(h, w, centre.device)
    cy, cx, half = *centre.view(-1, 2, 1, 1, 1).unbind(1), size // 2
    box = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
    return (~box).to(torch.uint8), box.to(torch.uint8) * fill


def _fill_box(x: torch.Tensor, keep: torch.Tensor, paint: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(paint, x, keep)  # paint + x * keep; where/masked_fill are ~10x slower on uint8 on CPU


def cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int = 16, fill: int = 127) -> torch.Tensor:
    """Gray out a size x size square centred at (cy, cx) per image, clipped at the border (FixMatch's Cutout)."""
    centre = torch.stack([torch.as_tensor(cy), torch.as_tensor(cx)], 1).to(x.device, torch.int64)
    return _fill_box(x, *_cutout_masks(centre, x.shape[2], x.shape[3], size, fill))


def _flip_translate_source(flip: np.ndarray, dy: np.ndarray, dx: np.ndarray, h: int, w: int) -> list[np.ndarray]:
    """Source row times W [B, H, 1] and source column [B, 1, W] of every output pixel: flip, then shift with
    reflect padding (the same as reflect-padding and cropping at offset (pad + dy, pad + dx))."""
    def reflect(i, n):  # reflect padding without repeating the edge: -1 -> 1, n -> n - 2
        return np.where(i < 0, -i, np.where(i >= n, 2 * (n - 1) - i, i))

    rows = reflect(np.arange(h) + dy.reshape(-1, 1), h)
    cols = reflect(np.arange(w) + dx.reshape(-1, 1), w)
    cols = np.where(flip.reshape(-1, 1), w - 1 - cols, cols)
    return [(rows * w)[:, :, None], cols[:, None, :]]


def _gather_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    src = (rows + cols).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, src).reshape(b, c, h, w)


def flip_translate(x: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Horizontal flip where `flip`, then shift by (dy, dx) pixels with reflect padding, per image."""
    source = _flip_translate_source(*(np.asarray(t.cpu()) for t in (flip, dy, dx)), *x.shape[2:])
    return _gather_pixels(x, *_send(source, x.device))


# ----------------------------------------------------------------------------------------------------
# Weak and strong augmentation. Every draw comes from the CPU generator passed in, in a fixed order (the
# generator state is what a checkpoint saves), and the random parameters of a whole call go to the device
# in one copy. `views=K` gives K augmented copies of the batch with the draws of K calls in a row, in one
# pass on the device: the same images as K calls, at a fraction of the operations (MixMatch, ReMixMatch).
# ----------------------------------------------------------------------------------------------------
def _draw_weak(generator: torch.Generator, b: int, h: int, w: int, max_shift: int) -> list[np.ndarray]:
    flip = torch.rand(b, generator=generator).numpy() < 0.5
    shift = torch.randint(-max_shift, max_shift + 1, (2, b), generator=generator).numpy()
    return _flip_translate_source(flip, shift[0], shift[1], h, w)


def _draw_ops(generator: torch.Generator, b: int, n_ops: int) -> list[list[np.ndarray]]:
    """RandAugment's draws: per round, each image's op (an index into OP_NAMES) and its value in the op's range."""
    rounds = []
    for _ in range(n_ops):
        op = torch.randint(0, len(OP_NAMES), (b,), generator=generator).numpy()
        u = torch.rand(b, generator=generator, dtype=torch.float64).numpy()
        rounds.append([op, _LO[op] + _SPAN[op] * u])
    return rounds


def _draw_strong(generator: torch.Generator, b: int, h: int, w: int, n_ops: int) -> list:
    """Strong augmentation's draws: weak's, RandAugment's, and Cutout's centres [B, 2] (row, column)."""
    weak = _draw_weak(generator, b, h, w, min(h, w) // 8)
    ops = _draw_ops(generator, b, n_ops)
    return [weak, ops, torch.randint(0, h, (2, b), generator=generator).numpy().T]


def _join(views: list):
    """The draws of several views, field by field (nested lists of arrays), concatenated view after view."""
    if isinstance(views[0], np.ndarray):
        return np.concatenate(views) if len(views) > 1 else views[0]
    return [_join(list(field)) for field in zip(*views)]


def _plan_randaugment(rounds_drawn: list[list[np.ndarray]], b: int, h: int, w: int) -> tuple[list, list]:
    """The host's part of RandAugment: per round, the op counts (Python) and the arrays the device needs.

    Between rounds the batch stays grouped by the previous round's ops: the arrays include, per round, the
    index that takes the previous grouping to this round's, and at the end the index back to the input order.
    """
    rounds, arrays, position = [], [], np.arange(b)  # position[i]: where image i is in the current grouping
    for op, v in rounds_drawn:
        order, counts, plan = _plan_ops(op, v, h, w)
        arrays += [position[order], *plan]
        rounds.append(counts)
        position = np.argsort(order)
    return rounds, arrays + [position]


def _run_randaugment(x: torch.Tensor, rounds: list, tensors: list[torch.Tensor]) -> torch.Tensor:
    for r, counts in enumerate(rounds):
        regroup, tables, factors, fixed = tensors[4 * r:4 * r + 4]
        x = _run_ops(x.index_select(0, regroup), counts, tables, factors, fixed)
    return x.index_select(0, tensors[-1])


def _repeat(x: torch.Tensor, views: int | None) -> torch.Tensor:
    return x if views is None else x.repeat(views, 1, 1, 1)


def _unflatten(x: torch.Tensor, views: int | None) -> torch.Tensor:
    return x if views is None else x.unflatten(0, (views, -1))


def weak_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int | None = None,
                 views: int | None = None) -> torch.Tensor:
    """FixMatch's weak augmentation: random horizontal flip, random translation by up to max_shift px, by default
    12.5% of the image size (4 px at 32x32, as FixMatch). With `views`: [views, B, ...], as `views` calls."""
    b, _, h, w = x.shape
    return apply_weak(x, _send(plan_weak(generator, b, h, w, max_shift, views), x.device), views)


def plan_weak(generator: torch.Generator, b: int, h: int, w: int, max_shift: int | None = None,
              views: int | None = None) -> list[np.ndarray]:
    """The host's part of weak_augment: its draws, as the source pixel of every output pixel (shapes fixed)."""
    max_shift = min(h, w) // 8 if max_shift is None else max_shift
    return _join([_draw_weak(generator, b, h, w, max_shift) for _ in range(views or 1)])


def apply_weak(x: torch.Tensor, plan: list[torch.Tensor], views: int | None = None) -> torch.Tensor:
    """The device's part of weak_augment, from plan_weak's arrays on x's device."""
    return _unflatten(_gather_pixels(_repeat(x, views), *plan), views)


def randaugment(x: torch.Tensor, generator: torch.Generator, n_ops: int = 2) -> torch.Tensor:
    """RandAugment with random magnitudes: n_ops ops per image, each drawn uniformly from the 14-op pool
    (with replacement, independently for every image) with a value drawn uniformly from its range. Every
    drawn op is applied (as TorchSSL and USB apply each of their 3), not with probability 0.5 as in
    google-research/fixmatch."""
    b, _, h, w = x.shape
    rounds, arrays = _plan_randaugment(_draw_ops(generator, b, n_ops), b, h, w)
    return _run_randaugment(x, rounds, _send(arrays, x.device))


def strong_augment(x: torch.Tensor, generator: torch.Generator, n_ops: int = 2, cutout_size: int | None = None,
                   views: int | None = None, fixed_shapes: bool = False) -> torch.Tensor:
    """FixMatch's strong augmentation: weak, then RandAugment (2 random ops with random magnitudes per
    image), then Cutout (a gray square at a random position, by default of half the image size: 16 px at 32).
    With `views`: [views, B, ...], the images of `views` calls in a row. fixed_shapes: the same images through
    the same operations at every call (plan_strong, apply_strong), for a CUDA graph."""
    b, _, h, w = x.shape
    if fixed_shapes:
        return apply_strong(x, _send(plan_strong(generator, b, h, w, n_ops, views), x.device), cutout_size, views)
    weak, ops, centre = _join([_draw_strong(generator, b, h, w, n_ops) for _ in range(views or 1)])
    rounds, arrays = _plan_randaugment(ops, len(centre), h, w)
    tensors = _send(weak + arrays + [centre], x.device)
    x = _run_randaugment(_gather_pixels(_repeat(x, views), *tensors[:2]), rounds, tensors[2:-1])
    return _cutout_views(x, tensors[-1], cutout_size, views)


def _cutout_views(x: torch.Tensor, centre: torch.Tensor, cutout_size: int | None, views: int | None) -> torch.Tensor:
    """strong_augment's last step: Cutout's gray squares at `centre`, then the views apart."""
    h, w = x.shape[2:]
    size = h // 2 if cutout_size is None else cutout_size
    return _unflatten(_fill_box(x, *_cutout_masks(centre, h, w, size, 127)), views)


def plan_strong(generator: torch.Generator, b: int, h: int, w: int, n_ops: int = 2,
                views: int | None = None) -> list[np.ndarray]:
    """The host's part of strong_augment with fixed shapes: its draws (the same, in the same order) and every
    array the device needs, whose shapes depend only on (B, H, W, n_ops, views). apply_strong is the rest."""
    weak, ops, centre = _join([_draw_strong(generator, b, h, w, n_ops) for _ in range(views or 1)])
    return weak + [a for op, v in ops for a in _plan_ops_fixed(op, v, h, w)] + [centre]


def apply_strong(x: torch.Tensor, plan: list[torch.Tensor], cutout_size: int | None = None,
                 views: int | None = None) -> torch.Tensor:
    """The device's part of strong_augment with fixed shapes, from plan_strong's arrays on x's device: the same
    operations on tensors of the same shapes at every call, so that it can run inside a CUDA graph."""
    x = _gather_pixels(_repeat(x, views), *plan[:2])
    for r in range(2, len(plan) - 1, 4):  # the rounds of RandAugment, 4 arrays each
        x = _run_ops_fixed(x, *plan[r:r + 4])
    return _cutout_views(x, plan[-1], cutout_size, views)


# ----------------------------------------------------------------------------------------------------
# CTAugment (ReMixMatch, arXiv 1911.09785, Sec. 3.2.2; google-research/fixmatch libml/ctaugment.py)
#
# Control Theory Augment: 19 ops, each with 0 to 2 parameters in [0, 1], each parameter's range cut into
# bins that carry a learned rate (1 at the start). A policy is `depth` ops per image, each op drawn
# uniformly; a parameter's bin is drawn in proportion to its rate turned into a probability (rate_to_p: rates
# whose share is below the threshold are never drawn), its level uniformly inside the bin. Probe policies,
# for labeled images, draw uniform levels; how well the model still classifies a probe image moves the rates
# of the bins its policy used (cta_update). The reference (libml/ctaugment.py, libml/augment.py
# AugmentPoolCTA) applies the ops image by image with Pillow in worker processes; here the draws are made on
# the host from a CPU generator (as RandAugment's), and the ops run batched on the device, grouped by kind as
# RandAugment's are (_run_ops): one lookup, one blend, one warp, one resampling, one Cutout per round.
# Every op reproduces the reference's Pillow result bit for bit (tests/test_ctaugment.py), rescale's six
# resampling filters included (Pillow's fixed-point arithmetic, Resample.c, redone with integer-valued
# float64 matrix products, which are exact).
# ----------------------------------------------------------------------------------------------------
# name -> (kind, bins per parameter), in the reference's registration order (its OPS dict, which
# `random.choice(list(OPS))` draws from); the bins are its @register(...) arguments. Kinds: "table" (a lookup
# table from the level alone), "pixel_table" (a lookup table from the image, blended with the identity),
# "blend" (with a degenerate or filtered image), "warp" (affine, NEAREST), "resample" (crop and resize),
# "cutout". The order of the names is the order of the draws: do not reorder.
CTA_OPS = {
    "autocontrast": ("pixel_table", (17,)),  # Image.blend(x, ImageOps.autocontrast(x), level)
    "blur": ("blend", (17,)),                # Image.blend(x, x.filter(ImageFilter.BLUR), level)
    "brightness": ("table", (17,)),          # ImageEnhance.Brightness(x).enhance(0.1 + 1.9 level)
    "color": ("blend", (17,)),               # ImageEnhance.Color, the same factor
    "contrast": ("blend", (17,)),            # ImageEnhance.Contrast, the same factor
    "cutout": ("cutout", (17,)),             # a gray square of side 2 ((1 + int(level * 32 * 0.499)) // 2)
    "equalize": ("pixel_table", (17,)),      # Image.blend(x, ImageOps.equalize(x), level)
    "invert": ("table", (17,)),              # Image.blend(x, ImageOps.invert(x), level)
    "identity": ("table", ()),               # no parameter, so no rate either
    "posterize": ("table", (8,)),            # ImageOps.posterize(x, 1 + int(level * 7.999))
    "rescale": ("resample", (17, 6)),        # crop 0..25% per side, resize back with one of 6 filters
    "rotate": ("warp", (17,)),               # x.rotate(int(np.round((2 level - 1) * 45))) degrees
    "sharpness": ("blend", (17,)),           # ImageEnhance.Sharpness(x).enhance(0.1 + 1.9 level)
    "shear_x": ("warp", (17,)),              # affine (1, (2 level - 1) * 0.3, 0, 0, 1, 0)
    "shear_y": ("warp", (17,)),              # affine (1, 0, 0, (2 level - 1) * 0.3, 1, 0)
    "smooth": ("blend", (17,)),              # Image.blend(x, x.filter(ImageFilter.SMOOTH), level)
    "solarize": ("table", (17,)),            # ImageOps.solarize(x, int(level * 255.999))
    "translate_x": ("warp", (17,)),          # affine (1, 0, (2 level - 1) * 0.3, 0, 1, 0): pixels, not a
    "translate_y": ("warp", (17,)),          # fraction of the size as in the paper's table (docs/data.md)
}
CTA_NAMES = list(CTA_OPS)
CTA_DEPTH = 2         # ops per policy (CTAugment(depth=2); cta/lib/train.py flag adepth)
CTA_THRESHOLD = 0.80  # cta/lib/train.py's flag ath, which the training scripts pass (the class default is 0.85)
CTA_DECAY = 0.99      # CTAugment(decay=0.99); cta/lib/train.py flag adecay
# Pillow's filters in the order rescale picks them: methods[int(method * 5.99)] with (ANTIALIAS, BICUBIC,
# BILINEAR, BOX, HAMMING, NEAREST); ANTIALIAS is LANCZOS (the name was removed in Pillow 10).
RESCALE_METHODS = ["lanczos", "bicubic", "bilinear", "box", "hamming", "nearest"]

# The rates of all parameters, one flat vector: parameter k (over the ops in order, then their parameters)
# owns _CTA_BINS[k] entries from _CTA_START[k]. _CTA_PARAM[op, j] is op's j-th parameter (-1: none).
_CTA_BINS = np.array([n for name in CTA_NAMES for n in CTA_OPS[name][1]])
_CTA_START = np.concatenate([[0], np.cumsum(_CTA_BINS)[:-1]])
_CTA_PARAM = np.full((len(CTA_NAMES), 2), -1)
for _i, _k in enumerate(np.cumsum([0] + [len(CTA_OPS[name][1]) for name in CTA_NAMES])[:-1]):
    _CTA_PARAM[_i, :len(CTA_OPS[CTA_NAMES[_i]][1])] = _k + np.arange(len(CTA_OPS[CTA_NAMES[_i]][1]))
_CTA_SEGMENT = np.repeat(np.arange(len(_CTA_BINS)), _CTA_BINS)  # flat rate -> its parameter
# Each parameter's bins padded to 17 columns; the padding reads the entry after the last rate (a zero).
_CTA_PADDED = np.where(np.arange(17) < _CTA_BINS[:, None], _CTA_START[:, None] + np.arange(17), _CTA_BINS.sum())
_CTA_GROUPED = ["identity", "brightness", "invert", "posterize", "solarize", "autocontrast", "equalize",
                "color", "contrast", "sharpness", "smooth", "blur", "rotate", "shear_x", "shear_y",
                "translate_x", "translate_y", "rescale", "cutout"]  # one block per kind, as _GROUPED
_CTA_RANK = np.array([_CTA_GROUPED.index(name) for name in CTA_NAMES])


def cta_rates(device: str | torch.device = "cpu") -> torch.Tensor:
    """CTAugment's initial rates: 1 for every bin of every parameter (CTAugment.__init__), one flat float64
    vector [303] (cta_rates_of names the pieces). A plain tensor, so a checkpoint holds it as it is."""
    return torch.ones(int(_CTA_BINS.sum()), dtype=torch.float64, device=device)


def cta_rates_of(rates: torch.Tensor, name: str) -> list[torch.Tensor]:
    """The rates of op `name`'s parameters, views into the flat vector (the reference's rates[name])."""
    return [rates[_CTA_START[k]:_CTA_START[k] + _CTA_BINS[k]] for k in _CTA_PARAM[CTA_NAMES.index(name)] if k >= 0]


def rate_to_p(rates: np.ndarray, threshold: float = CTA_THRESHOLD, decay: float = CTA_DECAY) -> np.ndarray:
    """CTAugment.rate_to_p on every parameter at once: p = rate + (1 - decay), divided by the largest p of
    its parameter, and 0 where that share is below the threshold (so that such bins are never drawn)."""
    p = rates + (1 - decay)  # 1 - decay: never all zero
    p = p / np.maximum.reduceat(p, _CTA_START)[_CTA_SEGMENT]
    return np.where(p < threshold, 0.0, p)


def cta_policy(rates: torch.Tensor, generator: torch.Generator, batch_size: int, probe: bool = False,
               depth: int = CTA_DEPTH, threshold: float = CTA_THRESHOLD,
               decay: float = CTA_DECAY) -> dict[str, np.ndarray]:
    """CTAugment.policy(probe) for every image of a batch, drawn from the CPU generator: per round (depth) and
    image, "op" (an index into CTA_NAMES, uniform), "level" [depth, B, 2] (its parameters' levels in [0, 1);
    an op with fewer parameters ignores the rest) and "where" [depth, B, 2] (uniforms: where a Cutout goes,
    drawn by the reference inside `cutout`).

    A training policy draws each parameter's bin i with probability p_i / sum(p), p = rate_to_p(rates), by
    inverse CDF as np.random.choice does, then level = (i + u) / bins, u uniform; a probe policy draws level = u.
    Reading `rates` copies them to the host: pass a host copy (made without blocking after the last
    cta_update) to keep a CUDA step free of syncs; the reference's policies lag its rates by its queue anyway.
    """
    op = torch.randint(0, len(CTA_NAMES), (depth, batch_size), generator=generator).numpy()
    u = torch.rand(depth, batch_size, 2, generator=generator, dtype=torch.float64).numpy()
    where = torch.rand(depth, batch_size, 2, generator=generator, dtype=torch.float64).numpy()
    if probe:
        return {"op": op, "level": u, "where": where}
    pick = torch.rand(depth, batch_size, 2, generator=generator, dtype=torch.float64).numpy()
    p = np.append(rate_to_p(rates.detach().cpu().numpy().astype(np.float64), threshold, decay), 0.0)[_CTA_PADDED]
    cdf = np.cumsum(p, 1)
    cdf = cdf / cdf[:, -1:]  # ends at exactly 1, so a uniform in [0, 1) always lands on a bin
    param = np.maximum(_CTA_PARAM[op], 0)  # a missing parameter reads parameter 0: drawn, never used
    bin_ = (pick[..., None] >= cdf[param]).sum(-1)  # searchsorted(side="right"): skips bins of probability 0
    return {"op": op, "level": (bin_ + u) / _CTA_BINS[param], "where": where}


def cta_bins(policy: dict[str, np.ndarray]) -> np.ndarray:
    """The bins a policy's levels fall in, as CTAugment.update_rates computes them (int(level * bins * 0.999),
    so a level at the very start of a bin counts in the bin below): flat rate indices [B, depth * 2], the
    images in order and within one its rounds, then parameters in order; len(rates) where there is no parameter."""
    param = _CTA_PARAM[policy["op"]]  # [depth, B, 2]
    n = _CTA_BINS[np.maximum(param, 0)]
    flat = _CTA_START[np.maximum(param, 0)] + (policy["level"] * n * 0.999).astype(np.int64)
    return np.where(param >= 0, flat, _CTA_BINS.sum()).transpose(1, 0, 2).reshape(len(param[0]), -1)


def proximity(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How well the model still classifies each probe image: 1 - ||p - onehot(y)||_1 / 2 (cta/lib/train.py,
    train_step), [B] float64; 1 for a confident right answer, 0 for a confident wrong one."""
    p = probs.double()
    onehot = torch.zeros_like(p).scatter_(1, labels.view(-1, 1), 1.0)  # not F.one_hot: on CUDA it syncs
    return 1 - 0.5 * (p - onehot).abs().sum(1)


def cta_update(rates: torch.Tensor, policy: dict[str, np.ndarray], probs: torch.Tensor, labels: torch.Tensor,
               decay: float = CTA_DECAY) -> torch.Tensor:
    """CTAugment.update_rates for a batch of probe images: the new rates, on rates' device, without a sync.

    The reference moves, image after image and within an image op after op, every bin the probe policy used:
    rate <- decay * rate + (1 - decay) * proximity. A bin hit k times in the batch, by proximities e_1..e_k in
    that order, ends at decay^k * rate + (1 - decay) * sum_j decay^(k - j) * e_j: each hit is scaled by decay
    to the power of the hits on its bin after it (counted over all pairs of hits, as the batch is small) and
    scattered onto its bin, after the rates are scaled by decay^k.
    """
    hits = _to_device(torch.from_numpy(cta_bins(policy)), rates.device)  # [B, depth * 2]
    e = proximity(probs, labels).to(rates.device).view(-1, 1).expand_as(hits).reshape(-1)
    g = hits.reshape(-1)  # the reference's order of the updates
    after = torch.ones(len(g), len(g), dtype=torch.bool, device=g.device).triu(1)  # [t, t']: t' comes later
    later = ((g.view(-1, 1) == g.view(1, -1)) & after).sum(1)
    padded = torch.cat([rates.double(), rates.new_zeros(1, dtype=torch.float64)])  # the last entry: no parameter
    count = torch.zeros_like(padded).scatter_add_(0, g, torch.ones_like(e))
    step = (1 - decay) * torch.pow(decay, later.double()) * e
    return (padded * torch.pow(decay, count)).scatter_add_(0, g, step)[:-1].to(rates.dtype)


# The ops' host parts: what follows from the levels alone (reference: libml/ctaugment.py, the op of that name).
def _enhance_factor(level: np.ndarray) -> np.ndarray:
    return 0.1 + 1.9 * level  # _enhance: 0.1 .. 2.0, 1 at level 0.47


def blend_table(table: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Image.blend(x, f(x), level) for an f that is a lookup table [n, 256]: in float32 as Pillow, truncated."""
    ramp, t = _RAMP.astype(np.float32), table.astype(np.float32)
    return np.floor(np.clip(ramp + level.astype(np.float32)[:, None] * (t - ramp), 0, 255))


def _cta_table(name: str, level: np.ndarray) -> np.ndarray:
    if name == "brightness":
        return brightness_table(_enhance_factor(level))
    if name == "invert":
        return blend_table(np.broadcast_to(255 - _RAMP, (len(level), 256)), level)
    if name == "posterize":
        return posterize_table(1 + np.floor(level * 7.999))
    if name == "solarize":
        return solarize_table(np.floor(level * 255.999))
    return identity_table(level)


def _cta_matrix(name: str, level: np.ndarray, h: int, w: int) -> np.ndarray:
    if name == "rotate":  # whole degrees, np.round: half to even as the reference's
        return rotate_matrix(np.round((2 * level - 1) * 45), h, w)
    v = (2 * level - 1) * 0.3
    if name == "shear_x":
        return shear_x_matrix(v, h, w)
    if name == "shear_y":
        return shear_y_matrix(v, h, w)
    # The reference's translate puts v in the matrix's offset, in pixels: at most 0.3 px, which NEAREST
    # sampling rounds away (floor(j + 0.5 + v) = j): the reference's translate_x/y leave the image unchanged.
    return _affine(len(v), c=v) if name == "translate_x" else _affine(len(v), f=v)


def _pillow_filter(method: str, x: float) -> float:
    """Pillow's resampling filters (src/libImaging/Resample.c), in double precision as there."""
    if method == "box":
        return 1.0 if -0.5 < x <= 0.5 else 0.0
    if method == "lanczos":  # sinc(x) * sinc(x / 3), truncated at 3
        return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0
    x = abs(x)
    if method == "bilinear":
        return 1.0 - x if x < 1.0 else 0.0
    if method == "hamming":  # the constants are C floats there (0.54f, 0.46f)
        if x == 0.0 or x >= 1.0:
            return float(x == 0.0)
        return math.sin(x * math.pi) / (x * math.pi) * (_HAMMING[0] + _HAMMING[1] * math.cos(x * math.pi))
    if x < 1.0:  # bicubic, a = -0.5
        return (1.5 * x - 2.5) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * -0.5 if x < 2.0 else 0.0


def _sinc(x: float) -> float:
    return 1.0 if x == 0.0 else math.sin(x * math.pi) / (x * math.pi)


_HAMMING = (float(np.float32(0.54)), float(np.float32(0.46)))
_SUPPORT = {"box": 0.5, "bilinear": 1.0, "hamming": 1.0, "bicubic": 2.0, "lanczos": 3.0}


@functools.cache
def resample_matrix(size: int, lo: int, hi: int, method: str) -> np.ndarray:
    """Pillow's resize of pixels lo..hi-1 of a row of `size` back to `size` pixels, as a matrix [size, size] of
    the integer coefficients Pillow uses (2^22 fixed point): output j = clip((sum_i K[j, i] * in_i + 2^21) >> 22).

    Resample.c: precompute_coeffs (filter support scaled by the zoom, centre in0 + (j + 0.5) * scale, weights
    normalised to sum 1) and normalize_coeffs_8bpc (rounded half away from zero). NEAREST is no filter in
    Pillow but an affine transform (ImagingScaleAffine): input floor((j + 0.5) * scale), coefficient 2^22.
    The same size, lo = 0 and hi = size is Pillow's copy: the identity.
    """
    k, scale = np.zeros((size, size)), (hi - lo) / size
    if method == "nearest" or (lo, hi) == (0, size):
        k[np.arange(size), lo + np.floor((np.arange(size) + 0.5) * scale).astype(np.int64)] = 1.0
        return k * 2.0 ** 22
    support = _SUPPORT[method] * max(scale, 1.0)
    for j in range(size):
        centre = (j + 0.5) * scale  # of the cropped row; its pixel i is the row's lo + i
        first, last = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), hi - lo)
        ss = 1.0 / max(scale, 1.0)
        weights = [_pillow_filter(method, (i - centre + 0.5) * ss) for i in range(first, last)]
        total = sum(weights)
        for i, wt in zip(range(first, last), weights):
            wt = wt / total if total != 0.0 else wt
            k[j, lo + i] = math.trunc(wt * 2.0 ** 22 + (0.5 if wt >= 0 else -0.5))
    return k


def _rescale_matrices(level: np.ndarray, h: int, w: int) -> list[np.ndarray]:
    """rescale's crop box (scale * W, scale * H, W * (1 - scale), H * (1 - scale)), scale = level / 4, rounded
    half to even as Image.crop rounds it, and its filter: the resize matrices [n, W, W] and [n, H, H]."""
    if not len(level):
        return [np.empty((0, w, w)), np.empty((0, h, h))]
    scale, method = level[:, 0] * 0.25, (level[:, 1] * 5.99).astype(np.int64)
    box = np.round(np.stack([scale * w, scale * h, w * (1 - scale), h * (1 - scale)], 1)).astype(np.int64)
    kx = [resample_matrix(w, int(b[0]), int(b[2]), RESCALE_METHODS[m]) for b, m in zip(box, method)]
    ky = [resample_matrix(h, int(b[1]), int(b[3]), RESCALE_METHODS[m]) for b, m in zip(box, method)]
    return [np.stack(kx).reshape(-1, w, w), np.stack(ky).reshape(-1, h, h)]


def _plan_cta_round(op: np.ndarray, level: np.ndarray, where: np.ndarray, h: int,
                    w: int) -> tuple[np.ndarray, dict, list[np.ndarray]]:
    """The host's part of one round: (order: the images grouped as in _CTA_GROUPED, count of each op, [tables,
    pixel-table levels, blend factors, warp_fixed_point, resize matrices x and y, Cutout (row, column, size)])."""
    order = np.argsort(_CTA_RANK[op], kind="stable")
    level, where = level[order], where[order]
    counts = dict(zip(_CTA_GROUPED, np.bincount(_CTA_RANK[op], minlength=len(_CTA_GROUPED)).tolist()))
    tables, pixel, factors, matrices, start = [np.empty((0, 256))], [], [], [np.empty((0, 6))], 0
    for name in _CTA_GROUPED:
        kind = CTA_OPS[name][0]
        lv, wh, start = level[start:start + counts[name]], where[start:start + counts[name]], start + counts[name]
        if kind == "table" and len(lv):
            tables.append(_cta_table(name, lv[:, 0]))
        elif kind == "pixel_table":
            pixel.append(lv[:, 0])
        elif kind == "blend":
            factors.append(_enhance_factor(lv[:, 0]) if name in ("color", "contrast", "sharpness") else lv[:, 0])
        elif kind == "warp" and len(lv):
            matrices.append(_cta_matrix(name, lv[:, 0], h, w))
        elif kind == "resample":
            resize = _rescale_matrices(lv, h, w)
        elif kind == "cutout":  # the reference's centre is uniform over the pixels; side 2 * (size // 2)
            size = 1 + np.floor(lv[:, 0] * min(h, w) * 0.499)
            cut = np.stack([np.floor(wh[:, 0] * h), np.floor(wh[:, 1] * w), size], 1).astype(np.int64)
    arrays = [np.concatenate(tables)[:, None].astype(np.uint8), np.concatenate(pixel).astype(np.float32),
              np.concatenate(factors).astype(np.float32), warp_fixed_point(np.concatenate(matrices)), *resize, cut]
    return order, counts, arrays


def _resize_pass(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One pass of Pillow's resize along the last axis: exact, as every product and sum is an integer
    below 2^53 in float64; floor((s + 2^21) / 2^22) is Pillow's s >> 22."""
    return torch.floor((torch.matmul(x, k.transpose(1, 2).unsqueeze(1)) + 2.0 ** 21) / 2.0 ** 22).clamp(0, 255)


def blur(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.BLUR: the 5x5 ring of ones (centre 3x3 zero) / 16, rounded; the 2-px border is copied.
    float32."""
    f = x.float()
    rows = f[:, :, :-4] + f[:, :, 1:-3] + f[:, :, 2:-2] + f[:, :, 3:-1] + f[:, :, 4:]
    box5 = rows[:, :, :, :-4] + rows[:, :, :, 1:-3] + rows[:, :, :, 2:-2] + rows[:, :, :, 3:-1] + rows[:, :, :, 4:]
    mid = f[:, :, 1:-1, 1:-1]
    rows3 = mid[:, :, :-2] + mid[:, :, 1:-1] + mid[:, :, 2:]
    box3 = rows3[:, :, :, :-2] + rows3[:, :, :, 1:-1] + rows3[:, :, :, 2:]
    out = f.clone()
    out[:, :, 2:-2, 2:-2] = torch.floor((box5 - box3) / 16 + 0.5)  # integers below 2^24: exact in float32
    return out


def _run_cta_round(x: torch.Tensor, counts: dict, tables: torch.Tensor, pixel: torch.Tensor, factors: torch.Tensor,
                   fixed: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """The device's part of one round, on images grouped as in _CTA_GROUPED; the images in the same order."""
    b, c, h, w = x.shape
    n = {kind: sum(counts[name] for name in _CTA_GROUPED if CTA_OPS[name][0] == kind)
         for kind in ("table", "pixel_table", "blend", "warp", "resample", "cutout")}
    lut_x, blend_x, warp_x, res_x, cut_x = x.split([n["table"] + n["pixel_table"], n["blend"], n["warp"],
                                                    n["resample"], n["cutout"]])
    out = []
    if len(lut_x):
        _, ac_x, eq_x = lut_x.split([n["table"], counts["autocontrast"], counts["equalize"]])
        luts = [tables.expand(n["table"], c, 256)] if n["table"] else []
        if n["pixel_table"]:  # blended with the identity: Image.blend(x, autocontrast(x), level) is a table too
            ramp = _constants(x.device)[0].view(1, 1, 256, 1)
            own = [fn(part) for fn, part in ((autocontrast_lut, ac_x), (equalize_lut, eq_x)) if len(part)]
            own = (torch.cat(own) if len(own) > 1 else own[0]).unsqueeze(3)
            luts.append(blend(ramp, own, pixel).squeeze(3))
        out.append(apply_lut(lut_x, torch.cat(luts) if len(luts) > 1 else luts[0]))
    if len(blend_x):
        gray_x, smooth_x, blur_x = blend_x.split([counts["color"] + counts["contrast"],
                                                  counts["sharpness"] + counts["smooth"], counts["blur"]])
        gray_color, gray_contrast = grayscale(gray_x).split([counts["color"], counts["contrast"]])
        smoothed = smooth(smooth_x)
        sm_sharp, sm_smooth = smoothed.split([counts["sharpness"], counts["smooth"]])
        x_sharp, x_smooth = smooth_x.split([counts["sharpness"], counts["smooth"]])
        # Enhance blends from the degenerate image to x, Image.blend(x, filtered, level) from x to the filtered
        first = [gray_color.expand(-1, c, h, w), mean_level(gray_contrast).expand(-1, c, h, w), sm_sharp,
                 x_smooth.float(), blur_x.float()]
        second = [gray_x, x_sharp, sm_smooth.to(x.dtype), blur(blur_x).to(x.dtype)]
        out.append(blend(torch.cat(first), torch.cat(second), factors))
    if len(warp_x):
        out.append(warp(warp_x, warp_source(fixed, h, w)))
    if len(res_x):
        out.append(_resize_pass(_resize_pass(res_x.double(), kx).transpose(2, 3), ky).transpose(2, 3).to(x.dtype))
    if len(cut_x):
        centre, size = cut.split([2, 1], 1)
        out.append(_fill_box(cut_x, *_cutout_masks(centre.contiguous(), h, w, size.reshape(-1, 1, 1, 1), 127)))
    return torch.cat(out) if len(out) > 1 else out[0]


def cta_augment(x: torch.Tensor, policy: dict[str, np.ndarray]) -> torch.Tensor:
    """Apply a CTAugment policy (cta_policy's) to images x [B, C, H, W] on x's device: each image's ops in
    order, as libml/ctaugment.py `apply` does (the reference adds no Cutout after them: AugmentPoolCTA)."""
    b, _, h, w = x.shape
    rounds, arrays, position = [], [], np.arange(b)
    for op, level, where in zip(policy["op"], policy["level"], policy["where"]):
        order, counts, plan = _plan_cta_round(op, level, where, h, w)
        arrays += [position[order], *plan]
        rounds.append(counts)
        position = np.argsort(order)
    tensors = _send(arrays + [position], x.device)
    for r, counts in enumerate(rounds):
        x = _run_cta_round(x.index_select(0, tensors[8 * r]), counts, *tensors[8 * r + 1:8 * r + 8])
    return x.index_select(0, tensors[-1])


def cta_apply_op(name: str, x: torch.Tensor, level, where=(0.5, 0.5)) -> torch.Tensor:
    """Apply CTAugment op `name` to images x at `level`: a scalar, one per image [B], or [B, 2] (rescale's two
    parameters: scale, method); for cutout, `where` places the centre (fractions of the rows and columns)."""
    b = len(x)
    level = np.asarray(torch.as_tensor(level, dtype=torch.float64).cpu())
    level = np.broadcast_to(level.reshape(-1, 1) if level.ndim < 2 else level, (b, 2))
    where = np.broadcast_to(np.asarray(where, dtype=np.float64), (b, 2))
    policy = {"op": np.full((1, b), CTA_NAMES.index(name)), "level": level[None].copy(), "where": where[None].copy()}
    return cta_augment(x, policy)


# ----------------------------------------------------------------------------------------------------
# CTAugment in a training step (--augment ctaugment), as google-research/fixmatch's CTA runs do it
# (libml/augment.py AugmentPoolCTA, cta/lib/train.py CTAClassifySemi.train_step). Every image is first weakly
# augmented (the reference's flip + 4-px shift, its tf side 'd'). A labeled image then gives two views: the
# training image, weak + a CTA training policy, and the probe, weak + a probe policy. An unlabeled image keeps
# its weak view, and every other view is weak (drawn anew) + a training policy of its own; no Cutout is added
# after the ops (cutout is one of the 19). After the optimizer step and the EMA update, the EMA model predicts
# the probes, and how well it still classifies them moves the rates of the bins their policies used.
# The rates live on the host, where the policies are drawn: on CUDA, the probe's predictions come back to the
# host once per step (one sync), the only one the CTA step adds.
# ----------------------------------------------------------------------------------------------------
def cta_labeled_views(x_weak: torch.Tensor, rates: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, tuple[torch.Tensor, dict]]:
    """AugmentPoolCTA's labeled batch from weakly augmented images x_weak [B, C, H, W]: the training images
    (weak + a CTA training policy) and the probe, (probe images: weak + a probe policy, that policy), which
    cta_probe scores. The draws, as the reference's: the probe policy, then the training policy."""
    probe_policy = cta_policy(rates, generator, len(x_weak), probe=True)
    probe = cta_augment(x_weak, probe_policy)
    return cta_augment(x_weak, cta_policy(rates, generator, len(x_weak))), (probe, probe_policy)


def cta_strong_augment(x: torch.Tensor, rates: torch.Tensor, generator: torch.Generator,
                       views: int | None = None) -> torch.Tensor:
    """CTAugment's strong view, in place of strong_augment: weak augmentation, then a CTA training policy per image
    (AugmentPoolCTA's unlabeled views; no Cutout added). With `views`: [views, B, ...], each its own draws."""
    weak = weak_augment(x, generator, views=views)
    flat = weak.flatten(0, 1) if views is not None else weak
    return cta_augment(flat, cta_policy(rates, generator, len(flat))).view_as(weak)


@torch.no_grad()
def cta_probe(model: nn.Module, probe: tuple[torch.Tensor, dict], labels: torch.Tensor, rates: torch.Tensor,
              amp: bool, mean_std: tuple = (CIFAR10_MEAN, CIFAR10_STD)) -> torch.Tensor:
    """CTAugment's feedback (cta/lib/train.py, train_step): `model` (the EMA model, as the reference's
    classify_op) predicts the probe images (cta_labeled_views) in eval mode, without gradient, as evaluation
    does; returns the new rates (cta_update with their true labels). The model's mode is left as it was."""
    images, policy = probe
    training = model.training
    model.eval()
    try:
        x = normalize(images, *mean_std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            probs = torch.softmax(model(x).float(), dim=1)
    finally:
        model.train(training)
    return cta_update(rates, policy, probs, labels)


# ----------------------------------------------------------------------------------------------------
# WideResNet (Zagoruyko & Komodakis 2016), as in the FixMatch reference (libml/models.py)
# ----------------------------------------------------------------------------------------------------
def _bn(channels: int) -> nn.BatchNorm2d:
    # TF's momentum 0.999 is PyTorch's 0.001: running statistics move slowly, which is why early
    # evaluations of a fresh model look poor.
    return nn.BatchNorm2d(channels, momentum=0.001)


def ghost_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, groups: list[int] | None = None) -> torch.Tensor:
    """BatchNorm with statistics per group ("ghost" batch norm): x [N, ...] is split into consecutive groups of
    `groups` samples (sizes summing to N, they may differ), and in training mode group g is normalised with its own

        y_i = gamma (x_i - mu_g) / sqrt(var_g + eps) + beta,   mu_g, var_g over group g's samples and pixels,

    as if each group went through the network in a forward pass of its own. Only the first group updates the
    running statistics, exactly as bn(first group) does (r <- (1 - momentum) r + momentum * its mean and unbiased
    variance; num_batches_tracked + 1); the others leave them alone, like passes with track_running_stats off.
    In eval mode (running statistics for all) or with groups None it is bn(x).

    A loop over groups, not over samples: the group sizes are fixed Python ints, so torch.compile unrolls it.
    """
    if groups is None or not bn.training:
        return bn(x)
    first, *rest = x.split(groups)
    return torch.cat([bn(first)] + [F.batch_norm(part, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
                                    for part in rest])


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

    def forward(self, x: torch.Tensor, bn_groups: list[int] | None = None) -> torch.Tensor:
        a = F.leaky_relu(ghost_batch_norm(self.bn1, x, bn_groups), 0.1)
        if self.activate_before_residual:
            x = a
        out = self.conv2(F.leaky_relu(ghost_batch_norm(self.bn2, self.conv1(a), bn_groups), 0.1))
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: conv3x3(16), three groups of (depth-4)/6 blocks at 16k, 32k, 64k channels.

    `features(x)` returns the pooled features; `fc` is the class head, so a script can add its own
    head on the same features (ReMixMatch's rotation classifier). Both take `bn_groups` (see `forward`).
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

    def features(self, x: torch.Tensor, bn_groups: list[int] | None = None) -> torch.Tensor:
        x = self.body[0](x)  # the first convolution; then the residual blocks
        for block in self.body[1:]:
            x = block(x, bn_groups)
        return F.leaky_relu(ghost_batch_norm(self.bn, x, bn_groups), 0.1).mean((2, 3))

    def forward(self, x: torch.Tensor, bn_groups: list[int] | None = None) -> torch.Tensor:
        """Logits. In training mode, bn_groups (sizes of consecutive groups of x, e.g. [B, B, B]) makes every
        BatchNorm layer normalise each group with its own statistics and update its running statistics from the
        first group only (`ghost_batch_norm`): one pass that computes what a pass per group would."""
        return self.fc(self.features(x, bn_groups))


# ----------------------------------------------------------------------------------------------------
# A trained network: every run writes model.pt at its end (the scripts' save_model), and this reads it back
# ----------------------------------------------------------------------------------------------------
MODEL_FILE_VERSION = 1  # model.pt's layout; a later layout gets a new number, so an old reader refuses it clearly


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[WideResNet, dict]:
    """A run's model.pt -> (the trained WideResNet on `device`, in eval mode; its metadata).

    The metadata is everything in model.pt but the weights: "classes" (names, in the order of the network's
    outputs), "mean", "std" and "image_size" (what the network expects: `normalize(x, meta["mean"],
    meta["std"])` of uint8 images of that size, e.g. from `read_image(path, meta["image_size"])`),
    "architecture" (depth, widen_factor, num_classes), "algorithm", "dataset", "n_labeled", "seed", "steps" and
    "final_top1" (the EMA model's test top-1 at the end of training). DataError if the file is missing or is no
    model.pt. The file holds only plain data (read with weights_only=True): loading it runs no code from it.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path} not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("version") != MODEL_FILE_VERSION:
            raise ValueError(f"version {saved.get('version')!r}, expected {MODEL_FILE_VERSION}")
        arch = saved["architecture"]
        # Built on the meta device: no random initialisation to overwrite, and the caller's random stream is untouched.
        with torch.device("meta"):
            model = WideResNet(arch["num_classes"], depth=arch["depth"], widen_factor=arch["widen_factor"])
        model.load_state_dict(saved["weights"], assign=True)
    except Exception as e:  # torch and pickle raise many kinds of errors on a file that is not a model.pt
        reason = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{path} is not a readable model.pt ({type(e).__name__}: {reason[:200]})") from None
    return model.to(device).eval(), {k: v for k, v in saved.items() if k != "weights"}
