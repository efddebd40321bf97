"""The CUDA path's switches, run on the CPU: bf16 autocast (--amp) in every script, and torch.compile
(--compile, inductor) with no recompilation after the first step.

The compile test is marked slow: with an empty inductor cache, compiling even the tiny network's forward and
backward takes a minute or more on a 2-core machine (gcc builds every generated kernel); later runs hit the
on-disk cache. It stays in the default test command (.ci/run); `-m "not slow"` skips it. That cache is the tests'
own (conftest.py): runs outside the tests, without their CPU pins, never load what the tests compiled (tested).
"""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import OUTSIDE, PINS, inductor_cache_for_pins, outside_environment
from test_scripts import GOLDEN, SCRIPTS, TINY, metrics


def golden(name: str) -> list[dict]:
    with open(os.path.join(GOLDEN, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_amp_on_cpu_runs_in_bf16(name, cifar_dir, tmp_path, capsys):
    """The tiny run with --amp on the CPU completes, and its losses differ from the fp32 run's (the CPU
    default, held in tests/golden): bf16 is really used."""
    out = str(tmp_path / "run")
    argv = TINY + SCRIPTS[name] + ["--data-dir", cifar_dir, "--out", out, "--amp"]
    assert importlib.import_module(name).main(argv) == 0
    assert "(bf16)" in capsys.readouterr().out
    rows, fp32 = metrics(out), golden(name)
    assert [r["step"] for r in rows] == [g["step"] for g in fp32]
    for row, gold in zip(rows, fp32):
        assert math.isfinite(row["loss"]) and 0 <= row["test_top1"] <= 1
        assert row["loss"] != pytest.approx(gold["loss"], rel=1e-5), "the same losses as fp32: autocast did nothing"
        assert row["loss"] == pytest.approx(gold["loss"], rel=0.1)  # rounded differently, not broken


def test_amp_default_is_auto_and_off_on_cpu(cifar_dir, tmp_path, capsys):
    module = importlib.import_module("supervised")
    assert module.parse_args([]).amp == "auto"
    assert module.main(TINY + ["--epochs", "1", "--data-dir", cifar_dir, "--out", str(tmp_path / "run")]) == 0
    assert "(bf16)" not in capsys.readouterr().out  # and tests/golden holds the numbers of this default


@pytest.mark.slow
def test_compile_on_cpu_without_recompilation(cifar_dir, tmp_path, monkeypatch):
    """fixmatch.py --compile on the CPU: the network is compiled (forward and backward, inductor), nothing is
    compiled again after the first step (torch._dynamo.config.error_on_recompile turns a recompilation into an
    error), and the losses stay close to the eager run's."""
    from torch._dynamo.utils import counters

    module = importlib.import_module("fixmatch")
    # B = 8, mu = 1: 24 images per forward pass, the size benchmarks/gpu_check.py --quick uses, so that the two
    # tests share inductor's on-disk cache.
    argv = TINY + ["--mu", "1", "--threshold", "0.5", "--epochs", "2", "--data-dir", cifar_dir]
    assert module.main(argv + ["--out", str(tmp_path / "eager")]) == 0

    torch._dynamo.reset()
    counters.clear()
    graphs_after_step = []
    step = module.train_step

    def step_then_forbid_recompiling(*args, **kwargs):
        stats = step(*args, **kwargs)
        graphs_after_step.append(counters["stats"]["unique_graphs"])
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        return stats

    monkeypatch.setattr(module, "train_step", step_then_forbid_recompiling)
    try:
        assert module.main(argv + ["--out", str(tmp_path / "compiled"), "--compile"]) == 0
    finally:
        torch._dynamo.reset()
    assert len(graphs_after_step) == 8 and graphs_after_step[0] >= 1
    assert graphs_after_step == [graphs_after_step[0]] * 8  # compiled in the first step, never again
    eager, compiled = metrics(str(tmp_path / "eager")), metrics(str(tmp_path / "compiled"))
    for e, c in zip(eager, compiled):  # inductor fuses and reorders float operations: close, not equal
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-3) and c["step"] == e["step"]


# A tiny network's training step, three SGD steps eagerly and three compiled (forward and backward) from the same
# weights; prints both runs' losses as JSON. Its shapes (5 images of 9 x 9) are no script's, so that only this test
# writes its entries into inductor's caches; two convolutions with BatchNorm, so that its kernels have vector loops.
TINY_STEP = """
import copy, json, torch
import torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.LeakyReLU(0.1),
                    nn.Conv2d(12, 20, 3, padding=1), nn.BatchNorm2d(20), nn.LeakyReLU(0.1),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 10))
x, y = torch.randn(5, 3, 9, 9), torch.arange(5)
losses = {}
for name, model in [("eager", copy.deepcopy(net)), ("compiled", net)]:
    forward = torch.compile(model) if name == "compiled" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses[name] = []
    for _ in range(3):
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses[name].append(loss.item())
print(json.dumps(losses))
"""


def test_the_tests_compile_into_a_cache_folder_of_their_own_named_after_their_pins(tmp_path):
    """conftest.py points TORCHINDUCTOR_CACHE_DIR, which the scripts the tests start inherit, beside the folder a run
    from the same shell compiles into (inductor's default where the shell sets none), one folder per set of pins."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    outside = OUTSIDE["TORCHINDUCTOR_CACHE_DIR"] or default_cache_dir()
    ours = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert ours.startswith(outside + "_tests_") and ours == inductor_cache_for_pins(os.environ)  # set once, stays
    assert outside_environment().get("TORCHINDUCTOR_CACHE_DIR") == OUTSIDE["TORCHINDUCTOR_CACHE_DIR"]
    base = str(tmp_path / "cache")
    pinned = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2",
              "TORCHINDUCTOR_CACHE_DIR": base}
    assert inductor_cache_for_pins(pinned) == base + "_tests_avx2_avx2-strict_avx2"
    avx512 = pinned | {"ATEN_CPU_CAPABILITY": "avx512"}
    assert inductor_cache_for_pins(avx512) == base + "_tests_avx512_avx2-strict_avx2"
    assert inductor_cache_for_pins({"TORCHINDUCTOR_CACHE_DIR": base}) == base + "_tests_unpinned"


@pytest.mark.slow
def test_what_the_tests_compile_never_reaches_a_run_without_their_pins():
    """The tiny step compiled with the tests' environment (their CPU pins and cache folder), then in a run started
    from the same shell (no pins; its own cache folder): both exit 0 with the eager losses. Inductor's cache key
    leaves out the ATen CPU capability (torch 2.14.1), so while the tests compiled into the default folder, the
    second run loaded the AVX2 kernels on an AVX-512 machine and crashed (segfault, or malloc() aborting), and in
    the other order the tests' run computed NaN."""
    for env in [dict(os.environ), outside_environment()]:  # cold caches: ~25 s each on a 2-core VM, warm ~7 s
        proc = subprocess.run([sys.executable, "-c", TINY_STEP], env=env, capture_output=True, text=True, timeout=300)
        pins = {k: env.get(k) for k in PINS}
        assert proc.returncode == 0, f"{pins}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        losses = json.loads(proc.stdout.splitlines()[-1])
        assert all(math.isfinite(v) for v in losses["compiled"]), (pins, losses)
        assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4), (pins, losses)
