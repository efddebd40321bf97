"""The CUDA path's switches, run on the CPU: bf16 autocast (--amp) in every script, and torch.compile
(--compile, inductor) with no recompilation after the first step.

The compile test is marked slow: with an empty inductor cache, compiling even the tiny network's forward and
backward takes a minute or more on a 2-core machine (gcc builds every generated kernel); later runs hit the
on-disk cache. It stays in the default test command (.ci/run); `-m "not slow"` skips it.
"""

import importlib
import json
import math
import os

import pytest
import torch

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
