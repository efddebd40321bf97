"""Shared test fixtures: a small synthetic CIFAR-10 in the real file format.

Tests never need the real data set: `write_cifar` writes 32x32 images that look like photos to the
augmentation ops (smooth regions, gradients, a little pixel noise, clipped highlights) and carry a
class-dependent colour and stripe pattern, so a tiny network trained for a few steps beats chance.
"""

import getpass
import math
import os
import pickle
import platform
import re
import tempfile
from collections.abc import Mapping

# One thread for the tests and the scripts they start: their tensors are tiny, so a second thread costs
# more in synchronisation than it saves, and on a busy machine (a training run beside the tests) two
# threads make every small op wait for two free cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CPU kernels pinned to one instruction set on x86, so that tests/golden holds on every x86 machine. torch's
# vectorised kernels, MKL's matrix products and oneDNN's convolutions each pick the widest instructions a CPU has
# (AVX-512 where there is one, AVX2 on the AMD EPYC VM that recorded tests/golden), and the wider ones add in
# another order: after their 12 steps the tiny runs differed by up to 3e-3 relative between an Intel VM with
# AVX-512 and that AMD VM (fixmatch.py 8e-4, supervised.py 1e-6: pseudo-labels and masks amplify a rounding
# difference), and by up to 9e-5 on an AMD EPYC with AVX-512 (Zen 4) while oneDNN alone was not pinned. AVX2 is
# on all of them; set before torch loads, and inherited by the scripts the tests start.
PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
# What a run started from the same shell gets (test_amp_compile.py starts one): the pins and inductor's cache folder
# as they were before this file changed them (None: unset).
OUTSIDE = {name: os.environ.get(name) for name in (*PINS, "TORCHINDUCTOR_CACHE_DIR")}
if platform.machine() in ("x86_64", "AMD64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")  # MKL's conditional numerical reproducibility
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def inductor_cache_for_pins(environ: Mapping[str, str]) -> str:
    """The folder for inductor's on-disk cache of processes with `environ`'s pins: beside the folder a run from the
    same shell uses (TORCHINDUCTOR_CACHE_DIR, else inductor's default, torchinductor_<user> in the system temp
    folder), named after the pins' values, e.g. /tmp/torchinductor_alice_tests_avx2_avx2-strict_avx2."""
    values = [re.sub(r"[^a-z0-9]+", "-", environ[name].lower()) for name in PINS if environ.get(name)]
    suffix = "_tests_" + ("_".join(values) or "unpinned")
    base = environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not base:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (in a container): inductor falls back the same way
            user = f"uid_{os.getuid()}"
        base = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return base if base.endswith(suffix) else base + suffix  # a nested pytest inherits the folder: keep it


def outside_environment() -> dict[str, str]:
    """os.environ as a run started from the same shell as the tests has it: their pins and cache folder undone."""
    env = {k: v for k, v in os.environ.items() if k not in OUTSIDE}
    return env | {k: v for k, v in OUTSIDE.items() if v is not None}


# Inductor's on-disk cache (torch.compile) is keyed without the ATen CPU capability (torch 2.14.1): kernels generated
# for AVX2 were loaded by a later unpinned --compile run on an AVX-512 machine, which aborted (malloc(): unaligned
# fastbin chunk detected), and the tests' AVX2 runs loaded AVX-512 kernels and trained on NaN. So the tests and the
# scripts they start compile into a folder of their own, named after the pins, never into the one that runs outside
# the tests use; it persists, so that the compiled tests are fast from the second run on.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_for_pins(os.environ)

import numpy as np  # noqa: E402 (after the environment above: torch reads it when it loads)
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
# Convolutions through ATen's own kernels (im2col, then MKL's sgemm, held to one instruction set by MKL_CBWR above)
# instead of oneDNN's or NNPACK's. oneDNN picks its convolution kernels and their blocking by the CPU's vendor and
# cache sizes, capped ISA or not: with every pin above set, tests/golden as the AMD EPYC VM recorded it with oneDNN
# differed on an Intel Xeon by up to 3e-4 relative (supervised.py) and 1e-3 (fixmatch.py). The scripts keep oneDNN
# (faster); what the tests hold is the computation, in a summation order that does not depend on the machine.
torch.backends.mkldnn.enabled = False
torch.backends.nnpack.set_flags(False)

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# One colour per class (RGB, 0..255), far enough apart that the mean colour alone separates most classes.
PALETTE = np.array([
    [200, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60], [200, 60, 200],
    [60, 200, 200], [230, 140, 40], [120, 60, 160], [140, 140, 140], [40, 110, 70],
], dtype=np.float64)


