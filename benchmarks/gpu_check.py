"""The first thing to run on a CUDA machine: one command that checks what a first GPU run must confirm.

    python benchmarks/gpu_check.py --out gpu_check_h100 [--data-dir ../shared/cifar10]    # CUDA, <= 8.5 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/rehearsal             # CPU rehearsal, <= 5 min

It writes report.md and report.json into --out. The parts, in order:
1. CUDA against CPU: weak and strong augmentation bit-identical for the same generator state (and the same
   draws: the generators end in the same state); the RandomBatches stream identical; one FixMatch step's
   statistics in fp32 (TF32 off) close to the CPU's, and the weights after its (fused, on CUDA) SGD step;
   host synchronisations during training steps (torch.cuda.set_sync_debug_mode); operations and CUDA
   kernels per augmentation call.
2. Exact resume: a tiny FixMatch run interrupted after its first checkpoint and resumed, against an
   uninterrupted one (and a second uninterrupted one: is the device deterministic at all?).
3. Speed, every script, eager and with --compile, at the papers' sizes (WRN-28-2, B = 64, FixMatch and
   FlexMatch mu = 7, MixMatch K = 2, ReMixMatch K = 8, bf16 autocast on CUDA): the real training loop on
   synthetic data, 2 windows of --steps steps, the second one timed (warm-up and compilation excluded).
   Step time, images/s, the same network's forward + backward + SGD step alone on as many images
   ("model-only"), full / model-only, peak memory, graphs compiled in the first step and recompilations after.
3b. One FixMatch iteration captured in a CUDA graph (issue 22): the host plans the augmentation (common.plan_weak,
   plan_strong) and the device's part (fixed-shape augmentation, train_step, EMA) is replayed from one graph.
   Checked against the script's eager iteration over 6 fp32 steps, then both timed in bf16 (CUDA); on the CPU,
   the fixed-shape iteration run eagerly must be bit-identical to the script's.
4. A real run, if CIFAR-10 is in --data-dir: FixMatch in the reference setting (WRN-28-2, 1024 labels, B = 64,
   mu = 7, 16 x 1024 = 16,384 steps with the cosine schedule spanning them, an evaluation every 1024), --compile,
   to its end or to the last evaluation that --real-run-s allows; then it is reported as "cut short at step N of
   16,384", with the projected wall time of the whole run. Its metrics are copied to <out>/real_run/. Without
   CIFAR-10 the other parts still run (synthetic data): a GPU machine may take only a small upload.
5. Peers, on the same device and at the sizes of part 3: kekmodel/FixMatch-pytorch's and USB's (semilearn)
   FixMatch training steps with their own DataLoaders and per-image Pillow augmentation (peers_harness.py), and
   our FixMatch's steps/s divided by theirs. Their code is not part of this project: it is looked for in
   --peers-dir (benchmarks/README.md, "Peers"), and where it is absent the part says so. They get what the
   real run left of the budget (the real run's --real-run-s is reserved from the start).

A part that would overrun --budget-s is skipped and the report says so; a part that fails records its error
and the others still run; report.md and report.json are rewritten after every part. --quick shrinks everything
(WRN-10-1, B = 8, 3-step windows, --compile timed for FixMatch only: a cold compile costs about a minute on a CPU;
the real run's setting scaled down to 4 x 8 steps, eager; peers at B = 8 with 2 workers) so that the CPU plays
both sides of part 1 and every code path runs; tests/test_gpu_check.py runs it.
"""

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts and common.py live one level up
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import peers_harness  # noqa: E402
import step_throughput  # noqa: E402
from step_throughput import write_synthetic_cifar  # noqa: E402

SCRIPTS = ["supervised", "fixmatch", "flexmatch", "mixmatch", "remixmatch", "freematch", "softmatch"]
GRAPH_SCRIPTS = ["fixmatch", "flexmatch", "supervised", "freematch", "softmatch"]  # those with --cuda-graph
# The real run's reference setting (issue 23): FixMatch, WRN-28-2, 1024 labels, B = 64, mu = 7, 16 x 1024 steps (the
# cosine schedule spans these 16,384 steps), an evaluation every 1024; --quick runs the same shape scaled down.
REFERENCE = {"n_labeled": 1024, "batch": 64, "epochs": 16, "steps_per_epoch": 1024}
REFERENCE_QUICK = {"n_labeled": 250, "batch": 8, "epochs": 4, "steps_per_epoch": 8}


def sizes(quick: bool) -> dict:
    """Network and batch sizes of every part: the papers' (scripts' defaults), or tiny ones for the rehearsal."""
    if quick:
        # B = 8 and mu = 1: FixMatch's forward pass holds 24 images, as in tests/test_amp_compile.py, so the
        # rehearsal test reuses that test's compiled graphs from inductor's on-disk cache.
        return {"net": ["--depth", "10", "--widen-factor", "1"], "batch": 8, "steps": 3, "n_train": 2000,
                "extra": {"fixmatch": ["--mu", "1"], "flexmatch": ["--mu", "1"], "remixmatch": ["--k-strong", "2"],
                          "freematch": ["--mu", "1"], "softmatch": ["--mu", "1"]},
                "aug_batch": 64, "real": REFERENCE_QUICK, "compile_default": ["fixmatch"], "n_test": 200,
                "peers": {"runs": [["kekmodel", 2], ["usb", 1]], "warmup": 2, "steps": 3, "max_s": 20.0,
                          "timeout_s": 120.0, "n_labeled": 250}}
    return {"net": ["--depth", "28", "--widen-factor", "2"], "batch": 64, "steps": 40, "n_train": 50000,
            "extra": {}, "aug_batch": 448, "real": REFERENCE, "compile_default": SCRIPTS, "n_test": 1000,
            # kekmodel at its default 4 workers and at 16 (the GPU machines' cores); USB at its configs' 1 and at 4
            # (its unlabeled loader has twice as many). Most telling first: the budget may cut the list short.
            "peers": {"runs": [["kekmodel", 4], ["usb", 1], ["kekmodel", 16], ["usb", 4]], "warmup": 5, "steps": 30,
                      "max_s": 6.0, "timeout_s": 45.0, "n_labeled": 1020}}


def net_name(s: dict) -> str:
    return f"WRN-{s['net'][1]}-{s['net'][3]}"


def fixmatch_mu(s: dict) -> int:
    """FixMatch's mu in these sizes: the --mu of its extra flags, else fixmatch.py's default."""
    extra = s["extra"].get("fixmatch", [])
    return int(extra[extra.index("--mu") + 1]) if "--mu" in extra else 7


