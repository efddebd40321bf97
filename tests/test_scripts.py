"""End-to-end checks every training script must pass, run on the tiny synthetic CIFAR-10 of conftest.py:
a full run writes the run folder, an interrupted run resumes to exactly the same metrics, a finished run
is not redone, and bad input exits with status 2 and one line."""

import importlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import CIFAR10_MEAN, CIFAR10_STD, WideResNet, load_model, normalize  # noqa: E402
from conftest import CLASS_NAMES, synthetic_images  # noqa: E402

# Small network, few steps. Each script adds its own flags to make its algorithm do something in a few steps.
TINY = ["--device", "cpu", "--depth", "10", "--widen-factor", "1", "--batch-size", "8", "--n-labeled", "20",
        "--epochs", "3", "--steps-per-epoch", "4", "--eval-every", "4", "--log-every", "2"]
SCRIPTS = {
    "supervised": [],
    "fixmatch": ["--mu", "2", "--threshold", "0.5"],
    "flexmatch": ["--mu", "2", "--threshold", "0.5"],
    "freematch": ["--mu", "2", "--threshold-decay", "0.5"],
    "softmatch": ["--mu", "2", "--gaussian-decay", "0.5"],
    "mixmatch": ["--k", "2", "--rampup-steps", "4"],
    "remixmatch": ["--k-strong", "2", "--rampup-steps", "4", "--da-batches", "3"],
}
TIMING = {"img_per_s", "elapsed_s"}  # the only metrics allowed to differ between identical runs


def run_main(name: str, argv: list[str]) -> int:
    return importlib.import_module(name).main(argv)


def metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


@pytest.fixture(scope="module", params=list(SCRIPTS))
def finished_run(request, cifar_dir, tmp_path_factory):
    """One uninterrupted tiny run per script: (script name, argv without --out, run folder)."""
    name = request.param
    argv = TINY + SCRIPTS[name] + ["--data-dir", cifar_dir]
    out = str(tmp_path_factory.mktemp(name) / "run")
    assert run_main(name, argv + ["--out", out]) == 0
    return name, argv, out


def test_run_folder(finished_run):
    name, _, out = finished_run
    expected = ["args.json", "checkpoint.pt", "labeled_indices.json", "metrics.jsonl", "model.pt", "results.json"]
    assert sorted(os.listdir(out)) == expected
    rows = metrics(out)
    assert [r["step"] for r in rows] == [4, 8, 12]
    for r in rows:
        assert 0 <= r["test_top1"] <= r["test_top5"] <= 1 and r["test_loss"] > 0 and r["loss"] > 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["algorithm"] == name and res["evaluations"] == 3 and res["final_top1"] == rows[-1]["test_top1"]
    assert res["best_top1"] == max(r["test_top1"] for r in rows)
    assert res["median_last20_top1"] == statistics.median(r["test_top1"] for r in rows)  # 3 evaluations: all
    assert len(res["per_class_top1"]) == 10 and res["command"].startswith(f"python {name}.py")
    with open(os.path.join(out, "labeled_indices.json")) as f:
        assert len(json.load(f)) == 20


def test_model_file_holds_the_ema_classifier(finished_run):
    """model.pt: load_model gives an eval-mode network whose logits are those of the checkpoint's EMA model
    (ReMixMatch's rotation head left out), and the metadata needed to apply it; a fraction of the checkpoint."""
    name, _, out = finished_run
    model, meta = load_model(os.path.join(out, "model.pt"))
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    head = {k for k in ckpt["ema_model"] if k.startswith("rot_head.")}
    assert bool(head) == (name == "remixmatch")
    ema = WideResNet(10, depth=10, widen_factor=1)
    ema.load_state_dict({k: v for k, v in ckpt["ema_model"].items() if k not in head})
    x = normalize(torch.from_numpy(synthetic_images(np.arange(10), seed=5)), meta["mean"], meta["std"])
    assert not model.training and all(p.requires_grad for p in model.parameters())  # fine-tunable, as any module
    with torch.no_grad():
        assert torch.equal(model(x), ema.eval()(x))
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert meta == {"version": 1, "architecture": {"name": "WideResNet", "depth": 10, "widen_factor": 1,
                                                   "num_classes": 10},
                    "classes": CLASS_NAMES, "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD), "image_size": 32,
                    "algorithm": name, "dataset": "cifar10", "n_labeled": 20, "seed": 0, "steps": 12,
                    "final_top1": results["final_top1"]}
    assert os.path.getsize(os.path.join(out, "model.pt")) < os.path.getsize(os.path.join(out, "checkpoint.pt")) / 3