def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 images [N, 3, 32, 32] for the given labels (0..9); a pure function of (labels, seed)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    # Smooth random content: 4x4 noise upsampled bilinearly, like the large blurry shapes of a photo.
    low = torch.from_numpy(rng.uniform(0, 255, (n, 3, 4, 4)))
    img = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    # A random linear gradient (lighting), so that no two corners have the same brightness.
    yy, xx = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    angle = rng.uniform(0, 2 * math.pi, (n, 1, 1, 1))
    img += rng.uniform(20, 60, (n, 1, 1, 1)) * (np.cos(angle) * xx + np.sin(angle) * yy)
    # The class signal: blend towards the class colour, plus stripes whose orientation depends on the class.
    colour = PALETTE[labels].reshape(n, 3, 1, 1)
    img = 0.5 * img + 0.5 * colour
    theta = (labels.reshape(n, 1, 1, 1) * math.pi / 10)
    phase = rng.uniform(0, 2 * math.pi, (n, 1, 1, 1))
    img += 25 * np.sin(2 * math.pi * 3 * (np.cos(theta) * xx + np.sin(theta) * yy) / 2 + phase)
    # Per-image contrast (some images clip at 0 or 255, as over-exposed photos do) and sensor noise.
    mean = img.mean(axis=(1, 2, 3), keepdims=True)
    img = mean + rng.uniform(0.6, 1.6, (n, 1, 1, 1)) * (img - mean) + rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are Python-2 pickles (protocol 2)


def write_cifar(root: str, n_train_per_class: int = 50, n_test_per_class: int = 20, seed: int = 0) -> str:
    """Write a synthetic CIFAR-10 into <root>/cifar-10-batches-py/ in the real file format; returns root.

    data_batch_1..5 share the training images (class order shuffled, as in the real files), test_batch
    holds the test images, batches.meta the class names. Keys are bytes, as `pickle.load(f,
    encoding="bytes")` returns them for the originals; b"data" is uint8 [N, 3072] (R, G, B planes,
    row-major), b"labels" a list of ints.
    """
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"train": n_train_per_class, "test": n_test_per_class}
    for split, per_class in splits.items():
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        images = synthetic_images(labels, seed=int(rng.integers(2**31)))
        data = images.reshape(len(labels), 3072)
        if split == "train":
            parts = np.array_split(np.arange(len(labels)), 5)  # sizes differ by at most 1 if not divisible
            names = [f"data_batch_{i}" for i in range(1, 6)]
        else:
            parts, names = [np.arange(len(labels))], ["test_batch"]
        for i, (name, idx) in enumerate(zip(names, parts)):
            _dump(os.path.join(folder, name), {
                b"batch_label": f"{split} batch {i + 1} of {len(parts)}".encode(),
                b"labels": [int(y) for y in labels[idx]],
                b"data": np.ascontiguousarray(data[idx]),
                b"filenames": [f"synthetic_{split}_{j}.png".encode() for j in idx],
            })
    _dump(os.path.join(folder, "batches.meta"), {
        b"label_names": [name.encode() for name in CLASS_NAMES],
        b"num_cases_per_batch": 10000,
        b"num_vis": 3072,
    })
    return root


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> str:
    """A folder holding cifar-10-batches-py/ with the default synthetic set (500 train, 200 test images)."""
    return write_cifar(str(tmp_path_factory.mktemp("cifar")))


@pytest.fixture(scope="session")
def photo_like_images() -> torch.Tensor:
    """uint8 [40, 3, 32, 32] of the synthetic kind above, 4 of every class (for augmentation tests)."""
    return torch.from_numpy(synthetic_images(np.repeat(np.arange(10), 4), seed=1))


def pytest_configure(config):
    # Slow tests stay in the default run (.ci/run runs everything); `-m "not slow"` skips them while iterating.
    config.addinivalue_line("markers", "slow: takes a minute or more on a 2-core CPU (e.g. a cold torch.compile)")
