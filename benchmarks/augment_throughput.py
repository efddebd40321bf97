"""Augmentation throughput: common.py's batched weak/strong augmentation vs a per-image Pillow pipeline.

The per-image pipeline is what a DataLoader-based implementation runs for every image (tensor -> PIL,
torchvision's RandomHorizontalFlip + RandomCrop(32, padding=4, reflect), two random ops from the same
14-op pool with random magnitudes as Pillow calls, a 16 px gray Cutout, back to a tensor), here in a
single process. Each timing is the median of --repeats batches after warm-up.

    python benchmarks/augment_throughput.py [--device cpu] [--batch-size 448] [--repeats 20]
"""

import argparse
import os
import platform
import random
import statistics
import sys
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageEnhance, ImageOps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # common.py lives in the repository root, one level up
import common  # noqa: E402


def pil_op(im: Image.Image, name: str, v: float) -> Image.Image:
    """One RandAugment op as FixMatch's reference writes it with Pillow (NEAREST resampling, black fill); v in
    the op's own units, as in common.RANDAUGMENT_OPS (Posterize and Solarize take int(v), v >= 0)."""
    if name == "Identity":
        return im
    if name == "AutoContrast":
        return ImageOps.autocontrast(im)
    if name == "Equalize":
        return ImageOps.equalize(im)
    if name == "Posterize":
        return ImageOps.posterize(im, int(v))
    if name == "Solarize":
        return ImageOps.solarize(im, int(v))
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return getattr(ImageEnhance, name)(im).enhance(v)
    if name == "Rotate":
        return im.rotate(v)
    w, h = im.size
    matrix = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
              "TranslateX": (1, 0, v * w, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, v * h)}[name]
    return im.transform(im.size, Image.AFFINE, matrix)


WEAK_PIL = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4, padding_mode="reflect")])


def pil_weak(x: torch.Tensor) -> torch.Tensor:
    out = [np.asarray(WEAK_PIL(Image.fromarray(img.permute(1, 2, 0).numpy()))) for img in x]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def pil_strong(x: torch.Tensor) -> torch.Tensor:
    out = []
    for img in x:
        im = WEAK_PIL(Image.fromarray(img.permute(1, 2, 0).numpy()))
        for _ in range(2):
            name = random.choice(common.OP_NAMES)
            _, _, lo, hi = common.RANDAUGMENT_OPS[name]
            im = pil_op(im, name, random.uniform(lo, hi))
        a = np.array(im)  # writable copy: Cutout paints into it
        cy, cx = random.randrange(32), random.randrange(32)
        a[max(cy - 8, 0):cy + 8, max(cx - 8, 0):cx + 8] = 127
        out.append(a)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def median_seconds(pipelines: dict, repeats: int, warmup: int, sync) -> dict[str, float]:
    """Median seconds per call of each pipeline. The pipelines take turns, one call each per round, so
    that a change in the machine's load (it may be shared) hits all of them alike."""
    for _ in range(warmup):
        for fn in pipelines.values():
            fn()
    sync()
    times = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, fn in pipelines.items():
            start = time.perf_counter()
            fn()
            sync()  # GPU work is asynchronous: time until it is done
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="device for common.py's batched augmentation (cpu, cuda)")
    p.add_argument("--batch-size", type=int, default=448, help="images per batch (448 = FixMatch's 64 x (1 + mu 7))")
    p.add_argument("--repeats", type=int, default=20, help="timed batches per pipeline; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "cifar10"),
                   help="CIFAR-10 folder; random uint8 images are used if it holds no cifar-10-batches-py/")
    p.add_argument("--seed", type=int, default=0, help="seed for the images and both pipelines' draws")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default, one per core). On a CPU shared with "
                        "another job, 1 thread avoids the stalls of threads waiting for each other")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if os.path.isdir(os.path.join(args.data_dir, "cifar-10-batches-py")):
        x = common.load_cifar10(args.data_dir, download=False)["train_x"][: args.batch_size]
        source = f"CIFAR-10 training images from {os.path.normpath(args.data_dir)}"
    else:
        x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8)
        source = "random uint8 images (no CIFAR-10 at --data-dir)"
    if len(x) < args.batch_size:  # the real set is large; only a tiny --data-dir copy can run short
        x = x.repeat((args.batch_size + len(x) - 1) // len(x), 1, 1, 1)[: args.batch_size]
    xd = x.to(device)
    g = torch.Generator().manual_seed(args.seed)

    s = median_seconds({
        "weak_pil": lambda: pil_weak(x),
        "strong_pil": lambda: pil_strong(x),
        "weak": lambda: common.weak_augment(xd, g),
        "strong": lambda: common.strong_augment(xd, g),
    }, args.repeats, args.warmup, sync)
    rows = [  # (pipeline, seconds per batch, seconds of the per-image pipeline it is compared with)
        (f"weak: common.weak_augment, batched ({device.type})", s["weak"], s["weak_pil"]),
        ("weak: per-image PIL + torchvision", s["weak_pil"], s["weak_pil"]),
        (f"strong: common.strong_augment, batched ({device.type})", s["strong"], s["strong_pil"]),
        ("strong: per-image PIL + torchvision", s["strong_pil"], s["strong_pil"]),
    ]

    print(f"{source}; batch {args.batch_size}; median of {args.repeats} after {args.warmup} warm-up batches")
    print(f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
          f"(intra-op threads: {torch.get_num_threads()}), Pillow {Image.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    if hasattr(os, "getloadavg"):  # other jobs on the machine slow every row: say how busy it was
        print(f"load average over the last minute at the end: {os.getloadavg()[0]:.1f}")
    print()
    print("| pipeline | images/s | ms per batch | speed-up |")
    print("|---|---:|---:|---:|")
    for name, sec, ref in rows:
        print(f"| {name} | {args.batch_size / sec:,.0f} | {sec * 1000:.1f} | {ref / sec:.1f}x |")


if __name__ == "__main__":
    main()