def test_resumed_finished_run_writes_its_model_file(finished_run, tmp_path):
    """A run resumed from its final checkpoint without results.json (a crash at the very end, or a run from
    before model.pt) writes model.pt and results.json, the same as the uninterrupted run's."""
    name, argv, out = finished_run
    resumed = str(tmp_path / "run")
    shutil.copytree(out, resumed)
    os.remove(os.path.join(resumed, "results.json"))
    os.remove(os.path.join(resumed, "model.pt"))
    assert run_main(name, argv + ["--out", resumed]) == 0
    saved, again = (torch.load(os.path.join(d, "model.pt"), weights_only=True) for d in (out, resumed))
    assert saved.keys() == again.keys() and all(torch.equal(saved["weights"][k], again["weights"][k])
                                                for k in saved["weights"])
    assert {k: v for k, v in saved.items() if k != "weights"} == {k: v for k, v in again.items() if k != "weights"}


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
# Runs besides the fixture's default ones whose metrics are held too: (script, extra flags, golden file stem).
# remixmatch --augment randaugment holds the numbers of remixmatch.py's default before CTAugment became it.
GOLDEN_VARIANTS = [("remixmatch", ["--augment", "randaugment", "--labeled-aug", "strong"],
                    "remixmatch_labeled-aug-strong"),
                   ("remixmatch", ["--augment", "randaugment"], "remixmatch_augment-randaugment"),
                   ("fixmatch", ["--augment", "ctaugment"], "fixmatch_augment-ctaugment")]


def flatten(row: dict) -> dict:
    """{"a": [1, 2]} -> {"a.0": 1, "a.1": 2}, so that pytest.approx can compare list-valued metrics too."""
    flat = {}
    for k, v in row.items():
        for i, x in enumerate(v) if isinstance(v, list) else [(None, v)]:
            flat[k if i is None else f"{k}.{i}"] = x
    return flat


def assert_golden(out: str, stem: str) -> None:
    """The run's metrics.jsonl (timing aside) equals tests/golden/<stem>.jsonl to float tolerance."""
    with open(os.path.join(GOLDEN, f"{stem}.jsonl")) as f:
        golden = [json.loads(line) for line in f]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [g["step"] for g in golden]
    for row, gold in zip(rows, golden):
        assert flatten(row) == pytest.approx(flatten(gold), rel=1e-5, abs=1e-6), row["step"]


def test_tiny_run_reproduces_golden_metrics(finished_run):
    """The held metrics of a tiny fixed-seed run: a change that is not meant to move numbers must keep them.
    A change that is meant to (a new default) regenerates them with `python tests/test_scripts.py`."""
    name, _, out = finished_run
    assert_golden(out, name)


@pytest.mark.parametrize("name,extra,stem", GOLDEN_VARIANTS)
def test_tiny_run_variants_reproduce_golden_metrics(name, extra, stem, cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    assert run_main(name, TINY + SCRIPTS[name] + extra + ["--data-dir", cifar_dir, "--out", out]) == 0
    assert_golden(out, stem)


def interrupt_at_first_checkpoint(module, monkeypatch, before_saving: bool = False) -> None:
    """Make the next run stop with Ctrl-C at its first evaluation, after (or before) the checkpoint is saved."""
    save = module.save_checkpoint

    def save_then_interrupt(path, state):
        if not before_saving:
            save(path, state)
        monkeypatch.setattr(module, "save_checkpoint", save)  # once
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_interrupt)


def test_interrupted_run_resumes_to_the_same_metrics(finished_run, tmp_path, monkeypatch):
    """Ctrl-C right after the first checkpoint, then the same command again: identical metrics.jsonl."""
    name, argv, out = finished_run
    module = importlib.import_module(name)
    interrupt_at_first_checkpoint(module, monkeypatch)
    resumed = str(tmp_path / "run")
    assert module.main(argv + ["--out", resumed]) == 130
    assert [r["step"] for r in metrics(resumed)] == [4]
    assert module.main(argv + ["--out", resumed]) == 0
    assert metrics(resumed) == metrics(out)