# ----------------------------------------------------------------------------------------------------
# Running the scripts in this process
# ----------------------------------------------------------------------------------------------------
def run_main(name: str, argv: list[str]) -> tuple[int, str]:
    """(exit status, stdout) of `name`.main(argv); stderr passes through."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = importlib.import_module(name).main(argv)
    return rc, buffer.getvalue()


def read_metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def patched(module, name: str, replacement):
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield original
    finally:
        setattr(module, name, original)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def sync_messages(caught: list) -> list[str]:
    """The first lines of set_sync_debug_mode's warnings among `caught`, one per host synchronisation (its
    one-time notice that the mode is a prototype feature is not one)."""
    return [str(w.message).splitlines()[0] for w in caught
            if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photo_like(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, 32, 32] with smooth regions, gradients and noise, so that AutoContrast and Equalize have
    real histograms to work on (the random pixels of the synthetic data set have flat ones)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    img = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    img = img * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + 8 * torch.randn(n, 3, 32, 32, generator=g)
    return img.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------
# 1. The device against the CPU
# ----------------------------------------------------------------------------------------------------
def count_ops(fn, device: torch.device) -> dict:
    """Top-level aten operations of one call of fn, on CUDA the kernels it launched, and the host's CPU time per
    call in ms (the median of 5; on CUDA the kernels run asynchronously, so this is planning and launching)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    host = []
    for _ in range(5):
        start = time.thread_time()
        fn()
        host.append(1000 * (time.thread_time() - start))
        synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)

    def top_level(e):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU" and top_level(e))
    kernels = sum(1 for e in events if e.device_type.name == "CUDA") if device.type == "cuda" else None
    return {"aten_ops": ops, "cuda_kernels": kernels, "host_ms": statistics.median(host)}


