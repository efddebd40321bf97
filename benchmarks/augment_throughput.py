"""Augmentation throughput: common.py's batched weak/strong augmentation and CTAugment vs per-image Pillow pipelines.

The per-image pipeline is what a DataLoader-based implementation runs for every image (tensor -> PIL,
torchvision's RandomHorizontalFlip + RandomCrop(32, padding=4, reflect), two random ops from the same
14-op pool with random magnitudes as Pillow calls, a 16 px gray Cutout, back to a tensor), here in a
single process. The CTAugment row: a training policy (cta_policy) and its 2 ops (cta_augment) on the batch,
against 2 ops per image with the reference's Pillow calls (pil_cta_op, uniform levels); a last line compares
it with common.py's RandAugment (2 ops, randaugment). Each timing is the median of --repeats batches after warm-up.

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
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

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


def pil_cta_op(im: Image.Image, name: str, level: float, level2: float = 0.0,
               where: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """One CTAugment op as google-research/fixmatch's libml/ctaugment.py applies it with Pillow, at levels in
    [0, 1] (level2: rescale's method); Cutout's centre is (row, column) = int(where * size) instead of the
    reference's np.random draw inside the op."""
    def mix(other: Image.Image) -> Image.Image:  # the reference's _imageop and _filter
        return Image.blend(im, other, level)

    if name in ("autocontrast", "equalize", "invert"):
        return mix(getattr(ImageOps, name)(im))
    if name in ("blur", "smooth"):
        return mix(im.filter(ImageFilter.BLUR if name == "blur" else ImageFilter.SMOOTH))
    if name in ("brightness", "color", "contrast", "sharpness"):  # the reference's _enhance
        return getattr(ImageEnhance, name.capitalize())(im).enhance(0.1 + 1.9 * level)
    if name == "cutout":
        size, a = 1 + int(level * min(im.size) * 0.499), np.array(im)
        cy, cx = int(where[0] * im.size[1]), int(where[1] * im.size[0])
        a[max(cy - size // 2, 0):cy + size // 2, max(cx - size // 2, 0):cx + size // 2] = 127
        return Image.fromarray(a)
    if name == "posterize":
        return ImageOps.posterize(im, 1 + int(level * 7.999))
    if name == "solarize":
        return ImageOps.solarize(im, int(level * 255.999))
    if name == "rescale":
        w, h = im.size
        s = level * 0.25
        methods = [getattr(Image.Resampling, m.upper()) for m in common.RESCALE_METHODS]
        return im.crop((s * w, s * h, w * (1 - s), h * (1 - s))).resize(im.size, methods[int(level2 * 5.99)])
    if name == "rotate":
        return im.rotate(int(np.round((2 * level - 1) * 45)))
    v = (2 * level - 1) * 0.3
    matrix = {"shear_x": (1, v, 0, 0, 1, 0), "shear_y": (1, 0, 0, v, 1, 0), "translate_x": (1, 0, v, 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, v)}.get(name)
    return im if matrix is None else im.transform(im.size, Image.AFFINE, matrix)  # identity: unchanged


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


def pil_cta(x: torch.Tensor) -> torch.Tensor:
    out = []
    for img in x:
        im = Image.fromarray(img.permute(1, 2, 0).numpy())
        for _ in range(2):
            im = pil_cta_op(im, random.choice(common.CTA_NAMES), random.random(), random.random(),
                            (random.random(), random.random()))
        out.append(np.asarray(im))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def median_seconds(pipelines: dict, repeats: int, warmup: int, sync) -> dict[str, dict[str, float]]:
    """Median seconds per call of each pipeline, as wall time and as this thread's CPU time. The pipelines take
    turns, one call each per round, so that a change in the machine's load (it may be shared) hits all of them
    alike. CPU time is the per-core cost: on a loaded machine wall time also counts the time the thread waited
    for a core; both pipelines run on this one thread."""
    for _ in range(warmup):
        for fn in pipelines.values():
            fn()
    sync()
    times = {name: {"wall": [], "cpu": []} for name in pipelines}
    for _ in range(repeats):
        for name, fn in pipelines.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            sync()  # GPU work is asynchronous: time until it is done
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.thread_time() - start_cpu)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


# Operations that make a view (no data touched: no kernel on a GPU), and the common.py functions that work on
# the host's CPU tensors only (the random draws and what is computed from them alone).
VIEW_OPS = {"aten::view", "aten::reshape", "aten::expand", "aten::slice", "aten::select", "aten::split_with_sizes",
            "aten::unsqueeze", "aten::detach", "aten::alias", "aten::resolve_conj", "aten::resolve_neg",
            "aten::lift_fresh"}
HOST_FUNCTIONS = {"_draw_weak", "_draw_ops", "_draw_strong", "rotate_matrix", "plan_strong"}


def count_ops(fn) -> tuple[int, dict[str, int]]:
    """Top-level aten operations of one call of fn (torch.profiler; each is one dispatch, and on a GPU one kernel
    launch unless it only makes a view), in all and by the common.py function that issued them; the dict also
    holds "(views)" and "(host)" totals."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        fn()
    total, by_function = 0, {}
    for e in prof.events():
        parent, function, top = e.cpu_parent, "(outside common.py)", e.name.startswith("aten::")
        while parent is not None and top:
            if parent.name.startswith("aten::"):
                top = False
            elif function == "(outside common.py)" and "common.py" in parent.name:
                function = parent.name.split(": ")[-1]
            parent = parent.cpu_parent
        if top:
            total += 1
            by_function[function] = by_function.get(function, 0) + 1
            kind = "(host)" if function in HOST_FUNCTIONS else "(views)" if e.name in VIEW_OPS else "(device)"
            by_function[kind] = by_function.get(kind, 0) + 1
    return total, dict(sorted(by_function.items(), key=lambda kv: (not kv[0].startswith("("), -kv[1])))


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
    p.add_argument("--runs", type=int, default=1, help="repeat the whole measurement; the table shows the range")
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "cifar10"),
                   help="CIFAR-10 folder; random uint8 images are used if it holds no cifar-10-batches-py/")
    p.add_argument("--seed", type=int, default=0, help="seed for the images and both pipelines' draws")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default, one per core). 1, the default, compares the "
                        "pipelines per core: the per-image one runs on one thread too")
    p.add_argument("--count-ops", action="store_true", help="only count the operations of one call of each")
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

    if args.count_ops:
        print(f"Top-level aten operations of one call on {args.batch_size} images ({device.type}), torch.profiler:\n")
        calls = {"weak_augment": lambda: common.weak_augment(xd, g),
                 "strong_augment": lambda: common.strong_augment(xd, g),
                 "strong_augment(fixed_shapes=True)": lambda: common.strong_augment(xd, g, fixed_shapes=True)}
        for name, call in calls.items():
            total, by_function = count_ops(call)
            print(f"{name}: {total} (" + ", ".join(f"{k} {v}" for k, v in by_function.items()) + ")")
        s = median_seconds(calls, args.repeats, args.warmup, sync)
        print(f"\nms per call, median of {args.repeats} (this thread's CPU time; wall time): "
              + ", ".join(f"{name} {1e3 * t['cpu']:.1f} ({1e3 * t['wall']:.1f})" for name, t in s.items()))
        return

    rates = common.cta_rates(device)
    speedups, cta_vs_ra = {"weak": [], "strong": [], "cta": []}, []
    for run in range(args.runs):
        s = median_seconds({
            "weak_pil": lambda: pil_weak(x),
            "strong_pil": lambda: pil_strong(x),
            "cta_pil": lambda: pil_cta(x),
            "weak": lambda: common.weak_augment(xd, g),
            "strong": lambda: common.strong_augment(xd, g),
            "cta": lambda: common.cta_augment(xd, common.cta_policy(rates, g, args.batch_size)),
            "randaugment": lambda: common.randaugment(xd, g),
        }, args.repeats, args.warmup, sync)
        cta_vs_ra.append((s["cta"]["cpu"], s["randaugment"]["cpu"]))
        for kind in speedups:
            speedups[kind].append((s[f"{kind}_pil"]["cpu"] / s[kind]["cpu"], s[kind]["cpu"], s[f"{kind}_pil"]["cpu"],
                                   s[f"{kind}_pil"]["wall"] / s[kind]["wall"]))
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}x per core ({v[-1][3]:.1f}x wall)"
                                             for k, v in speedups.items()), flush=True)

    print(f"\n{source}; batch {args.batch_size}; per run, the median of {args.repeats} batches after {args.warmup} "
          f"warm-up batches; {args.runs} run(s)")
    print(f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
          f"(intra-op threads: {torch.get_num_threads()}), Pillow {Image.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    if hasattr(os, "getloadavg"):  # other jobs on the machine slow every row: say how busy it was
        print(f"load average over the last minute at the end: {os.getloadavg()[0]:.1f}")

    def span(values, fmt):
        values = sorted(values)
        return fmt(statistics.median(values)) if len(values) == 1 else \
            f"{fmt(statistics.median(values))} ({fmt(values[0])} - {fmt(values[-1])})"

    print("\nImages per second of CPU time (this thread), median (range over runs):\n")
    print("| pipeline | batched (common.py) | per-image PIL + torchvision | speed-up per core | speed-up, wall time |")
    print("|---|---:|---:|---:|---:|")
    for kind, rows in speedups.items():
        print(f"| {kind} | {span([args.batch_size / r[1] for r in rows], '{:,.0f}'.format)} | "
              f"{span([args.batch_size / r[2] for r in rows], '{:,.0f}'.format)} | "
              f"{span([r[0] for r in rows], '{:.1f}x'.format)} | {span([r[3] for r in rows], '{:.1f}x'.format)} |")
    print(f"\nCTAugment (policy + 2 ops) against RandAugment (2 ops), batched, images per second of CPU time: "
          f"{span([args.batch_size / c for c, _ in cta_vs_ra], '{:,.0f}'.format)} against "
          f"{span([args.batch_size / r for _, r in cta_vs_ra], '{:,.0f}'.format)}, "
          f"{span([r / c for c, r in cta_vs_ra], '{:.2f}x'.format)}")


if __name__ == "__main__":
    main()