def signal_during_step(module, monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Send `signum` to this process as the step-th training step (1-based) starts, as a cluster would."""
    train_step, calls = module.train_step, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)  # the handler runs at once: the step itself is still to come
        return train_step(*args, **kwargs)

    monkeypatch.setattr(module, "train_step", signalled)


def results(out: str) -> dict:
    """results.json's accuracies and counts (not its timing)."""
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    return {k: res[k] for k in ("best_top1", "median_last20_top1", "final_top1", "final_top5", "final_loss",
                                "per_class_top1", "evaluations", "steps")}


def test_sigterm_between_evaluations_checkpoints_that_step_and_resumes_exactly(finished_run, tmp_path, monkeypatch,
                                                                                capsys):
    """SIGTERM (a cluster's preemption or time limit) at a seeded random step between two evaluations: the step
    finishes, a checkpoint of it holds the statistics summed since the last evaluation, the run exits 75 naming
    the step, and the rerun's metrics.jsonl (timing aside) and results are the uninterrupted run's."""
    name, argv, out = finished_run
    module = importlib.import_module(name)
    step = random.Random(f"sigterm {name}").choice([s for s in range(1, 12) if s % 4])  # not an evaluation step
    signal_during_step(module, monkeypatch, step)
    resumed = str(tmp_path / "run")
    assert module.main(argv + ["--out", resumed]) == module.EXIT_PREEMPTED == 75
    err = capsys.readouterr().err
    assert err == (f"stopped by SIGTERM after step {step}; checkpoint written: rerun the same command to resume "
                   f"from step {step}\n")
    ckpt = torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == step and ckpt["steps_summed"] == step % 4 and ckpt["interval_s"] > 0
    assert ("cta_rates" in ckpt) == (name == "remixmatch")  # CTAugment's rates: remixmatch's default only
    assert [r["step"] for r in metrics(resumed)] == [s for s in (4, 8) if s < step]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the run
    monkeypatch.undo()
    assert module.main(argv + ["--out", resumed]) == 0
    assert f"resuming {resumed} from step {step}" in capsys.readouterr().out
    assert metrics(resumed) == metrics(out) and results(resumed) == results(out)


def test_ctaugment_run_checkpoints_its_rates_and_resumes_exactly(cifar_dir, tmp_path, monkeypatch, capsys):
    """fixmatch --augment ctaugment (remixmatch's default is held by the finished_run tests): CTAugment's rates are
    in the checkpoint, moved by the probes; a SIGTERM between evaluations and a Ctrl-C right after a checkpoint
    both resume to the uninterrupted run's metrics (tests/golden) and its final rates."""
    name, extra, stem = GOLDEN_VARIANTS[-1]
    assert extra == ["--augment", "ctaugment"]
    module = importlib.import_module(name)
    argv = TINY + SCRIPTS[name] + extra + ["--data-dir", cifar_dir]
    reference = str(tmp_path / "reference")
    assert module.main(argv + ["--out", reference]) == 0
    final = torch.load(os.path.join(reference, "checkpoint.pt"), weights_only=True)["cta_rates"]
    assert final.shape == (303,) and final.dtype == torch.float64 and (final != 1).sum() > 20

    signal_during_step(module, monkeypatch, 6)
    out = str(tmp_path / "sigterm")
    assert module.main(argv + ["--out", out]) == 75
    rates = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["cta_rates"]
    assert (rates != 1).any() and not torch.equal(rates, final)
    monkeypatch.undo()
    assert module.main(argv + ["--out", out]) == 0

    interrupt_at_first_checkpoint(module, monkeypatch)
    interrupted = str(tmp_path / "interrupted")
    assert module.main(argv + ["--out", interrupted]) == 130
    assert module.main(argv + ["--out", interrupted]) == 0
    for run in (reference, out, interrupted):
        assert_golden(run, stem)
        assert metrics(run) == metrics(reference)
        assert torch.equal(torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["cta_rates"], final)


def test_finished_run_is_not_redone(finished_run, capsys):
    name, argv, out = finished_run
    before = os.path.getmtime(os.path.join(out, "results.json"))
    assert run_main(name, argv + ["--out", out]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "results.json")) == before


