"""Runs survive faults: every bad state is written on purpose (a half-written metrics line, rows past the
checkpoint, a truncated checkpoint, a full disk, a huge learning rate), never produced by timing a kill.
The tiny runs are those of test_scripts.py, so a resumed run must reproduce tests/golden/ exactly."""

import errno
import fcntl
import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from test_scripts import ROOT, SCRIPTS, TINY, assert_golden, interrupt_at_first_checkpoint, metrics, results, run_main


def argv_for(name: str, cifar_dir: str, out, *extra: str) -> list[str]:
    return TINY + SCRIPTS[name] + ["--data-dir", cifar_dir, "--out", str(out), *extra]


def strict_json_lines(path: str) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{constant} is not strict JSON")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


# Every script's default run, and fixmatch with CTAugment (remixmatch's default is CTAugment already).
RUNS = [(name, [], name) for name in SCRIPTS] + [("fixmatch", ["--augment", "ctaugment"], "fixmatch_augment-ctaugment")]


@pytest.mark.parametrize("name,extra,stem", RUNS, ids=[stem for *_, stem in RUNS])
def test_resume_drops_rows_past_the_checkpoint_and_a_half_written_line(name, extra, stem, cifar_dir, tmp_path,
                                                                       monkeypatch):
    """What a kill -9 after a checkpoint leaves (the process gone with rows written past its checkpoint, and a
    torn line): the rerun resumes from the checkpoint, CTAugment's rates included, exactly."""
    module = importlib.import_module(name)
    out = tmp_path / "run"
    interrupt_at_first_checkpoint(module, monkeypatch)
    assert module.main(argv_for(name, cifar_dir, out, *extra)) == 130
    with open(out / "metrics.jsonl", "a") as f:  # a row the checkpoint does not stand behind, then a torn write
        f.write(json.dumps({"step": 8, "test_top1": 0.5}) + "\n" + '{"step": 9, "epoch": 0.6, "lr": 0.0208')
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ("cta_rates" in ckpt) == ("ctaugment" in extra or name == "remixmatch")
    assert module.main(argv_for(name, cifar_dir, out, *extra)) == 0
    assert_golden(str(out), stem)  # exactly the uninterrupted run's rows
    strict_json_lines(str(out / "metrics.jsonl"))


@pytest.mark.parametrize("name", ["fixmatch", "remixmatch"])
def test_rows_without_a_checkpoint_are_not_duplicated(name, cifar_dir, tmp_path, monkeypatch, capsys):
    """A crash after the first metrics row but before the first checkpoint: the rerun starts at step 0 with an
    empty metrics.jsonl, so step 4 appears once."""
    module = importlib.import_module(name)
    out = tmp_path / "run"
    interrupt_at_first_checkpoint(module, monkeypatch, before_saving=True)
    assert module.main(argv_for(name, cifar_dir, out)) == 130
    assert "before the first checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in metrics(str(out))] == [4] and not (out / "checkpoint.pt").exists()
    assert module.main(argv_for(name, cifar_dir, out)) == 0
    assert_golden(str(out), name)


