"""compare.py: grid expansion, flag routing, skip/resume, failures, aggregation, dry run, SLURM script,
and a tiny real grid end to end."""

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import compare  # noqa: E402


def test_parse_sweep():
    assert compare.parse_sweep(["batch-size=32,64", "lr=0.1"]) == {"batch-size": ["32", "64"], "lr": ["0.1"]}
    for bad in ["batch-size", "batch-size=", "=32", "batch-size=32,,64", "seed=1,2"]:
        with pytest.raises(compare.UsageError):
            compare.parse_sweep([bad])


def test_expand_grid_names_and_commands():
    runs = compare.expand_grid(["fixmatch", "supervised"], [40, 250], [0, 1], {"batch-size": ["32", "64"]},
                               {"fixmatch": ["--mu", "3"], "supervised": []}, "runs")
    assert len(runs) == 2 * 2 * 2 * 2
    names = [r["name"] for r in runs]
    assert len(set(names)) == len(names) and "fixmatch_n250_seed1_batch-size64" in names
    r = next(r for r in runs if r["name"] == "fixmatch_n40_seed0_batch-size32")
    assert r["cmd"][0] == sys.executable and r["cmd"][1].endswith("fixmatch.py")  # relative to the current folder
    assert r["cmd"][2:] == ["--n-labeled", "40", "--seed", "0", "--out", os.path.join("runs", r["name"]),
                            "--batch-size", "32", "--mu", "3"]
    assert r["folder"] == os.path.join("runs", r["name"])
    s = next(r for r in runs if r["algorithm"] == "supervised")
    assert "--mu" not in s["cmd"]


def test_route_extra_gives_each_script_the_flags_it_accepts():
    routed = compare.route_extra(["supervised", "fixmatch"], ["--mu", "3", "--device", "cpu", "--amp"], {})
    assert routed == {"supervised": ["--device", "cpu", "--amp"], "fixmatch": ["--mu", "3", "--device", "cpu", "--amp"]}
    assert compare.route_extra(["fixmatch"], ["--no-amp"], {}) == {"fixmatch": ["--no-amp"]}
    with pytest.raises(compare.UsageError, match="--bogus"):
        compare.route_extra(["fixmatch"], ["--bogus", "1"], {})
    with pytest.raises(compare.UsageError, match="--mu"):
        compare.route_extra(["supervised"], ["--mu", "3"], {})
    with pytest.raises(compare.UsageError, match="set by compare.py"):
        compare.route_extra(["fixmatch"], ["--seed", "3"], {})
    with pytest.raises(compare.UsageError, match="supervised has no --mu"):
        compare.route_extra(["supervised", "fixmatch"], [], {"mu": ["3", "7"]})


def test_run_grid_skips_finished_runs_and_survives_failures(tmp_path, capsys):
    def fake(name, code):
        folder = str(tmp_path / name)
        return {"name": name, "algorithm": "x", "folder": folder, "cmd": [sys.executable, "-c", code]}

    finished = fake("done", "raise SystemExit('must not run')")
    os.makedirs(finished["folder"])
    open(os.path.join(finished["folder"], "results.json"), "w").write("{}")
    ok = fake("ok", f"open({str(tmp_path / 'ok.ran')!r}, 'w').write('1')")
    bad = fake("bad", "raise SystemExit(4)")
    diverged = fake("diverged", "raise SystemExit(3)")  # the scripts' status for a non-finite loss
    failed = compare.run_grid([finished, bad, ok, diverged], compare.worker_envs([]))
    assert failed == [bad, diverged]
    assert (tmp_path / "ok.ran").exists()  # the failure did not stop the next run
    out = capsys.readouterr().out
    assert "4 runs, 1 finished, 3 to run" in out and f"FAILED (exit 4) bad; see {bad['folder']}.log" in out
    assert f"DIVERGED (exit 3) diverged; see {diverged['folder']}.log" in out
    assert "start done" not in out


def concurrent_runs(tmp_path, names):
    """Fake runs that each write their environment, then wait (up to 20 s) until every run has started: they
    finish only if all of them run at the same time."""
    code = ("import json, os, sys, time; d = sys.argv[1]; name = sys.argv[2]\n"
            "json.dump({k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'CUDA_VISIBLE_DEVICES')},"
            " open(os.path.join(d, name + '.env'), 'w'))\n"
            f"deadline = time.time() + 20\n"
            f"while sum(f.endswith('.env') for f in os.listdir(d)) < {len(names)}:\n"
            "    time.sleep(0.05)\n    assert time.time() < deadline, 'the other runs never started'\n")
    return [{"name": n, "algorithm": "x", "folder": str(tmp_path / n), "cmd": [sys.executable, "-c", code,
             str(tmp_path), n]} for n in names]


