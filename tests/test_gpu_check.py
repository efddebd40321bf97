"""benchmarks/gpu_check.py, the first thing to run on a CUDA machine, rehearsed on the CPU (--quick: tiny sizes,
the CPU on both sides of the device comparison), so that the script is never dead code when a GPU turns up."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_gpu_check_rehearsal_on_cpu(cifar_dir, tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The synthetic CIFAR-10 of conftest.py stands in for the real one, so the real-run part runs too. The peers'
    # code is never in a test's checkout (git ignores it): an empty --peers-dir holds the part to its skip path.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(out), "--data-dir", cifar_dir, "--real-run-s", "60",
                           "--peers-dir", str(tmp_path / "no_peers")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["passed"] and report["wall_s"] < 300
    parts = report["parts"]
    assert all(c["ok"] is not False for p in ("devices", "resume") for c in parts[p]["checks"])
    assert [c["ok"] for c in parts["captured"]["checks"]] == [True]  # fixed shapes: bit-identical to the script's
    assert len(parts["devices"]["checks"]) >= 7 and parts["devices"]["augmentation_ops"]["strong_augment"]["aten_ops"]
    speed = {(r["script"], r["compile"]): r for r in parts["speed"]["rows"]}
    assert {name for name, _ in speed} == set(gpu_check.SCRIPTS)
    assert len(gpu_check.SCRIPTS) == 7
    assert all(r["img_per_s"] > 0 and r["model_only_img_per_s"] > 0 for r in speed.values())
    compiled = speed[("fixmatch", True)]
    assert compiled["graphs_first_step"] >= 1 and compiled["recompilations_after_first_step"] == 0
    real = parts["real_run"]  # the reference setting scaled down: 4 x 8 steps, an evaluation every 8
    assert real["complete"] and real["steps_done"] == real["total_steps"] == 32 and len(real["evaluations"]) == 4
    assert real["projected_full_s"] > 0 and 0 <= real["final_top1"] <= 1
    assert (out / "real_run" / "metrics.jsonl").exists() and (out / "real_run" / "results.json").exists()
    peers = parts["peers"]["rows"]
    assert [r["peer"] for r in peers] == ["kekmodel", "usb"]
    assert all(r["skipped"].startswith("peer code not found at ") for r in peers)
    with open(out / "report.md") as f:
        markdown = f.read()
    assert "all checks passed" in markdown and "## 4. Real run" in markdown and "**Complete**" in markdown
    assert "## 3b. One FixMatch iteration captured in a CUDA graph" in markdown
    assert "## 5. Peers on this device" in markdown and "peer code not found at" in markdown


def test_real_run_cut_short_by_its_budget_says_so(cifar_dir, tmp_path):
    # No time at all: the run stops after its first evaluation, and the report must not pass that off as a result.
    s = gpu_check.sizes(quick=True)
    real = gpu_check.part_real_run(torch.device("cpu"), s, cifar_dir, str(tmp_path), 0.0, False, str(tmp_path / "o"))
    assert not real["complete"] and real["steps_done"] == 8 and real["total_steps"] == 32
    assert len(real["evaluations"]) == 1 and real["projected_full_s"] > 0 and "final_top1" not in real
    assert (tmp_path / "o" / "real_run" / "metrics.jsonl").exists()
    lines = "\n".join(gpu_check.real_run_lines(real))
    assert "**Cut short at step 8 of 32**" in lines and "is not the result of the full run" in lines
