"""benchmarks/gpu_check.py, the first thing to run on a CUDA machine, rehearsed on the CPU (--quick: tiny sizes,
the CPU on both sides of the device comparison), so that the script is never dead code when a GPU turns up."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_rehearsal_on_cpu(cifar_dir, tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The synthetic CIFAR-10 of conftest.py stands in for the real one, so the real-run part runs too.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(out), "--data-dir", cifar_dir, "--real-run-s", "10"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["passed"] and report["wall_s"] < 300
    parts = report["parts"]
    assert all(c["ok"] is not False for p in ("devices", "resume") for c in parts[p]["checks"])
    assert len(parts["devices"]["checks"]) >= 7 and parts["devices"]["augmentation_ops"]["strong_augment"]["aten_ops"]
    speed = {(r["script"], r["compile"]): r for r in parts["speed"]["rows"]}
    assert {name for name, _ in speed} == {"supervised", "fixmatch", "flexmatch", "mixmatch", "remixmatch"}
    assert all(r["img_per_s"] > 0 and r["model_only_img_per_s"] > 0 for r in speed.values())
    compiled = speed[("fixmatch", True)]
    assert compiled["graphs_first_step"] >= 1 and compiled["recompilations_after_first_step"] == 0
    real = parts["real_run"]
    assert len(real["evaluations"]) >= 2 and real["projected_2pow20_h"] > 0
    with open(out / "report.md") as f:
        markdown = f.read()
    assert "all checks passed" in markdown and "## 4. Real run" in markdown
