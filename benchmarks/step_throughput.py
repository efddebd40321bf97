"""Training-step throughput of every algorithm script, next to the model-only limit.

For each script, the real training loop runs (sampling, augmentation, the script's train_step, the EMA
update) on synthetic uint8 data of CIFAR's shape, for 2 x --steps steps with an evaluation in between;
the second window's images/s (metrics.jsonl's img_per_s, which excludes evaluation) is the figure, so
warm-up (cuDNN autotuning, allocator growth, compilation) is not counted. Next to it, the "model-only"
step: forward + backward + optimizer step of the same network on the same number of pre-made images, with
no sampling, augmentation, losses beyond cross-entropy or EMA. full / model-only is the pipeline's
efficiency (1.0 = the data pipeline and algorithm cost nothing). Augmentation alone is timed at the
unlabeled batch size. Prints a Markdown table. A row may carry the script's flags: "fixmatch --augment ctaugment"
is FixMatch with CTAugment (its policies, ops and the probe's forward pass of the B labeled images), and
"remixmatch --augment randaugment" is ReMixMatch as it ran before CTAugment became its default.

    python benchmarks/step_throughput.py                      # CPU: WRN-28-2, batch 16, 4 steps per window
    python benchmarks/step_throughput.py --device cuda        # GPU: WRN-28-2, batch 64, 50 steps per window
    python benchmarks/step_throughput.py --algorithms fixmatch "fixmatch --augment ctaugment"   # side by side
"""

import argparse
import contextlib
import io
import json
import os
import pickle
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

ALGORITHMS = ["supervised", "fixmatch", "fixmatch --augment ctaugment", "flexmatch", "freematch", "softmatch",
              "mixmatch", "remixmatch", "remixmatch --augment randaugment"]


def write_synthetic_cifar(root: str, n_train: int = 50000, n_test: int = 1000) -> None:
    """Random images in CIFAR's file format: the speed of a step does not depend on what the pixels show."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    sizes = [n_train // 5] * 5 + [n_test]
    for name, n in zip(names, sizes):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": (np.arange(n) % 10).tolist()}, f)


def time_script(algorithm: str, data_dir: str, args: argparse.Namespace) -> tuple[float, int]:
    """(images/s of the second window, images per step) of the real script's loop; `algorithm` is the script's
    name, optionally followed by its flags."""
    name, *flags = algorithm.split()
    module = __import__(name)
    out = tempfile.mkdtemp(prefix=f"bench_{name}_")
    argv = ["--data-dir", data_dir, "--out", out, "--device", args.device, "--depth", str(args.depth),
            "--widen-factor", str(args.widen_factor), "--batch-size", str(args.batch_size), "--n-labeled", "4000",
            "--epochs", "1", "--steps-per-epoch", str(2 * args.steps), "--eval-every", str(args.steps),
            "--log-every", str(10 ** 9)] + (["--compile"] if args.compile else []) + flags
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert module.main(argv) == 0, buffer.getvalue()
    images_per_step = int(re.search(r"steps of (\d+) images", buffer.getvalue())[1])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows[1]["img_per_s"], images_per_step


def model_step(images: int, device: torch.device, depth: int, widen_factor: int, compile: bool = False,
               for_graph: bool = False):
    """A function of no arguments: forward + backward + SGD step of a fresh WRN-depth-widen_factor on `images`
    pre-made images, bf16 on CUDA. for_graph: gradients zeroed in place and no autocast cast cache, so that a
    CUDA graph can capture it (benchmarks/gpu_check.py)."""
    amp = device.type == "cuda"
    model = common.WideResNet(depth=depth, widen_factor=widen_factor).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=amp)
    forward = torch.compile(model) if compile else model
    x = torch.randn(images, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (images,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=not for_graph):
            loss = F.cross_entropy(forward(x).float(), y)
        opt.zero_grad(set_to_none=not for_graph)
        loss.backward()
        opt.step()

    return step


def time_model_only(images: int, device: torch.device, depth: int, widen_factor: int, compile: bool, steps: int,
                    warmup: int | None = None) -> float:
    """images/s of forward + backward + SGD step on pre-made tensors (the limit a training step can reach);
    bf16 on CUDA. benchmarks/gpu_check.py measures its model-only figures with this too."""
    return images / timed(model_step(images, device, depth, widen_factor, compile), steps, device, warmup)


def timed(fn, steps: int, device: torch.device, warmup: int | None = None) -> float:
    """Seconds per call after `warmup` (default: `steps`) warm-up calls, synchronising CUDA around the timed calls."""
    for _ in range(steps if warmup is None else warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--widen-factor", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="labeled batch size (default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (default: 50 on CUDA, 4 on CPU)")
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both measurements")
    args = p.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (64 if on_cuda else 16)
    args.steps = args.steps or (50 if on_cuda else 4)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# Step throughput: WRN-{args.depth}-{args.widen_factor}, labeled batch {args.batch_size}, "
          f"{args.steps} steps per window, {name}, torch {torch.__version__}{', compiled' if args.compile else ''}\n")

    with tempfile.TemporaryDirectory() as data_dir:
        write_synthetic_cifar(data_dir)
        print("| script | images/step | full step img/s | model-only img/s | full / model-only | peak GPU memory |")
        print("|---|---|---|---|---|---|")
        for algorithm in args.algorithms:
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            full, images = time_script(algorithm, data_dir, args)
            memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if on_cuda else "n/a"
            model_only = time_model_only(images, torch.device(args.device), args.depth, args.widen_factor,
                                         args.compile, args.steps)
            print(f"| {algorithm} | {images} | {full:.0f} | {model_only:.0f} | {full / model_only:.2f} | {memory} |",
                  flush=True)

    # Augmentation alone, at the unlabeled batch size of FixMatch (mu = 7).
    x = torch.randint(0, 256, (7 * args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    g = torch.Generator().manual_seed(0)
    print(f"\n| augmentation ({len(x)} images) | img/s |\n|---|---|")
    rates = common.cta_rates()  # CTAugment's initial rates: every bin drawn
    augmentations = {"weak_augment": lambda: common.weak_augment(x, g), "strong_augment": lambda: common.strong_augment(
        x, g), "cta_strong_augment": lambda: common.cta_strong_augment(x, rates, g)}
    for name, fn in augmentations.items():
        seconds = statistics.median(timed(fn, max(args.steps, 5), device) for _ in range(3))
        print(f"| {name} | {len(x) / seconds:.0f} |")


if __name__ == "__main__":
    main()