def envs(tmp_path, names):
    return [json.load(open(tmp_path / f"{n}.env")) for n in names]


def test_jobs_run_at_once_on_the_cpu_with_a_share_of_the_cores(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert compare.run_grid(concurrent_runs(tmp_path, ["a", "b"]), compare.worker_envs([], jobs=2)) == []
    assert envs(tmp_path, ["a", "b"]) == [{"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": None}] * 2
    assert "2 to run on the CPU (2 at a time, 2 threads each)" in capsys.readouterr().out
    # The user's OMP_NUM_THREADS wins; more jobs than cores still get one thread each.
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert compare.worker_envs([], jobs=2) == [{}, {}]
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert compare.worker_envs([], jobs=8) == [{"OMP_NUM_THREADS": "1"}] * 8
    assert compare.worker_envs([], jobs=1) == [{}]  # one job: the scripts' own threading, as before


def test_per_gpu_runs_several_at_once_on_each_gpu(tmp_path, capsys):
    assert compare.worker_envs(["0", "1"], per_gpu=2) == [{"CUDA_VISIBLE_DEVICES": g} for g in "0011"]
    names = ["a", "b", "c"]
    assert compare.run_grid(concurrent_runs(tmp_path, names), compare.worker_envs(["5"], per_gpu=3)) == []
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs(tmp_path, names)] == ["5"] * 3
    assert "3 to run on GPU 5 (3 per GPU)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "2", "--gpus", "0"], "--jobs is for runs on the CPU"),
    (["--per-gpu", "2", "--gpus", ""], "--per-gpu needs a GPU"),
    (["--jobs", "0"], "--per-gpu and --jobs must be >= 1"),
])
def test_jobs_and_per_gpu_bad_input(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "visible_gpus", lambda: [])
    assert compare.main(["--out", str(tmp_path), "--algorithms", "supervised", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def write_run(root, name, algorithm, n, seed, median, best, top5, finished=True, **args):
    folder = os.path.join(root, name)
    os.makedirs(folder)
    full_args = {"n_labeled": n, "seed": seed, "out": folder, "lr": 0.03, "epochs": 1, "steps_per_epoch": 10, **args}
    json.dump(full_args, open(os.path.join(folder, "args.json"), "w"))
    metrics = [{"step": 10, "epoch": 1.0, "loss": 0.5, "test_top1": median, "test_top5": top5, "mask_rate": 0.5,
                "pseudo_acc": 0.9}]
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    if finished:
        json.dump({"algorithm": algorithm, "final_top1": median, "median_last20_top1": median, "best_top1": best,
                   "final_top5": top5},
                  open(os.path.join(folder, "results.json"), "w"))


def test_report_aggregates_seeds_and_keeps_different_settings_apart(tmp_path):
    root = str(tmp_path)
    write_run(root, "fixmatch_n40_seed0", "fixmatch", 40, 0, 0.80, 0.82, 0.99, threshold=0.95)
    write_run(root, "fixmatch_n40_seed1", "fixmatch", 40, 1, 0.84, 0.86, 0.97, threshold=0.95)
    write_run(root, "fixmatch_n40_seed2", "fixmatch", 40, 2, 0.90, 0.91, 0.98, threshold=0.95)
    write_run(root, "fixmatch_n250_seed0", "fixmatch", 250, 0, 0.90, 0.90, 0.99, threshold=0.95)
    write_run(root, "tau08/fixmatch_n40_seed0", "fixmatch", 40, 0, 0.70, 0.71, 0.95, threshold=0.8)
    write_run(root, "supervised_n40_seed0", "supervised", 40, 0, 0.50, 0.52, 0.90)
    write_run(root, "supervised_n250_seed0", "supervised", 250, 0, 0.3, 0.3, 0.9, finished=False)
    text = compare.report(root)
    # mean of 80, 84, 90 = 84.67; sample std = sqrt(((-4.67)^2 + (-0.67)^2 + 5.33^2) / 2) = 5.03
    assert "| fixmatch threshold=0.95 | 84.67 ± 5.03 (3) | 90.00 (1) |" in text
    assert "| fixmatch threshold=0.8 | 70.00 (1) |  |" in text  # never averaged with the 0.95 runs
    assert "| supervised | 50.00 (1) |  |" in text
    # best: 82, 86, 91 -> mean 86.33, sample std sqrt((4.33^2 + 0.33^2 + 4.67^2) / 2) = 4.51
    assert "| fixmatch threshold=0.95 | 86.33 ± 4.51 (3) | 90.00 (1) |" in text
    assert "supervised_n250_seed0`: step 10/10, last EMA top-1 30.00%" in text and "## Unfinished runs" in text
    for name in ("results.md", "accuracy_vs_labels.png", "curves.png"):
        assert os.path.getsize(os.path.join(root, name)) > 0
    with open(os.path.join(root, "fixmatch_n40_seed1", "metrics.md")) as f:
        table = f.read().splitlines()
    assert table[2] == "| epoch | step | train loss | test top-1 (%) | test top-5 (%) |"
    assert table[4] == "| 1 | 10 | 0.5000 | 84.00 | 97.00 |"


def test_dry_run_prints_commands_and_marks_finished(tmp_path, capsys):
    out = str(tmp_path / "runs")
    os.makedirs(os.path.join(out, "fixmatch_n40_seed0"))
    open(os.path.join(out, "fixmatch_n40_seed0", "results.json"), "w").write("{}")
    assert compare.main(["--algorithms", "fixmatch", "--n-labeled", "40", "250", "--out", out, "--dry-run",
                         "--", "--mu", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("# finished: python ")
    assert lines[1].endswith(f"--n-labeled 250 --seed 0 --out {os.path.join(out, 'fixmatch_n250_seed0')} --mu 3")
    assert not os.path.exists(os.path.join(out, "fixmatch_n250_seed0"))  # nothing run


def test_slurm_script(tmp_path):
    out = str(tmp_path / "runs")
    assert compare.main(["--algorithms", "fixmatch", "supervised", "--n-labeled", "40", "--seeds", "0", "1",
                         "--out", out, "--slurm"]) == 0
    text = open(os.path.join(out, "grid.sbatch")).read()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --gres=gpu:1" in text
    assert text.count("--n-labeled 40") == 4 and 'eval "exec ${RUNS[$SLURM_ARRAY_TASK_ID]}" &' in text
    for directive in ["--requeue", "--signal=B:USR1@120", "--open-mode=append"]:
        assert f"#SBATCH {directive}\n" in text
    assert compare.main(["--algorithms", "supervised", "--out", out, "--slurm", "--", "--device", "cpu"]) == 0
    assert "--gres" not in open(os.path.join(out, "grid.sbatch")).read()  # a CPU grid waits for no GPU


# A stand-in for a training script: exits 75 on SIGUSR1 or SIGTERM, as the scripts do after their checkpoint.
STOPPABLE_RUN = ("import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75)); "
                 "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); print('ready', flush=True); time.sleep(60)")


@pytest.mark.parametrize("signal_name, requeued", [("USR1", True), ("TERM", False)])
def test_slurm_script_passes_the_signal_on_and_requeues_after_sigusr1_only(signal_name, requeued, tmp_path):
    """grid.sbatch run by bash as SLURM would, with a stand-in scontrol: the signal sent to the batch shell reaches
    the run, the shell exits with the run's status 75, and requeues the task after SIGUSR1 (the time limit is
    near) but not after SIGTERM (which scancel sends too)."""
    run = {"name": "stoppable", "cmd": [sys.executable, "-c", STOPPABLE_RUN]}
    script = tmp_path / "grid.sbatch"
    script.write_text(compare.slurm_script([run], str(tmp_path)))
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.calls'}\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_JOB_ID="41",
               PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    assert shell.stdout.readline() == "ready\n"
    shell.send_signal(getattr(signal, "SIG" + signal_name))
    assert shell.wait(timeout=30) == 75
    calls = tmp_path / "scontrol.calls"
    assert (calls.read_text() if calls.exists() else "") == ("requeue 41_0\n" if requeued else "")


@pytest.mark.parametrize("argv, message", [
    (["--algorithms", "fixmatch", "bogus"], "unknown algorithm 'bogus'"),
    (["--sweep", "batch-size"], "--sweep takes FLAG=V1,V2"),
    (["--n-labeled", "5"], "--n-labeled must be between 10 and 50000"),
    (["--", "--bogus"], "no selected script accepts --bogus"),
    (["--sweep", "lr=0.1", "--", "--lr", "0.5"], "--lr is both swept (--sweep lr=...) and given after --"),
    (["--sweep", "batch-size=32", "batch-size=64"], "--sweep batch-size is given twice"),
])
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    assert compare.main(argv + ["--out", str(tmp_path)] if "--" not in argv else ["--out", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_duplicate_grid_points_are_run_once():
    runs = compare.expand_grid(["fixmatch", "fixmatch"], [40, 40], [0, 0, 1], compare.parse_sweep(["mu=3,3"]),
                               {"fixmatch": []}, "runs")
    assert [r["name"] for r in runs] == ["fixmatch_n40_seed0_mu3", "fixmatch_n40_seed1_mu3"]


@pytest.mark.parametrize("make", [False, True])
def test_report_on_a_missing_or_empty_folder_exits_2(make, tmp_path, capsys):
    out = tmp_path / "runs"
    if make:
        out.mkdir()
    assert compare.main(["--report", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no runs under {out}" in err


def test_dry_run_into_a_closed_pipe_is_quiet(tmp_path):
    """`compare.py --dry-run ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    cmd = [sys.executable, os.path.join(ROOT, "compare.py"), "--algorithms", "supervised", "fixmatch", "--n-labeled",
           *map(str, range(10, 4000, 7)), "--out", str(tmp_path), "--dry-run"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    proc.wait()
    assert proc.stderr.read() == b""


def test_report_pairs_each_seed_with_the_supervised_run_of_the_same_seed(tmp_path):
    root = str(tmp_path)
    for seed, (fix, sup) in enumerate([(0.60, 0.58), (0.61, 0.62), (0.65, 0.60)]):
        write_run(root, f"fixmatch_n250_seed{seed}", "fixmatch", 250, seed, fix, fix, 0.9)
        write_run(root, f"supervised_n250_seed{seed}", "supervised", 250, seed, sup, sup, 0.9)
    write_run(root, "fixmatch_n40_seed0", "fixmatch", 40, 0, 0.5, 0.5, 0.9)  # no supervised run to pair with
    write_run(root, "fixmatch_n40_seed3", "fixmatch", 40, 3, 0.5, 0.5, 0.9)
    write_run(root, "supervised_n40_seed0", "supervised", 40, 0, 0.3, 0.3, 0.9, finished=False)
    text = compare.report(root)
    # Differences +2, -1, +5 points: mean 2.00, sample std sqrt((0^2 + 3^2 + 3^2) / 2) = 3.00; above on 2 of 3.
    # At 40 labels the only supervised run is unfinished: nothing to pair.
    assert "## Difference from supervised, paired by seed" in text
    assert "| fixmatch |  | +2.00 ± 3.00 (3; above on 2/3) |" in text
    assert "| supervised |" not in text.split("## Difference from supervised")[1].split("##")[0]
    assert compare.paired_differences({"fixmatch": {}}) == []  # no baseline row, no table
    # Against FixMatch instead (--baseline fixmatch): supervised is -2, +1, -5 points from it.
    assert compare.main(["--report", "--out", root, "--baseline", "fixmatch"]) == 0
    with open(os.path.join(root, "results.md")) as f:
        text = f.read()
    assert "## Difference from fixmatch, paired by seed" in text
    assert "| supervised |  | -2.00 ± 3.00 (3; above on 1/3) |" in text


def test_diverged_runs_are_reported_and_never_averaged(tmp_path):
    root = str(tmp_path)
    write_run(root, "fixmatch_n40_seed0", "fixmatch", 40, 0, 0.80, 0.82, 0.99)
    write_run(root, "fixmatch_n40_seed1", "fixmatch", 40, 1, 0.84, 0.86, 0.97)
    write_run(root, "fixmatch_n40_seed2", "fixmatch", 40, 2, 0.10, 0.10, 0.5, finished=False)
    with open(os.path.join(root, "fixmatch_n40_seed2", "diverged.json"), "w") as f:
        json.dump({"step": 6, "loss": "nan", "checkpoint_step": 4}, f)
    text = compare.report(root)
    assert "| fixmatch | 82.00 ± 2.83 (2) + 1 diverged |" in text
    assert "fixmatch_n40_seed2`: loss nan at step 6 (last checkpoint: step 4)" in text
    assert "## Unfinished runs" not in text
    run = {"folder": os.path.join(root, "fixmatch_n40_seed2")}
    assert compare.is_finished(run)  # a grid does not rerun it: it would diverge again


def test_tiny_real_grid(cifar_dir, tmp_path):
    """2 algorithms x 2 label counts x 1 seed on synthetic data: results.md and both plots."""
    out = str(tmp_path / "runs")
    tiny = ["--data-dir", cifar_dir, "--device", "cpu", "--depth", "10", "--widen-factor", "1", "--batch-size", "8",
            "--epochs", "1", "--steps-per-epoch", "4", "--eval-every", "2", "--mu", "1"]
    grid = ["--algorithms", "supervised", "fixmatch", "--n-labeled", "10", "20", "--out", out]
    assert compare.main(grid + ["--"] + tiny) == 0
    text = open(os.path.join(out, "results.md")).read()
    assert "| supervised |" in text and "| fixmatch |" in text and "10 labels | 20 labels" in text
    assert "Unfinished" not in text
    for name in ("accuracy_vs_labels.png", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000


def test_flags_a_rerun_may_change_do_not_split_the_report_rows():
    # The scripts' NOT_COMPARED (flags that do not change what a run computes) must not make two runs of one
    # algorithm different rows of the report (--cuda-graph was added to the first and, at first, not the second).
    import fixmatch
    assert fixmatch.NOT_COMPARED <= compare.NOT_A_SETTING


def test_label_sweep_tool_tables_from_csv_rows(tmp_path):
    # tools/label_sweep.py (issue 24): CSV rows (some kept only as numbers, some read from run folders) become
    # compare.py's tables; a row for the same (algorithm, n_labeled, seed) replaces the older one.
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import label_sweep

    def row(algorithm, seed, top1, augment=""):
        return {"algorithm": algorithm, "augment": augment, "n_labeled": 40, "seed": seed, "final_top1": top1,
                "final_top5": "", "source": "test"}
    old = [row("supervised", 0, "0.20"), row("supervised", 1, "0.99"), row("fixmatch", 0, "0.21")]
    new = [row("supervised", 1, "0.22"), row("fixmatch", 1, "0.25"), row("flexmatch", 0, "0.23"),
           row("flexmatch", 1, "0.24")]
    rows = label_sweep.merge(old, new)
    assert [(r["algorithm"], r["seed"], r["final_top1"]) for r in rows] == [
        ("supervised", 0, "0.20"), ("supervised", 1, "0.22"), ("fixmatch", 0, "0.21"), ("fixmatch", 1, "0.25"),
        ("flexmatch", 0, "0.23"), ("flexmatch", 1, "0.24")]
    text = label_sweep.markdown(label_sweep.as_runs(rows))
    assert "| supervised | 21.00 ± 1.41 (2): 20.00, 22.00 |" in text
    assert "| fixmatch | +2.00 ± 1.41 (2; above on 2/2) |" in text  # (+1, +3) against supervised
    assert "| flexmatch | +0.50 ± 2.12 (2; above on 1/2) |" in text  # (+2, -1) against FixMatch
    assert "Difference from flexmatch" not in text  # FlexMatch's own table only once a successor has rows
    softmatch = [row("softmatch", 0, "0.26"), row("softmatch", 1, "0.26")]
    _, _, against_fixmatch, against_flexmatch = label_sweep.markdown(label_sweep.as_runs(rows + softmatch)).split(
        "## Difference from ")
    assert "| softmatch | +3.00 ± 2.83 (2; above on 2/2) |" in against_fixmatch  # (+5, +1)
    assert "| softmatch | +2.50 ± 0.71 (2; above on 2/2) |" in against_flexmatch  # (+3, +2)
    assert "| fixmatch |" not in against_flexmatch
    # A CTAugment run is a row of its own, never merged with the RandAugment run of the same seed, and is compared
    # with that run seed by seed (issue 35).
    cta = [row("fixmatch", 0, "0.30", "ctaugment"), row("fixmatch", 1, "0.24", "ctaugment")]
    merged = label_sweep.merge(rows, cta)
    assert len(merged) == len(rows) + 2
    text = label_sweep.markdown(label_sweep.as_runs(merged))
    assert "| fixmatch-cta | 27.00 ± 4.24 (2): 30.00, 24.00 |" in text
    assert text.split("## Difference from ")[-1].startswith("fixmatch,")
    assert "| fixmatch-cta | +4.00 ± 7.07 (2; above on 1/2) |" in text.split("## Difference from ")[-1]  # (+9, -1)
    label_sweep.compare.plot_accuracy_vs_labels(label_sweep.as_runs(rows), str(tmp_path / "a.png"),
                                                panels=(("final_top1", "final"),))
    assert (tmp_path / "a.png").stat().st_size > 0