def fixmatch_step(device: torch.device, depth: int, widen: int, x: torch.Tensor, y: torch.Tensor, batch: int,
                  mu: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One FixMatch training step from a seeded network on `device`, fp32: (statistics, weights after the step)."""
    import fixmatch

    args = fixmatch.parse_args(["--threshold", "0.1"])  # a fresh network is unconfident: keep L_u active
    torch.manual_seed(0)
    model = common.WideResNet(depth=depth, widen_factor=widen).to(device, memory_format=torch.channels_last)
    optimizer = fixmatch.make_optimizer(model, args, device)
    g = torch.Generator().manual_seed(1)
    x, y = x.to(device), y.to(device)
    u = x[batch:batch * (1 + mu)]
    x_l, x_uw, x_us = common.weak_augment(x[:batch], g), common.weak_augment(u, g), common.strong_augment(u, g)
    stats, labels, mask = fixmatch.train_step(model, optimizer, x_l, y[:batch], x_uw, x_us, args, False)
    stats = {**stats, **fixmatch.pseudo_label_stats(labels, mask, y[batch:batch * (1 + mu)])}
    return torch.stack(list(stats.values())).cpu(), [p.detach().cpu() for p in model.parameters()]


def count_syncs(device: torch.device, s: dict) -> dict:
    """Host synchronisations in 3 FixMatch training steps (sampling, augmentation, step, EMA) after one warm-up
    step: set_sync_debug_mode turns each into a warning."""
    import fixmatch

    args = fixmatch.parse_args(["--batch-size", str(s["batch"])] + s["net"] + s["extra"].get("fixmatch", []))
    model, ema = (common.WideResNet(depth=args.depth, widen_factor=args.widen_factor).to(
        device, memory_format=torch.channels_last) for _ in range(2))
    optimizer = fixmatch.make_optimizer(model, args, device)
    data = photo_like(512, seed=3).to(device)
    labels = torch.randint(0, 10, (512,), device=device)
    labeled = common.RandomBatches(torch.arange(100, device=device), args.batch_size, seed=0)
    unlabeled = common.RandomBatches(torch.arange(512, device=device), args.mu * args.batch_size, seed=1)
    g = torch.Generator().manual_seed(2)
    amp = device.type == "cuda"

    def step():
        idx_l, idx_u = labeled(), unlabeled()
        x_l = common.weak_augment(data.index_select(0, idx_l), g)
        u = data.index_select(0, idx_u)
        x_uw, x_us = common.weak_augment(u, g), common.strong_augment(u, g)
        _, pseudo, mask = fixmatch.train_step(model, optimizer, x_l, labels[idx_l], x_uw, x_us, args, amp)
        fixmatch.ema_update(ema, model, args.ema_decay)
        # The loop's diagnostic and statistics sum, unread as in the loop: any sync in them would count too.
        torch.stack(list(fixmatch.pseudo_label_stats(pseudo, mask, labels[idx_u]).values()))

    step()
    if device.type != "cuda":
        return {"syncs": None, "note": "CUDA only"}
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {"syncs": len(sync_messages(caught)), "messages": sorted(set(sync_messages(caught)))[:10]}


def part_devices(device: torch.device, s: dict, depth_width: tuple[int, int]) -> dict:
    cpu = torch.device("cpu")
    x = photo_like(s["aug_batch"])
    checks = []
    for fn in (common.weak_augment, common.strong_augment):
        for dtype in (torch.uint8, torch.float32):  # common.py's contract: float images with integer values too
            g_dev, g_cpu = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
            a, b = fn(x.to(device, dtype), g_dev).cpu(), fn(x.to(cpu, dtype), g_cpu)
            same = torch.equal(a, b) and torch.equal(g_dev.get_state(), g_cpu.get_state())
            checks.append({"check": f"{fn.__name__}, {len(x)} {str(dtype)[6:]} images: bit-identical to the CPU's, "
                                    "same draws", "ok": same, "detail": f"{int((a != b).sum())} values differ"})
    streams = [common.RandomBatches(torch.arange(1000, device=d), 96, seed=0) for d in (device, cpu)]
    same = all(torch.equal(streams[0]().cpu(), streams[1]()) for _ in range(40))  # 40 batches: 4 epochs
    checks.append({"check": "RandomBatches: 40 batches of 96 from 1000 indices identical to the CPU's", "ok": same,
                   "detail": ""})

    # One FixMatch step in fp32 on both devices. TF32 off: it is PyTorch's default for CUDA convolutions.
    depth, widen = depth_width
    mu = 2
    xs, ys = photo_like(s["batch"] * (1 + mu), seed=1), torch.arange(s["batch"] * (1 + mu)) % 10
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        stats_dev, weights_dev = fixmatch_step(device, depth, widen, xs, ys, s["batch"], mu)
        stats_cpu, weights_cpu = fixmatch_step(cpu, depth, widen, xs, ys, s["batch"], mu)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    rel = ((stats_dev - stats_cpu).abs() / stats_cpu.abs().clamp(min=1e-6)).max().item()
    checks.append({"check": f"one FixMatch step (WRN-{depth}-{widen}, B = {s['batch']}, mu = {mu}), fp32: statistics "
                            "within 1e-3 (relative) of the CPU's", "ok": rel < 1e-3,
                   "detail": f"max relative difference {rel:.2e}; loss {stats_dev[0]:.6f} here, "
                             f"{stats_cpu[0]:.6f} on CPU"})
    diff = max((a - b).abs().max().item() for a, b in zip(weights_dev, weights_cpu))
    checks.append({"check": "weights after that step's SGD update (fused on CUDA) within 1e-4 of the CPU's",
                   "ok": diff < 1e-4, "detail": f"max absolute difference {diff:.2e}"})

    syncs = count_syncs(device, s)
    if syncs["syncs"] is not None:
        checks.append({"check": "no host synchronisation in 3 FixMatch training steps (sampling, augmentation, "
                                "step, EMA)", "ok": syncs["syncs"] == 0,
                       "detail": f"{syncs['syncs']} syncs" + "".join(": " + m for m in syncs["messages"][:3])})
    ops = {fn.__name__: count_ops(lambda fn=fn: fn(x.to(device), torch.Generator().manual_seed(0)), device)
           for fn in (common.weak_augment, common.strong_augment)}
    return {"checks": checks, "augmentation_ops": ops, "syncs": syncs}


# ----------------------------------------------------------------------------------------------------
# 2. Exact resume
# ----------------------------------------------------------------------------------------------------
def part_resume(device: torch.device, data_dir: str, work: str) -> dict:
    import fixmatch

    argv = ["--device", str(device), "--depth", "10", "--widen-factor", "1", "--batch-size", "16", "--mu", "2",
            "--n-labeled", "40", "--threshold", "0.5", "--epochs", "3", "--steps-per-epoch", "4", "--eval-every", "4",
            "--log-every", "1000", "--data-dir", data_dir]
    outs = {k: os.path.join(work, f"resume_{k}") for k in ("a", "a2", "b")}
    for k in ("a", "a2"):
        assert run_main("fixmatch", argv + ["--out", outs[k]])[0] == 0

    def save_then_interrupt(path, state):
        save(path, state)
        raise KeyboardInterrupt

    with patched(fixmatch, "save_checkpoint", save_then_interrupt) as save:
        interrupted = run_main("fixmatch", argv + ["--out", outs["b"]])[0]
    resumed = run_main("fixmatch", argv + ["--out", outs["b"]])[0]
    timing = {"img_per_s", "elapsed_s"}
    rows = {k: [{m: v for m, v in r.items() if m not in timing} for r in read_metrics(o)] for k, o in outs.items()}

    def max_diff(x, y):
        return max((abs(p[m] - q[m]) for p, q in zip(x, y) for m in p if isinstance(p[m], float)), default=0.0)

    exact = rows["b"] == rows["a"]
    return {"checks": [
        {"check": "tiny FixMatch run interrupted after its first checkpoint and resumed: the same metrics as an "
                  "uninterrupted run", "ok": exact and interrupted == 130 and resumed == 0,
         "detail": "identical" if exact else f"max difference {max_diff(rows['b'], rows['a']):.2e}"},
        {"check": "(for reference) two uninterrupted runs identical", "ok": None,
         "detail": "identical" if rows["a2"] == rows["a"] else
         f"differ by up to {max_diff(rows['a2'], rows['a']):.2e}: the device is not deterministic, so a resume "
         "cannot be exact either"},
    ]}


# ----------------------------------------------------------------------------------------------------
# 3. Speed
# ----------------------------------------------------------------------------------------------------
def time_script(name: str, device: torch.device, s: dict, compile: bool, data_dir: str, work: str,
                cuda_graph: bool = False) -> dict:
    """The real loop of `name` on synthetic data for 2 windows of s["steps"] steps; the second window is timed.
    With cuda_graph, the script's --cuda-graph: train_step then runs only in the warm-up and the capture, so the
    host's time per iteration is taken at set_lr (once per iteration, outside the graph) and syncs are not counted."""
    module = importlib.import_module(name)
    out = os.path.join(work, f"speed_{name}_{'compiled' if compile else 'eager'}{'_graph' if cuda_graph else ''}")
    argv = ["--data-dir", data_dir, "--out", out, "--device", str(device), "--batch-size", str(s["batch"]),
            "--n-labeled", "1000", "--epochs", "1", "--steps-per-epoch", str(2 * s["steps"]),
            "--eval-every", str(s["steps"]), "--log-every", str(10 ** 9), *s["net"], *s["extra"].get(name, [])]
    argv += ["--compile"] if compile else []
    argv += ["--cuda-graph"] if cuda_graph else []
    torch._dynamo.reset()  # each run's model is new: start from empty in-memory caches (the disk cache stays)
    from torch._dynamo.utils import counters
    counters.clear()
    graphs, syncs, host_times, original = [], [], [], {}

    def step_counting_graphs(*args, **kwargs):
        host_times.append(time.thread_time())  # the host's CPU time: what it spends per loop iteration
        # Host synchronisations inside the step, counted in the untimed first window after the first step.
        if device.type == "cuda" and 1 <= len(graphs) < s["steps"]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    stats = original["train_step"](*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs.append(len(sync_messages(caught)))
        else:
            stats = original["train_step"](*args, **kwargs)
        graphs.append(graphs_compiled())
        return stats

    def set_lr_timing(*args, **kwargs):  # --cuda-graph: once per loop iteration, outside the graph
        host_times.append(time.thread_time())
        return original["set_lr"](*args, **kwargs)

    if device.type == "cuda":
        gc.collect()  # the previous run's tensors, so that the peak is this run's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    hook, wrapper = ("set_lr", set_lr_timing) if cuda_graph else ("train_step", step_counting_graphs)
    with patched(module, hook, wrapper) as original[hook]:
        rc, stdout = run_main(name, argv)
    assert rc == 0, stdout[-2000:]
    wall = time.perf_counter() - start
    images = int(re.search(r"steps of (\d+) images", stdout)[1])
    img_per_s = read_metrics(out)[1]["img_per_s"]
    per_step = [b - a for a, b in zip(host_times[-s["steps"]:], host_times[-s["steps"] + 1:])]
    return {"images_per_step": images, "img_per_s": img_per_s, "step_ms": 1000 * images / img_per_s,
            "host_ms": 1000 * statistics.median(per_step) if per_step else None,
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
            "graphs_first_step": graphs[0] if compile and graphs else None,
            "recompilations_after_first_step": graphs[-1] - graphs[0] if compile and graphs else None, "wall_s": wall,
            "syncs_per_step": sum(syncs) / len(syncs) if syncs else None}


def time_model_only(images: int, device: torch.device, s: dict, compile: bool, steps: int) -> float:
    """images/s of forward + backward + SGD step of the same network on pre-made images, bf16 on CUDA
    (step_throughput.py's measurement, after a fresh dynamo state)."""
    torch._dynamo.reset()
    return step_throughput.time_model_only(images, device, int(s["net"][1]), int(s["net"][3]), compile, steps,
                                           warmup=max(3, steps // 5))


def time_model_graphed(images: int, device: torch.device, s: dict, steps: int) -> dict:
    """The model-only step (bf16 autocast, fused SGD) captured in one CUDA graph and replayed: the GPU's own time
    for the network's kernels, with no host overhead at all; the floor of any full step on this GPU."""
    torch._dynamo.reset()
    step = step_throughput.model_step(images, device, int(s["net"][1]), int(s["net"][3]), for_graph=True)
    side = torch.cuda.Stream(device)  # warm-up (momentum buffers, cuDNN's choices) off the default stream
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    seconds = step_throughput.timed(graph.replay, steps, device)
    return {"images": images, "img_per_s": images / seconds, "step_ms": 1000 * seconds,
            "projected_2pow20_h": 2 ** 20 * seconds / 3600}


# ----------------------------------------------------------------------------------------------------
# 3b. One FixMatch iteration captured in a CUDA graph (issue 22): is the host off the critical path then?
# ----------------------------------------------------------------------------------------------------
def fixmatch_iteration(device: torch.device, s: dict, amp: bool, fixed_shapes: bool, seed: int = 0) -> tuple:
    """FixMatch's loop iteration as fixmatch.py runs it, on photo-like data, split into the host's part (index
    batches, the augmentation's draws and plan, sent to the device in one copy per dtype) and the device's part
    (augmentation, train_step, EMA, the diagnostics; statistics out as one tensor). With fixed_shapes, the device's
    part has the same operations and shapes at every step (common.plan_strong/apply_strong), so it can be captured;
    without, it is the script's own path (the grouped strong_augment, whose shapes follow the draws), done whole in
    `host`. Returns (host, device_part, model, optimizer, args): device_part(*host()) is one iteration, its
    statistics as {"stats": tensor}, the shape fixmatch.cuda_graph captures."""
    import fixmatch

    args = fixmatch.parse_args(["--batch-size", str(s["batch"]), "--threshold", "0.5"] + s["net"]
                               + s["extra"].get("fixmatch", []))  # tau 0.5: a fresh network's L_u is not all 0
    torch.manual_seed(seed)
    model = common.WideResNet(depth=args.depth, widen_factor=args.widen_factor)
    model = model.to(device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model)
    optimizer = fixmatch.make_optimizer(model, args, device)
    data, labels = photo_like(1024, seed=3).to(device), (torch.arange(1024) % 10).to(device)
    labeled = common.RandomBatches(torch.arange(100, device=device), args.batch_size, seed=seed)
    unlabeled = common.RandomBatches(torch.arange(1024, device=device), args.mu * args.batch_size, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    b, ub = args.batch_size, args.mu * args.batch_size

    def host():
        idx_l, idx_u = labeled(), unlabeled()
        if not fixed_shapes:  # the script's own iteration: augmentation launched as it is planned
            x_l = common.weak_augment(data.index_select(0, idx_l), g)
            u = data.index_select(0, idx_u)
            return idx_l, idx_u, x_l, common.weak_augment(u, g), common.strong_augment(u, g)
        plan = common.plan_weak(g, b, 32, 32) + common.plan_weak(g, ub, 32, 32) + common.plan_strong(g, ub, 32, 32)
        return idx_l, idx_u, *common._send(plan, device)

    def device_part(idx_l, idx_u, *rest):
        if fixed_shapes:
            u = data.index_select(0, idx_u)
            x_l = common.apply_weak(data.index_select(0, idx_l), rest[:2])
            rest = x_l, common.apply_weak(u, rest[2:4]), common.apply_strong(u, rest[4:])
        stats, pseudo, mask = fixmatch.train_step(model, optimizer, rest[0], labels[idx_l], rest[1], rest[2], args, amp)
        fixmatch.ema_update(ema, model, args.ema_decay)
        return {"stats": torch.stack(list({**stats, **fixmatch.pseudo_label_stats(pseudo, mask, labels[idx_u])}
                                          .values()))}

    return host, device_part, model, optimizer, args


def iteration_step(host, device_part, optimizer, device: torch.device, graphed: bool):
    """One training step per call: device_part(*host()), or with graphed the device part through fixmatch.py's
    own cuda_graph (3 eager warm-up steps, the capture, replays). Returns the step's statistics tensor."""
    import fixmatch

    part = fixmatch.cuda_graph(device_part, optimizer, device) if graphed else device_part
    return lambda: part(*host())["stats"]


def scripts_graphed_against_eager(device: torch.device, synthetic: str, work: str) -> list[dict]:
    """Each script with --cuda-graph against itself eager: 8 fp32 steps (TF32 off; 3 eager warm-up steps, the
    capture, 5 replays) of a small network, the logged means of the 8 steps and the EMA model's test loss after
    them. Small sizes: the capture's semantics do not depend on them, and this part must leave the budget to the
    timings."""
    checks = []
    for name in GRAPH_SCRIPTS:
        rows = {}
        for graph in (False, True):
            out = os.path.join(work, f"graph_check_{name}_{'graph' if graph else 'eager'}")
            argv = ["--data-dir", synthetic, "--out", out, "--device", str(device), "--batch-size", "16", "--n-labeled",
                    "1000", "--epochs", "1", "--steps-per-epoch", "8", "--eval-every", "8", "--log-every", "100",
                    "--depth", "10", "--widen-factor", "1", "--no-amp"] + (["--cuda-graph"] if graph else [])
            rc, stdout = run_main(name, argv)
            assert rc == 0, stdout[-2000:]
            rows[graph] = read_metrics(out)[-1]
        keys = [k for k in ("loss", "loss_x", "loss_u", "test_loss") if k in rows[False]]
        rel = max(abs(rows[True][k] - rows[False][k]) / max(abs(rows[False][k]), 1e-6) for k in keys)
        checks.append({"check": f"{name} --cuda-graph against {name} eager, 8 fp32 steps of WRN-10-1 (3 eager, 5 "
                                "replayed): the steps' mean losses and the EMA model's test loss within 1e-3 "
                                "(relative)",
                       "ok": rel < 1e-3, "detail": f"max relative difference {rel:.2e} over {', '.join(keys)}"})
    return checks


def part_captured(device: torch.device, s: dict, steps: int, synthetic: str, work: str) -> dict:
    """Checks that the captured iteration (fixed shapes, one CUDA graph) trains as the eager script does (fp32, TF32
    off: 6 steps, 3 of them replayed, under the cosine schedule), then times eager and captured iterations in bf16.
    On the CPU there is nothing to capture: the check is then the fixed-shape iteration run eagerly against the
    script's, which must be bit-identical."""
    import fixmatch

    checks, n = [], 6
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        runs = {}
        for name, fixed in (("eager", False), ("captured", True)):
            host, device_part, model, optimizer, args = fixmatch_iteration(device, s, False, fixed)
            step = iteration_step(host, device_part, optimizer, device, fixed and device.type == "cuda")
            stats = []
            for k in range(n):
                fixmatch.set_lr(optimizer, fixmatch.cosine_lr(k, n, args.lr))
                stats.append(step())
            runs[name] = torch.stack(stats).cpu(), [p.detach().cpu() for p in model.parameters()]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    (stats_e, weights_e), (stats_c, weights_c) = runs["eager"], runs["captured"]
    rel = ((stats_c - stats_e).abs() / stats_e.abs().clamp(min=1e-6)).max().item()
    diff = max((a - b).abs().max().item() for a, b in zip(weights_c, weights_e))
    what = "captured in one CUDA graph (3 eager warm-up steps, 3 replays)" if device.type == "cuda" else \
        "with fixed shapes, eager (CPU: nothing to capture)"
    limit = 1e-4 if device.type == "cuda" else 0.0
    checks.append({"check": f"FixMatch iteration {what} against the script's eager one, {n} fp32 steps: statistics "
                            f"and weights within {limit:g} (relative, absolute)", "ok": rel <= limit and diff <= limit,
                   "detail": f"max relative difference of the statistics {rel:.2e}, of the weights (absolute) "
                             f"{diff:.2e}"})
    result = {"checks": checks}
    if device.type != "cuda":
        return result
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        checks += scripts_graphed_against_eager(device, synthetic, work)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    timings = {}
    for name, fixed in (("eager", False), ("captured", True)):
        torch.cuda.empty_cache()
        host, device_part, model, optimizer, args = fixmatch_iteration(device, s, True, fixed)
        step = iteration_step(host, device_part, optimizer, device, fixed)
        host_times = []

        def timed_step():
            t = time.thread_time()
            fixmatch.set_lr(optimizer, args.lr)
            step()
            host_times.append(time.thread_time() - t)
        seconds = step_throughput.timed(timed_step, steps, device)
        images = args.batch_size * (1 + 2 * args.mu)
        timings[name] = {"step_ms": 1000 * seconds, "img_per_s": images / seconds,
                         "host_ms": 1000 * statistics.median(host_times[-steps:]),
                         "projected_2pow20_h": 2 ** 20 * seconds / 3600}
    result["timings"] = timings
    return result


# ----------------------------------------------------------------------------------------------------
# 4. A real run
# ----------------------------------------------------------------------------------------------------
def part_real_run(device: torch.device, s: dict, data_dir: str, work: str, seconds: float, compile: bool,
                  out_dir: str) -> dict:
    """FixMatch in the reference setting on CIFAR-10 from `data_dir`, to its end or to the last evaluation after which
    the next one would not fit in `seconds` (then it is reported as cut short). Its run folder's small files are
    copied to out_dir/real_run/."""
    import fixmatch

    r = s["real"]
    total, every = r["epochs"] * r["steps_per_epoch"], r["steps_per_epoch"]
    out = os.path.join(work, "real_run")
    argv = ["--data-dir", data_dir, "--out", out, "--device", str(device), "--n-labeled", str(r["n_labeled"]),
            "--batch-size", str(r["batch"]), "--epochs", str(r["epochs"]), "--steps-per-epoch", str(every),
            "--eval-every", str(every), "--log-every", str(every), *s["net"], *s["extra"].get("fixmatch", [])]
    argv += ["--compile"] if compile else []
    start = time.perf_counter()
    saved = [start]

    def save_within_budget(path, state):
        save(path, state)
        if "step" not in state:  # model.pt, which the run writes with the same function when it ends
            return
        saved.append(time.perf_counter())
        window = saved[-1] - saved[-2]  # the first one also holds loading and compiling: a cautious estimate
        if state["step"] < total and saved[-1] - start + window > seconds:
            raise KeyboardInterrupt  # the run stops here, as a Ctrl-C would; its metrics up to here are complete

    torch._dynamo.reset()
    with patched(fixmatch, "save_checkpoint", save_within_budget) as save:
        rc, stdout = run_main("fixmatch", argv)
    wall = time.perf_counter() - start
    assert rc in (0, 130), stdout[-2000:]
    os.makedirs(os.path.join(out_dir, "real_run"), exist_ok=True)
    for name in ("args.json", "metrics.jsonl", "results.json"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copy(os.path.join(out, name), os.path.join(out_dir, "real_run", name))
    rows = read_metrics(out)
    images = int(re.search(r"steps of (\d+) images", stdout)[1])
    step_time = images / rows[-1]["img_per_s"]  # the last window: compiled and warm
    # Evaluation time: what each window took beyond its training steps, at least (the first window also loads and
    # compiles, so it counts only when it is the only one).
    windows = [rows[0]["elapsed_s"]] + [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    eval_time = max(0.0, min(w - every * step_time for w in windows))
    result = {"setting": {**r, "total_steps": total, "net": net_name(s), "mu": fixmatch_mu(s)},
              "compile": compile, "complete": rc == 0, "steps_done": rows[-1]["step"], "total_steps": total,
              "eval_every": every, "images_per_step": images, "budget_s": seconds, "wall_s": wall,
              "evaluations": [{"step": e["step"], "test_top1": e["test_top1"], "test_top5": e["test_top5"],
                               "loss": e["loss"], "mask_rate": e["mask_rate"], "img_per_s": e["img_per_s"]}
                              for e in rows],
              "steps_per_s": 1 / step_time, "eval_s": eval_time,
              "projected_full_s": total * step_time + total / every * eval_time}
    if rc == 0:
        with open(os.path.join(out, "results.json")) as f:
            res = json.load(f)
        result.update({k: res[k] for k in ("final_top1", "final_top5", "median_last20_top1", "best_top1",
                                           "wall_time_s")})
    return result


# ----------------------------------------------------------------------------------------------------
# 5. Peers on the same device
# ----------------------------------------------------------------------------------------------------
def part_peers(device: torch.device, s: dict, data_dir: str, peers_dir: str, work: str, left) -> dict:
    """Each peer's FixMatch step, its own data pipeline included, timed by peers_harness.py in a subprocess (its
    imports and worker processes stay out of this one) at the sizes of part 3; left() is the time the part has."""
    p = s["peers"]
    rows = []
    for peer, workers in p["runs"]:
        row = {"peer": peer, "workers": workers}
        path = peers_harness.peer_code_path(peers_dir, peer)
        timeout = min(p["timeout_s"], left())
        if not os.path.isfile(path):
            row["skipped"] = f"peer code not found at {path}"
        elif timeout < p["timeout_s"] / 2:
            row["skipped"] = f"not run: {left():.0f} s of the budget left, {p['timeout_s'] / 2:.0f} s needed"
        else:
            print(f"[gpu_check] peers: {peer}, {workers} workers ({left():.0f} s left)", flush=True)
            row.update(run_peer(peer, workers, device, s, data_dir, peers_dir, work, timeout))
        rows.append(row)
    return {"rows": rows}


def run_peer(peer: str, workers: int, device: torch.device, s: dict, data_dir: str, peers_dir: str, work: str,
             timeout: float) -> dict:
    """peers_harness.py's result for one peer, or {"error": ...} with the last line it printed."""
    p = s["peers"]
    out = os.path.join(work, f"peer_{peer}_{workers}.json")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers_harness.py"), peer,
           "--peers-dir", peers_dir, "--data-dir", data_dir, "--out", out, "--device", str(device),
           "--depth", s["net"][1], "--widen-factor", s["net"][3], "--batch-size", str(s["batch"]),
           "--mu", str(fixmatch_mu(s)), "--n-labeled", str(p["n_labeled"]),
           "--workers", str(workers), "--warmup", str(p["warmup"]), "--steps", str(p["steps"]),
           "--max-s", str(p["max_s"])] + (["--threads", "1"] if device.type == "cpu" else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {proc.returncode}: {last}"[:300]}
    with open(out) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def environment(device: torch.device) -> dict:
    try:
        git = ["git", "-C", ROOT]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        changed = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, timeout=10).stdout.strip()
        commit = f"{commit} with uncommitted changes" if commit and changed else commit  # the code run is not HEAD's
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {"commit": commit, "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
           "cpu_count": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   memory_gib=torch.cuda.get_device_properties(device).total_memory / 2 ** 30)
    return env


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env['device']}", "",
             f"{env['date']}, commit {env['commit']}, torch {env['torch']}"
             + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else "")
             + f"; {'--quick (tiny sizes)' if report['quick'] else 'full sizes'} on {report['device']}; "
             f"{report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget. "
             f"Result: **{'all checks passed' if report['passed'] else 'SOME CHECKS FAILED'}**.", ""]

    def checks_table(checks):
        out = ["| check | result | detail |", "|---|---|---|"]
        for c in checks:
            result = "info" if c["ok"] is None else ("PASS" if c["ok"] else "**FAIL**")
            out.append(f"| {c['check']} | {result} | {c['detail']} |")
        return out + [""]

    parts = report["parts"]
    lines += ["## 1. This device against the CPU", ""]
    if "checks" in parts.get("devices", {}):
        lines += checks_table(parts["devices"]["checks"])
        ops = parts["devices"]["augmentation_ops"]
        lines += [f"Per call on {report['aug_batch']} images: " + ", ".join(
            f"`{k}` {v['aten_ops']} top-level aten ops"
            + (f", {v['cuda_kernels']} CUDA kernels and copies" if v["cuda_kernels"] is not None else "")
            + f", {v['host_ms']:.1f} ms of host CPU time"
            for k, v in ops.items())
            + ".", ""]
    lines += ["## 2. Exact resume", ""]
    if "checks" in parts.get("resume", {}):
        lines += checks_table(parts["resume"]["checks"])
    lines += ["## 3. Speed", "", "The real training loop on synthetic data; the second window of "
              f"{report['sizes']['steps']} steps is timed. Model-only: forward + backward + SGD step of the same "
              "network on as many pre-made images. Host CPU: the main thread's CPU time per loop iteration (median); "
              "near the step time, the host is the bottleneck.", "",
              "| script | compiled | images/step | step (ms) | host CPU (ms) | images/s | model-only images/s "
              "| full / model-only | peak memory (MiB) | graphs compiled in step 1 | recompilations after "
              "| host syncs per train_step |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in parts.get("speed", {}).get("rows", []):
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['script']} | {'yes' if r['compile'] else 'no'} | {r.get('error') or r['skipped']} "
                         "| | | | | | | | | |")
            continue

        def fmt(v, spec):
            return "n/a" if v is None else format(v, spec)

        lines.append(f"| {r['script']}{' --cuda-graph' if r.get('cuda_graph') else ''} | "
                     f"{'yes' if r['compile'] else 'no'} | {r['images_per_step']} | "
                     f"{r['step_ms']:.1f} | {fmt(r['host_ms'], '.1f')} | {r['img_per_s']:.0f} | "
                     f"{r['model_only_img_per_s']:.0f} | "
                     f"{r['img_per_s'] / r['model_only_img_per_s']:.2f} | {fmt(r['peak_mib'], '.0f')} | "
                     f"{fmt(r['graphs_first_step'], 'd')} | {fmt(r['recompilations_after_first_step'], 'd')} | "
                     f"{fmt(r['syncs_per_step'], '.1f')} |")
    lines += [""]
    graphed = parts.get("speed", {}).get("graphed", {})
    if "img_per_s" in graphed:
        lines += [f"The model-only step on {graphed['images']} images (FixMatch's) captured in one CUDA graph and "
                  f"replayed, so with no host overhead at all: {graphed['img_per_s']:.0f} images/s, "
                  f"{graphed['step_ms']:.1f} ms per step, {graphed['projected_2pow20_h']:.2f} h for 2^20 steps: the "
                  "floor of FixMatch's wall time on this GPU with these kernels.", ""]
    elif graphed:
        lines += [f"Model-only step in one CUDA graph: {graphed.get('error') or graphed.get('skipped')}", ""]
    lines += ["## 3b. One FixMatch iteration captured in a CUDA graph", ""]
    captured = parts.get("captured", {})
    if "checks" in captured:
        lines += checks_table(captured["checks"])
    if "timings" in captured:
        lines += ["The whole iteration (index batches, augmentation's draws and plan on the host; augmentation "
                  "with fixed shapes, train_step and EMA on the device, replayed from one graph) against the script's "
                  "eager "
                  f"iteration, bf16, {report['sizes']['batch']} labeled images per step:", "",
                  "| iteration | step (ms) | host CPU (ms) | images/s | 2^20 steps (h) |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {t['step_ms']:.1f} | {t['host_ms']:.1f} | {t['img_per_s']:.0f} | "
                  f"{t['projected_2pow20_h']:.2f} |" for name, t in captured["timings"].items()]
        lines += [""]
    lines += ["## 4. Real run", ""]
    lines += real_run_lines(parts.get("real_run", {}))
    lines += ["## 5. Peers on this device", ""]
    lines += peers_lines(parts, report["sizes"])
    for name, part in parts.items():
        if "error" in part or "skipped" in part:
            lines += [f"- part `{name}`: {part.get('skipped') or 'error: ' + part['error']}"]
    return "\n".join(lines) + "\n"


def real_run_lines(real: dict) -> list[str]:
    """Part 4 in report.md: the setting, the outcome (complete, or cut short and said so), the evaluations."""
    if "evaluations" not in real:
        return []
    r = real["setting"]
    lines = [f"FixMatch, the reference setting: {r['n_labeled']} labels, {r['net']}, B = {r['batch']}, "
             f"mu = {r['mu']}, {r['epochs']} x {r['steps_per_epoch']} = {real['total_steps']:,} steps (the "
             f"cosine schedule spans them), an evaluation every {real['eval_every']}"
             f"{', --compile' if real['compile'] else ', eager'}; {real['images_per_step']} images per step.", ""]
    projected = (f"{real['steps_per_s']:.2f} steps/s and {real['eval_s']:.2f} s per evaluation: the full "
                 f"{real['total_steps']:,} steps take **{real['projected_full_s'] / 60:.1f} min** "
                 f"({real['projected_full_s']:.0f} s, training and evaluation)")
    if real["complete"]:
        lines += [f"**Complete**: final EMA top-1 **{100 * real['final_top1']:.2f}%** (top-5 "
                  f"{100 * real['final_top5']:.2f}%), median of the last evaluations "
                  f"{100 * real['median_last20_top1']:.2f}%, best {100 * real['best_top1']:.2f}%; "
                  f"{real['wall_time_s']:.0f} s of training and evaluation, {real['wall_s']:.0f} s with loading "
                  f"and compiling. {projected}.", ""]
    else:
        last = real["evaluations"][-1]
        lines += [f"**Cut short at step {real['steps_done']:,} of {real['total_steps']:,}** (the real run's budget, "
                  f"{real['budget_s']:.0f} s): its last evaluation, EMA top-1 {100 * last['test_top1']:.2f}% at step "
                  f"{last['step']:,}, is not the result of the full run. Projected: {projected}.", ""]
    lines += ["| step | EMA test top-1 | top-5 | loss | mask rate | images/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['step']} | {100 * e['test_top1']:.2f}% | {100 * e['test_top5']:.2f}% | {e['loss']:.3f} | "
              f"{e['mask_rate']:.2f} | {e['img_per_s']:.0f} |" for e in real["evaluations"]]
    return lines + [""]


def our_fixmatch(parts: dict) -> dict:
    """Our FixMatch's steps/s at the sizes of part 3: eager and compiled (part 3, synthetic data) and the real run's."""
    ours = {f"part 3, {'--cuda-graph' if r.get('cuda_graph') else 'compiled' if r['compile'] else 'eager'}":
            1000 / r["step_ms"]
            for r in parts.get("speed", {}).get("rows", []) if r.get("script") == "fixmatch" and "step_ms" in r}
    if "steps_per_s" in parts.get("real_run", {}):
        ours["real run"] = parts["real_run"]["steps_per_s"]
    return ours


def peers_lines(parts: dict, s: dict) -> list[str]:
    """Part 5 in report.md: each peer's steps/s and our FixMatch's steps/s divided by it."""
    rows = parts.get("peers", {}).get("rows", [])
    if not rows:
        return []
    ours = our_fixmatch(parts)
    p = s["peers"]
    lines = [f"Each peer's own FixMatch training step, its DataLoader and per-image Pillow augmentation included, at "
             f"the sizes of part 3 ({net_name(s)}, B = {s['batch']}, mu = {fixmatch_mu(s)}), on the data of the real "
             f"run; up to {p['steps']} steps timed (at most {p['max_s']:.0f} s) after {p['warmup']} warm-up steps "
             "(benchmarks/peers_harness.py). Ratio: our FixMatch's steps/s divided by the peer's ("
             + (", ".join(f"ours, {k}: {v:.2f} steps/s" for k, v in ours.items()) or "ours not measured") + ").", "",
             "| peer | workers | precision | steps timed | steps/s | images/s | waiting for data (ms/step) | "
             + " | ".join(f"ours ({k}) / peer" for k in ours) + " | notes |",
             "|---|---|---|---|---|---|---|" + "---|" * len(ours) + "---|"]
    for r in rows:
        if "steps_per_s" not in r:
            lines.append(f"| {r['peer']} | {r['workers']} | {r.get('skipped') or 'error: ' + r.get('error', '?')} |"
                         + " |" * (5 + len(ours)))
            continue
        wait = "n/a" if r.get("wait_s_per_step") is None else f"{1000 * r['wait_s_per_step']:.1f}"
        notes = "; ".join(r["notes"] + ([f"stand-ins: {', '.join(r['stand_ins'])}"] if r["stand_ins"] else []))
        lines.append(f"| {r['peer']} | {r['workers']} | {r['precision']} | {r['steps']} | {r['steps_per_s']:.2f} | "
                     f"{r['img_per_s']:.0f} | {wait} | "
                     + " | ".join(f"{v / r['steps_per_s']:.2f}" for v in ours.values()) + f" | {notes} |")
    return lines + [""]


PARTS = ["devices", "resume", "captured", "speed", "peers", "real_run"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for report.md and report.json (created)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "cifar10"),
                   help="folder holding cifar-10-batches-py/ for the real run (skipped if absent)")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere: the CPU rehearsal")
    p.add_argument("--budget-s", type=float, default=None, help="time budget (default: 510, or 300 with --quick)")
    p.add_argument("--real-run-s", type=float, default=None,
                   help="seconds for the real run, reserved from the budget (default: 410, or 30 with --quick)")
    p.add_argument("--real-run-eager", action="store_true",
                   help="the real run without --compile (default: compiled, but eager with --quick)")
    p.add_argument("--steps", type=int, default=None, help="steps per speed window (default: 40, or 3 with --quick)")
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS, help="scripts timed in part 3")
    p.add_argument("--compile-scripts", nargs="*", default=None, choices=SCRIPTS,
                   help="scripts also timed with --compile (default: all, or fixmatch with --quick)")
    p.add_argument("--peers-dir", default=os.path.join(ROOT, "benchmarks", "peers"),
                   help="where the peers' code is (benchmarks/README.md, 'Peers'); absent: part 5 says so")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="parts to run")
    args = p.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for, but CUDA is not available; pass --device cpu", file=sys.stderr)
        return 2
    s = sizes(args.quick)
    s["steps"] = args.steps or s["steps"]
    budget = args.budget_s or (300.0 if args.quick else 510.0)
    real_run_s = args.real_run_s or (30.0 if args.quick else 410.0)
    compile_scripts = s["compile_default"] if args.compile_scripts is None else args.compile_scripts
    has_cifar = os.path.isdir(os.path.join(args.data_dir, "cifar-10-batches-py"))
    reserve = real_run_s + 15 if has_cifar and "real_run" in args.parts else 0.0
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads() if device.type == "cuda" else 1)  # a CPU rehearsal shares cores
    parts = {}

    def left() -> float:
        return budget - (time.perf_counter() - start)

    def record(name, part):
        # The report is rewritten after every part: a run killed from outside still leaves what it had measured.
        parts[name] = part
        write_report(args.out, parts, device, s, budget, start, args.quick)

    def attempt(name, fn, needs_s):
        if name not in args.parts:
            return {"skipped": "not asked for (--parts)"}
        if left() - reserve < needs_s:
            return {"skipped": f"not run: {left():.0f} s of the budget left, {needs_s:.0f} s needed"}
        print(f"[gpu_check] {name} ({left():.0f} s left)", flush=True)
        try:
            return fn()
        except Exception as e:  # a first GPU run should report everything it can, not stop at the first problem
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        synthetic = os.path.join(work, "synthetic")
        write_synthetic_cifar(synthetic, n_train=s["n_train"], n_test=s["n_test"])
        depth_width = (int(s["net"][1]), int(s["net"][3]))
        record("devices", attempt("devices", lambda: part_devices(device, s, depth_width), 10))
        record("resume", attempt("resume", lambda: part_resume(device, synthetic, work), 10))
        record("captured", attempt("captured", lambda: part_captured(device, s, max(s["steps"], 20), synthetic, work),
                                   20))
        record("speed", part_speed(args, device, s, compile_scripts, synthetic, work, attempt))
        if not has_cifar:
            record("real_run", {"skipped": f"no CIFAR-10 in {args.data_dir} (cifar-10-batches-py/ absent)"})
        else:
            reserve = 0.0
            seconds = min(real_run_s, left() - 10)
            compile = not (args.quick or args.real_run_eager)
            record("real_run", attempt("real_run", lambda: part_real_run(device, s, args.data_dir, work, seconds,
                                                                         compile, args.out), 20))
        # The peers last: they get what the real run left of the budget, one peer after another.
        data_dir = args.data_dir if has_cifar else synthetic
        record("peers", attempt("peers", lambda: part_peers(device, s, data_dir, os.path.abspath(args.peers_dir),
                                                             work, left), 5))
    report = write_report(args.out, parts, device, s, budget, start, args.quick)
    print(markdown(report))
    return 0 if report["passed"] else 1


