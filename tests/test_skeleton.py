"""The training-loop skeleton is repeated on purpose in every script (each file reads and copies alone); these
tests keep the copies from drifting apart, and keep each script's texts about itself."""

import importlib
import inspect
import os
import re
import shutil
import sys

import pytest

from test_scripts import ROOT, SCRIPTS

# Functions that must be the same, letter for letter, in all seven scripts: the shared plumbing and recipe.
SHARED = ["cosine_lr", "ema_update", "evaluate", "check_run_dir", "prepare_run_dir", "strict", "write_atomic",
          "write_json", "write_metrics", "read_metrics", "save_checkpoint", "save_model", "format_time",
          "warn_if_slow", "stop_diverged", "stop_interrupted", "main", "summarize", "training_state",
          "restore_training_state", "catch_stop_signals", "interval_state", "stop_preempted", "set_lr", "device_lr",
          "cuda_graph"]
# The same in the six semi-supervised scripts (the supervised baseline has no pseudo-labels).
SHARED_SSL = ["pseudo_label_stats"]
SHARED_CONSTANTS = ["NOT_COMPARED", "PREDATING", "EXIT_BAD_INPUT", "EXIT_DIVERGED", "EXIT_PREEMPTED",
                    "EXIT_INTERRUPTED", "PROGRESS_SECONDS"]


@pytest.mark.parametrize("function", SHARED)
def test_shared_functions_are_identical_in_every_script(function):
    sources = {name: inspect.getsource(getattr(importlib.import_module(name), function)) for name in SCRIPTS}
    reference = sources["fixmatch"]
    drifted = [name for name, source in sources.items() if source != reference]
    assert not drifted, f"{function} differs from fixmatch.py's in {drifted}: run python tools/sync_plumbing.py"


@pytest.mark.parametrize("function", SHARED_SSL)
def test_shared_ssl_functions_are_identical_in_every_semi_supervised_script(function):
    names = [name for name in SCRIPTS if name != "supervised"]
    sources = {name: inspect.getsource(getattr(importlib.import_module(name), function)) for name in names}
    drifted = [name for name, source in sources.items() if source != sources["fixmatch"]]
    assert not drifted, f"{function} differs from fixmatch.py's in {drifted}: run python tools/sync_plumbing.py"


sys.path.insert(0, os.path.join(ROOT, "tools"))
import sync_plumbing  # noqa: E402


def test_sync_plumbing_covers_every_script():
    assert sorted(sync_plumbing.TARGETS + [sync_plumbing.SOURCE]) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", sync_plumbing.TARGETS)
def test_everything_under_the_shared_banner_is_identical(name):
    """The banner says the plumbing below it is the same in all seven scripts (the supervised baseline's lacks only
    pseudo_label_stats): tools/sync_plumbing.py, which writes fixmatch.py's copy into the others, changes nothing."""
    with open(os.path.join(ROOT, "fixmatch.py")) as f:
        _, plumbing = sync_plumbing.split_at_banner(f.read(), "fixmatch")
    now, synced = sync_plumbing.synced(name, plumbing)
    assert now == synced, f"{name}.py's shared plumbing differs from fixmatch.py's: run python tools/sync_plumbing.py"


def test_sync_plumbing_writes_an_edit_of_fixmatch_into_every_copy_and_nothing_else(tmp_path, monkeypatch, capsys):
    for name in SCRIPTS:
        shutil.copy(os.path.join(ROOT, f"{name}.py"), tmp_path / f"{name}.py")
    monkeypatch.setattr(sync_plumbing, "REPO", str(tmp_path))
    edited = (tmp_path / "fixmatch.py").read_text().replace("PROGRESS_SECONDS = 30", "PROGRESS_SECONDS = 31")
    (tmp_path / "fixmatch.py").write_text(edited)
    own = {name: (tmp_path / f"{name}.py").read_text().split(sync_plumbing.BANNER)[0] for name in SCRIPTS}
    assert sync_plumbing.main(["--check"]) == 1
    assert "differs from fixmatch.py's in: " in capsys.readouterr().out
    assert all("PROGRESS_SECONDS = 30" in (tmp_path / f"{n}.py").read_text() for n in sync_plumbing.TARGETS)
    assert sync_plumbing.main([]) == 0 and sync_plumbing.main(["--check"]) == 0
    for name in SCRIPTS:
        text = (tmp_path / f"{name}.py").read_text()
        assert "PROGRESS_SECONDS = 31" in text and text.split(sync_plumbing.BANNER)[0] == own[name]
    supervised = (tmp_path / "supervised.py").read_text()
    assert "def pseudo_label_stats" not in supervised and "def summarize" in supervised