@pytest.mark.parametrize("name", ["fixmatch", "remixmatch"])
def test_a_run_from_before_augment_resumes_only_as_the_randaugment_run_it_was(name, cifar_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """A run folder from before --augment (no "augment" in args.json) ran RandAugment. fixmatch, whose default is
    randaugment, resumes it as it is; remixmatch, whose default is now ctaugment, refuses it under the default with
    one line naming --augment, and resumes it with --augment randaugment."""
    module = importlib.import_module(name)
    out = tmp_path / "run"
    randaugment = ["--augment", "randaugment"]
    interrupt_at_first_checkpoint(module, monkeypatch)
    assert module.main(argv_for(name, cifar_dir, out, *randaugment)) == 130
    with open(out / "args.json") as f:
        old = json.load(f)
    del old["augment"]
    (out / "args.json").write_text(json.dumps(old))
    capsys.readouterr()
    if name == "remixmatch":
        assert module.main(argv_for(name, cifar_dir, out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--augment randaugment -> ctaugment" in err and "--overwrite" in err
    assert module.main(argv_for(name, cifar_dir, out, *(randaugment if name == "remixmatch" else []))) == 0
    assert_golden(str(out), "fixmatch" if name == "fixmatch" else "remixmatch_augment-randaugment")


def test_interrupt_names_the_step_a_rerun_resumes_from(cifar_dir, tmp_path, monkeypatch, capsys):
    module = importlib.import_module("fixmatch")
    interrupt_at_first_checkpoint(module, monkeypatch)
    assert module.main(argv_for("fixmatch", cifar_dir, tmp_path / "run")) == 130
    assert "resume from the checkpoint of step 4" in capsys.readouterr().err


def test_sigusr1_from_outside_stops_the_command_at_a_step_and_a_rerun_ends_as_an_uninterrupted_run(cifar_dir, tmp_path):
    """The real command line and a real signal from another process, as SLURM sends it before a time limit: exit
    75 and one line naming the step; the rerun's metrics and results are those of an uninterrupted run."""
    argv = argv_for("fixmatch", cifar_dir, tmp_path / "run", "--log-every", "1")
    command = [sys.executable, os.path.join(ROOT, "fixmatch.py"), *argv]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("step 2/12 "):  # between the start and the first evaluation (step 4)
            proc.send_signal(signal.SIGUSR1)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 75, stderr
    step = int(stderr.split("after step ")[1].split(";")[0])
    assert 2 <= step < 12 and stderr == (f"stopped by SIGUSR1 after step {step}; checkpoint written: rerun the same "
                                         f"command to resume from step {step}\n")
    assert subprocess.run(command, capture_output=True, cwd=tmp_path).returncode == 0
    # The reference through the command line too: a script started as a process of its own computes its convolutions
    # with oneDNN, which the tests' own process leaves off (conftest.py), so the two routes differ at rounding level.
    reference = argv_for("fixmatch", cifar_dir, tmp_path / "reference")
    assert subprocess.run([*command[:2], *reference], capture_output=True, cwd=tmp_path).returncode == 0
    assert metrics(str(tmp_path / "run")) == metrics(str(tmp_path / "reference"))
    assert results(str(tmp_path / "run")) == results(str(tmp_path / "reference"))


@pytest.mark.parametrize("name", ["supervised", "fixmatch", "mixmatch"])
def test_huge_learning_rate_stops_as_diverged(name, cifar_dir, tmp_path):
    """--lr 1e6 through the real command line: exit 3, one line with the step and the loss, no results.json,
    and everything written is strict JSON."""
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, f"{name}.py"), *argv_for(name, cifar_dir, out, "--lr", "1e6")]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1 and "diverged" in proc.stderr and "at step" in proc.stderr
    assert not (out / "results.json").exists()
    with open(out / "diverged.json") as f:
        diverged = json.load(f)
    assert diverged["loss"] in ("nan", "inf", "-inf") and f"at step {diverged['step']}" in proc.stderr
    strict_json_lines(str(out / "metrics.jsonl"))


def test_divergence_keeps_the_last_good_checkpoint(cifar_dir, tmp_path, monkeypatch, capsys):
    """The loss turns NaN after step 5: the run stops at the next log point (step 6), and the checkpoint of
    step 4 and its metrics row are what remains."""
    module = importlib.import_module("fixmatch")
    step = module.train_step
    calls = []

    def nan_after_five_steps(*args, **kwargs):
        calls.append(1)
        stats, labels, mask = step(*args, **kwargs)
        if len(calls) > 5:
            stats = {**stats, "loss": stats["loss"] * float("nan")}
        return stats, labels, mask

    monkeypatch.setattr(module, "train_step", nan_after_five_steps)
    out = tmp_path / "run"
    assert module.main(argv_for("fixmatch", cifar_dir, out)) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nan at step 6" in err and "checkpoint of step 4 is kept" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert [r["step"] for r in metrics(str(out))] == [4] and not (out / "results.json").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_unreadable_checkpoint_exits_2_naming_the_file_and_the_ways_out(content, cifar_dir, tmp_path, monkeypatch,
                                                                         capsys):
    module = importlib.import_module("fixmatch")
    out = tmp_path / "run"
    interrupt_at_first_checkpoint(module, monkeypatch)
    assert module.main(argv_for("fixmatch", cifar_dir, out)) == 130
    (out / "checkpoint.pt").write_bytes(content)
    capsys.readouterr()
    assert module.main(argv_for("fixmatch", cifar_dir, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out / "checkpoint.pt") in err and "delete it" in err and "--overwrite" in err
    assert module.main(argv_for("fixmatch", cifar_dir, out, "--overwrite")) == 0  # one of the two ways out


def test_full_disk_while_checkpointing_exits_2_and_leaves_no_tmp(cifar_dir, tmp_path, monkeypatch, capsys):
    module = importlib.import_module("fixmatch")
    fsync = os.fsync

    def no_space_for_checkpoints(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("checkpoint.pt.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_space_for_checkpoints)
    out = tmp_path / "run"
    assert module.main(argv_for("fixmatch", cifar_dir, out)) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write {out / 'checkpoint.pt'}: No space left on device\n"
    assert sorted(os.listdir(out)) == ["args.json", "labeled_indices.json", "metrics.jsonl"]


BAD_DEVICES = ["nonsense", "CPU", "mps", "meta", "cuda:x"]


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_bad_device_exits_2_and_writes_nothing(device, cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = argv_for("fixmatch", cifar_dir, out)
    argv[argv.index("--device") + 1] = device
    assert run_main("fixmatch", argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device must be cpu, cuda or cuda:N" in err and not out.exists()


def test_unwritable_out_exits_2_before_the_data_loads(cifar_dir, tmp_path, monkeypatch, capsys):
    module = importlib.import_module("fixmatch")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(module, "load_dataset", must_not_load)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "run"):
        assert module.main(argv_for("fixmatch", cifar_dir, out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file, not a folder" in err and str(a_file) in err
    assert a_file.read_text() == "not a folder"


def test_out_on_a_read_only_file_system_names_the_os_reason(cifar_dir, tmp_path, monkeypatch, capsys):
    """Root ignores permission bits, so the OS's refusal is injected where the probe file is made."""
    module = importlib.import_module("fixmatch")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(module.tempfile, "TemporaryFile", read_only)
    assert module.main(argv_for("fixmatch", cifar_dir, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write to --out {tmp_path / 'run'}: Read-only file system\n"


def test_a_folder_holding_another_algorithms_run_is_named_as_such(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main("supervised", argv_for("supervised", cifar_dir, out)) == 0
    capsys.readouterr()
    assert run_main("fixmatch", argv_for("fixmatch", cifar_dir, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a supervised run, not a fixmatch one" in err


def test_a_second_process_on_the_same_folder_exits_with_one_line(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training process holds it
        assert run_main("fixmatch", argv_for("fixmatch", cifar_dir, out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another process is training in" in err
    finally:
        os.close(fd)
    assert run_main("fixmatch", argv_for("fixmatch", cifar_dir, out)) == 0  # the lock is gone with its holder


def test_full_size_run_on_the_cpu_warns_and_says_nothing_was_saved(cifar_dir, tmp_path, monkeypatch, capsys):
    """The command people type first: WRN-28-2 for 2^20 steps on the CPU. Ctrl-C during the first step."""
    module = importlib.import_module("fixmatch")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "train_step", ctrl_c)
    argv = ["--device", "cpu", "--n-labeled", "20", "--data-dir", cifar_dir, "--out", str(tmp_path / "run")]
    assert module.main(argv) == 130
    err = capsys.readouterr().err
    assert "warning: 1048576 steps of WRN-28-2 on the CPU take months" in err and "--depth 10" in err
    assert "interrupted at step 0, before the first checkpoint" in err


def test_progress_lines_follow_the_clock_and_start_after_three_steps(cifar_dir, tmp_path, monkeypatch, capsys):
    module = importlib.import_module("supervised")
    argv = argv_for("supervised", cifar_dir, tmp_path / "a", "--log-every", "100", "--eval-every", "100")
    assert module.main(argv) == 0
    steps = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert steps == ["3/12", "12/12"]  # after 3 steps (the ETA), then the end
    monkeypatch.setattr(module, "PROGRESS_SECONDS", 0)  # every step is 30 s late
    argv = argv_for("supervised", cifar_dir, tmp_path / "b", "--log-every", "100", "--eval-every", "100")
    assert module.main(argv) == 0
    steps = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert steps == [f"{i}/12" for i in range(1, 13)]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_help_shows_each_default_once(name, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(name).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: runs/{name}_n<n-labeled>_seed<seed>" in text
    assert "(default: None)" not in text.split("--out")[1][:200]