def part_speed(args: argparse.Namespace, device: torch.device, s: dict, compile_scripts: list[str], synthetic: str,
               work: str, attempt) -> dict:
    """Part 3: every script in args.scripts eager, then those in compile_scripts compiled; FixMatch first, since its
    compiled graphs also serve FlexMatch (same shapes: inductor's cache) and the real run."""
    if "speed" not in args.parts:
        return {"skipped": "not asked for (--parts)"}
    order = [n for n in ["fixmatch", "flexmatch", "supervised", "mixmatch", "remixmatch", "freematch", "softmatch"]
             if n in args.scripts]
    rows, compile_s = [], 30.0 if args.quick else 60.0  # compile_s: the last compiled run's time
    # Each script eager, and with --cuda-graph beside it where it has one (CUDA only), then the compiled runs.
    graphs = GRAPH_SCRIPTS if device.type == "cuda" else []
    runs = [(n, False, g) for n in order for g in (False, True) if not g or n in graphs]
    runs += [(n, True, False) for n in order if n in compile_scripts]
    for name, compile, graph in runs:
        row = attempt("speed", lambda: time_script(name, device, s, compile, synthetic, work, cuda_graph=graph),
                      compile_s if compile else 5)
        row.update(script=name, compile=compile, cuda_graph=graph)
        if "img_per_s" in row:
            row["model_only_img_per_s"] = time_model_only(row["images_per_step"], device, s, compile, s["steps"])
            compile_s = row["wall_s"] if compile else compile_s
        rows.append(row)
    speed = {"rows": rows}
    fixmatch_images = next((r["images_per_step"] for r in rows if r["script"] == "fixmatch"
                            and "images_per_step" in r), None)
    if device.type == "cuda" and fixmatch_images:
        speed["graphed"] = attempt("speed", lambda: time_model_graphed(fixmatch_images, device, s,
                                                                       max(s["steps"], 20)), 15)
    return speed


def write_report(out: str, parts: dict, device: torch.device, s: dict, budget: float, start: float,
                 quick: bool) -> dict:
    """report.json and report.md of the parts so far. Passed: every check of ours passed and no part of ours failed
    (a peer that fails to run is reported in part 5, but it is not a failure of this project's code)."""
    checks = [c for part in parts.values() for c in part.get("checks", [])]
    errors = [n for n, part in parts.items() if "error" in part] + [
        r["script"] for r in parts.get("speed", {}).get("rows", []) if "error" in r]
    report = {"environment": environment(device), "device": str(device), "quick": quick, "sizes": s,
              "budget_s": budget, "wall_s": time.perf_counter() - start, "aug_batch": s["aug_batch"],
              "passed": all(c["ok"] is not False for c in checks) and not errors, "parts": parts}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(main())