def test_shared_constants_are_identical_in_every_script():
    for constant in SHARED_CONSTANTS:
        values = {name: getattr(importlib.import_module(name), constant) for name in SCRIPTS}
        assert len({repr(v) for v in values.values()}) == 1, (constant, values)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_each_script_names_itself(name, capsys):
    """Copy drift: a script made from another must not keep the other's name in its commands, run folders or
    ALGORITHM (remixmatch.py's --out help once named runs/mixmatch_...; it is built from ALGORITHM now)."""
    module = importlib.import_module(name)
    assert module.ALGORITHM == name
    with open(os.path.join(ROOT, f"{name}.py")) as f:
        text = f.read()
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    commands = set(re.findall(r"python ([a-z]+)\.py", text))
    folders = set(re.findall(r"runs/([a-z]+)_n", text + help_text))
    assert commands == {name} and folders == {name}, (commands, folders)
    assert f"runs/{name}_n<n-labeled>_seed<seed>" in help_text


def test_learning_rate_in_a_device_tensor_follows_the_schedule_and_checkpoints_as_a_number():
    """--cuda-graph's learning rate (the part of it that runs on a CPU): device_lr puts it in a tensor that set_lr
    then fills in place (a captured SGD step reads that tensor at every replay, so it must stay the same object),
    SGD steps with it as with the number, and state_dict holds numbers, as an eager run's checkpoint does."""
    import torch

    import fixmatch

    def sgd():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5))
        return w, torch.optim.SGD([{"params": [w]}, {"params": [], "weight_decay": 0.0}], lr=0.03, momentum=0.9,
                                  nesterov=True, weight_decay=5e-4)

    (w_number, opt_number), (w_tensor, opt_tensor) = sgd(), sgd()
    fixmatch.device_lr(opt_tensor, torch.device("cpu"))
    lr_tensors = [g["lr"] for g in opt_tensor.param_groups]
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in lr_tensors)
    assert all(g["fused"] for g in opt_tensor.param_groups)  # the step that reads the lr on the device
    for lr in (0.03, 0.02, 0.015625):  # the last is exact in float32, so the checkpoint's number is too
        for opt, w in ((opt_number, w_number), (opt_tensor, w_tensor)):
            fixmatch.set_lr(opt, lr)
            opt.zero_grad()
            (w ** 2).sum().backward()
            opt.step()
    assert all(g["lr"] is t for g, t in zip(opt_tensor.param_groups, lr_tensors))  # the same tensors, filled
    assert lr_tensors[0].item() == 0.015625 and opt_number.param_groups[0]["lr"] == 0.015625
    torch.testing.assert_close(w_tensor, w_number, rtol=1e-6, atol=1e-7)
    groups = opt_tensor.state_dict()["param_groups"]
    assert [g["lr"] for g in groups] == [0.015625, 0.015625] and all(type(g["lr"]) is float for g in groups)
    assert opt_tensor.param_groups[0]["lr"] is lr_tensors[0]  # state_dict left the live groups alone


def test_cuda_graph_warms_up_captures_once_then_replays(monkeypatch):
    """cuda_graph's bookkeeping, with torch.cuda's stream and graph calls replaced by stand-ins that record them
    (the capture itself needs a GPU: benchmarks/gpu_check.py part 3b checks it there). `update` runs eagerly on
    the side stream for the warm-up calls, then once inside the capture, with copies of that call's inputs and the
    learning rate already in a tensor; every later call copies its inputs into those and replays."""
    import contextlib

    import torch

    import fixmatch

    log, capturing = [], [False]

    class Stream:
        def wait_stream(self, other):
            log.append("wait")

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        capturing[0] = True
        yield
        capturing[0] = False

    @contextlib.contextmanager
    def on_stream(stream):
        log.append("side")
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    w = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([w], lr=0.1)
    seen = []

    def update(x):
        seen.append((capturing[0], x.item(), isinstance(optimizer.param_groups[0]["lr"], torch.Tensor), x))
        return {"y": x * 2}

    step = fixmatch.cuda_graph(update, optimizer, torch.device("cpu"), warmup=2)
    inputs = [torch.tensor([float(i)]) for i in range(5)]
    outputs = [step(x) for x in inputs]
    assert [s[:3] for s in seen] == [(False, 0, False), (False, 1, False), (True, 2, True)]
    graph_input = seen[2][3]
    assert graph_input is not inputs[2]  # the graph's own input, a copy
    assert log.count("side") == 2 and log.count("replay") == 3  # calls 3, 4 and 5 replay
    assert graph_input.item() == 4  # the last call's input was copied into the graph's
    assert outputs[1]["y"].item() == 2 and outputs[4]["y"] is not outputs[3]["y"]  # replays return copies