def test_other_arguments_in_same_out_are_refused(finished_run, capsys):
    name, argv, out = finished_run
    with open(os.path.join(out, "metrics.jsonl")) as f:
        before = f.read()
    assert run_main(name, argv + ["--out", out, "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.03 -> 0.1" in err and "--overwrite" in err
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert f.read() == before  # nothing on disk was lost


BAD_INPUT = [
    (["--n-labeled", "5"], "--n-labeled must be between 10 and 50000"),
    (["--n-labeled", "60000"], "--n-labeled must be between 10 and 50000"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--epochs", "0"], "must be >= 1"),
    (["--depth", "12"], "--depth must be 6n+4"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
]
CUDA_GRAPH_ON_CPU = (["--cuda-graph"], "--cuda-graph needs --device cuda")  # TINY runs on the CPU
CUDA_GRAPH_WITH_CTA = (["--cuda-graph", "--augment", "ctaugment"], "--cuda-graph is not yet tested with --augment "
                       "ctaugment")
SCRIPT_BAD_INPUT = {
    "fixmatch": [(["--mu", "0"], "--mu must be >= 1"), (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
                 (["--threshold", "0"], "--threshold must be in (0, 1]"), CUDA_GRAPH_ON_CPU, CUDA_GRAPH_WITH_CTA],
    "flexmatch": [(["--mu", "0"], "--mu must be >= 1"), (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
                  (["--threshold", "0"], "--threshold must be in (0, 1]"),
                  (["--lambda-u", "-1"], "--lambda-u must be >= 0"), CUDA_GRAPH_ON_CPU, CUDA_GRAPH_WITH_CTA],
    "freematch": [(["--mu", "0"], "--mu must be >= 1"),
                  (["--threshold-decay", "1"], "--threshold-decay must be in [0, 1)"),
                  (["--lambda-f", "-1"], "--lambda-f must be >= 0"), CUDA_GRAPH_ON_CPU, CUDA_GRAPH_WITH_CTA],
    "softmatch": [(["--mu", "0"], "--mu must be >= 1"),
                  (["--gaussian-decay", "-0.1"], "--gaussian-decay must be in [0, 1)"),
                  (["--n-sigma", "0"], "--n-sigma must be > 0"), CUDA_GRAPH_ON_CPU, CUDA_GRAPH_WITH_CTA],
    "supervised": [CUDA_GRAPH_ON_CPU],
    "mixmatch": [(["--k", "0"], "--k must be >= 1"), (["--temperature", "0"], "--temperature must be > 0"),
                 (["--alpha", "0"], "--alpha must be > 0"), (["--rampup-steps", "-1"], "--rampup-steps must be >= 0")],
    "remixmatch": [(["--k-strong", "0"], "--k-strong must be >= 1"),
                   (["--lambda-rot", "-1"], "--lambda-rot must be >= 0"),
                   (["--da-batches", "0"], "--da-batches must be >= 1"),
                   (["--temperature", "0"], "--temperature must be > 0"),
                   (["--labeled-aug", "strong"], "--labeled-aug strong needs --augment randaugment")],
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_bad_input_exits_2_with_one_line(name, cifar_dir, tmp_path, capsys):
    for extra, message in BAD_INPUT + SCRIPT_BAD_INPUT.get(name, []):
        out = tmp_path / "run"
        assert run_main(name, TINY + SCRIPTS[name] + ["--data-dir", cifar_dir, "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (extra, err)
        assert not out.exists()  # rejected before anything was written


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_command_line_bad_input(name, cifar_dir, tmp_path):
    """The same through the real command line: exit status 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{name}.py"), *TINY, *SCRIPTS[name], "--data-dir",
                           cifar_dir, "--batch-size", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == "error: --batch-size must be >= 1, got 0\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_broken_data_exits_2_naming_the_file(name, cifar_dir, tmp_path, capsys):
    broken = tmp_path / "data" / "cifar-10-batches-py"
    broken.mkdir(parents=True)
    for f in os.listdir(os.path.join(cifar_dir, "cifar-10-batches-py")):
        (broken / f).write_bytes(open(os.path.join(cifar_dir, "cifar-10-batches-py", f), "rb").read())
    (broken / "data_batch_3").write_bytes(b"\x80\x02}q\x00garbage")
    argv = TINY + SCRIPTS[name] + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert run_main(name, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_batch_3" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_missing_data_offline_exits_2_naming_the_folder(name, tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def offline(root, *args, **kwargs):
        os.makedirs(root, exist_ok=True)  # as torchvision does before it downloads
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)  # never download in a test
    argv = TINY + SCRIPTS[name] + ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]
    assert run_main(name, argv) == 2
    err = capsys.readouterr().err
    searched = os.path.join(str(tmp_path / "nowhere"), "cifar-10-batches-py")
    assert err.count("\n") == 1 and searched in err and "--data-dir" in err
    assert not (tmp_path / "run").exists()  # so the corrected command is not refused as "other arguments"
    assert not (tmp_path / "nowhere").exists()  # no empty folder that looks like a data set


if __name__ == "__main__":
    # Regenerate tests/golden/ from the code as it is now, on the same synthetic data as the tests: every file, or
    # only the stems named (`python tests/test_scripts.py remixmatch`), so that a change meant to move some numbers
    # re-records those alone.
    import tempfile

    from conftest import write_cifar

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_cifar(os.path.join(tmp, "data"))
        jobs = [(name, [], name) for name in SCRIPTS] + GOLDEN_VARIANTS
        unknown = set(sys.argv[1:]) - {stem for _, _, stem in jobs}
        assert not unknown, f"no golden run is called {sorted(unknown)}"
        jobs = [job for job in jobs if not sys.argv[1:] or job[2] in sys.argv[1:]]
        for name, extra, stem in jobs:
            out = os.path.join(tmp, stem)
            assert run_main(name, TINY + SCRIPTS[name] + extra + ["--data-dir", data, "--out", out]) == 0
            with open(os.path.join(GOLDEN, f"{stem}.jsonl"), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in metrics(out))
            print(f"wrote {os.path.join(GOLDEN, stem + '.jsonl')}")
