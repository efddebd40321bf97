"""predict.py and the model.pt a run leaves: predictions on image files and folders, the --test-dir report (its
accuracy is evaluate's), unreadable files, bad input (exit 2, one line), and model.pt used from another project.
One tiny FixMatch run of test_scripts.py's kind, trained once for the module."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_scripts import ROOT, SCRIPTS, TINY, run_main

import predict  # noqa: E402  (ROOT is on sys.path once test_scripts is imported)
from common import CIFAR10_MEAN, CIFAR10_STD, WideResNet, load_cifar10, normalize  # noqa: E402
from conftest import CLASS_NAMES  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(cifar_dir, tmp_path_factory) -> str:
    """A finished tiny FixMatch run on the synthetic CIFAR-10, test_scripts.py's but for --ema-decay 0: after 12
    steps an EMA of 0.999 is still the initial network, which gets every test image wrong, so predictions that
    match its evaluation would prove little; the trained weights get some right and some wrong."""
    out = str(tmp_path_factory.mktemp("predict") / "run")
    argv = TINY + SCRIPTS["fixmatch"] + ["--ema-decay", "0", "--data-dir", cifar_dir, "--out", out]
    assert run_main("fixmatch", argv) == 0
    return out


@pytest.fixture(scope="module")
def test_images(cifar_dir, tmp_path_factory) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The synthetic test set as PNG files in <class>/<index>.png folders (lossless: the same pixels), with
    the images and labels themselves."""
    data = load_cifar10(cifar_dir, download=False)
    root = tmp_path_factory.mktemp("images") / "test"
    for i, (x, y) in enumerate(zip(data["test_x"], data["test_y"])):
        folder = root / CLASS_NAMES[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return str(root), data["test_x"], data["test_y"]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ema_logits(run_dir: str, x: torch.Tensor) -> torch.Tensor:
    """The logits of the checkpoint's EMA model, computed as the training script's evaluate does."""
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
    model = WideResNet(10, depth=10, widen_factor=1).to(memory_format=torch.channels_last)
    model.load_state_dict(ckpt["ema_model"])
    with torch.no_grad():
        return model.eval()(normalize(x, CIFAR10_MEAN, CIFAR10_STD).contiguous(memory_format=torch.channels_last))


def test_predicts_files_and_folders_into_a_csv(run_dir, test_images, tmp_path, monkeypatch, capsys):
    """A folder (searched recursively, sorted) and a file, of any size: one CSV row each, in predictions.csv in the
    current folder by default, the top-k classes ranked, the probabilities those of the EMA model."""
    root, x, _ = test_images
    photos = tmp_path / "photos"
    shutil.copytree(os.path.join(root, "cat"), photos / "cats")
    shutil.copytree(os.path.join(root, "airplane"), photos / "b_planes")
    big = tmp_path / "big.jpg"  # 60x40: read as --dataset folder reads it, the centred 40x40 square resized to 32
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(big)
    monkeypatch.chdir(tmp_path)
    assert predict.main([run_dir, str(photos), str(big), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    rows = read_csv(tmp_path / "predictions.csv")
    expected = sorted(os.listdir(photos / "b_planes")), sorted(os.listdir(photos / "cats"))
    assert [r["path"] for r in rows] == ([str(photos / "b_planes" / f) for f in expected[0]]
                                         + [str(photos / "cats" / f) for f in expected[1]] + [str(big)])
    assert list(rows[0]) == ["path", "class", "prob", "top1_class", "top1_prob", "top2_class", "top2_prob",
                             "top3_class", "top3_prob", "error"]
    logits = ema_logits(run_dir, torch.stack([x[int(os.path.basename(r["path"])[:4])] for r in rows[:-1]]))
    probs = logits.softmax(1)
    for row, p in zip(rows, probs):
        top = p.topk(3)
        assert row["class"] == row["top1_class"] == CLASS_NAMES[top.indices[0]] and row["prob"] == row["top1_prob"]
        assert [row[f"top{j}_class"] for j in (1, 2, 3)] == [CLASS_NAMES[i] for i in top.indices]
        assert [float(row[f"top{j}_prob"]) for j in (1, 2, 3)] == pytest.approx(top.values.tolist(), abs=5e-5)
        assert row["error"] == ""
    assert rows[-1]["class"] in CLASS_NAMES and rows[-1]["error"] == ""
    assert f"{len(rows)} images predicted" in out and "predictions.csv" in out and "fixmatch model" in out


def test_test_dir_accuracy_is_evaluates(run_dir, test_images, tmp_path, capsys):
    """--test-dir: every image's prediction is the EMA model's argmax, so the accuracy is the one the training's
    evaluate measured (results.json's final top-1); per-class accuracy and a confusion matrix PNG; the same
    predictions whatever the batch size, and from the model.pt path as from the run folder."""
    root, x, y = test_images
    out = tmp_path / "test.csv"
    assert predict.main([run_dir, "--test-dir", root, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = read_csv(out)
    index = [int(os.path.basename(r["path"])[:4]) for r in rows]
    assert sorted(index) == list(range(len(y))) and [r["label"] for r in rows] == [CLASS_NAMES[y[i]] for i in index]
    direct = ema_logits(run_dir, x).argmax(1)
    assert [r["class"] for r in rows] == [CLASS_NAMES[direct[i]] for i in index]
    correct = int((direct == y).sum())
    assert 0.1 < correct / len(y) < 0.9 and len(set(direct.tolist())) >= 2  # a test that can fail
    with open(os.path.join(run_dir, "results.json")) as f:
        final_top1 = json.load(f)["final_top1"]  # evaluate's, a float32 mean
    assert correct / len(y) == pytest.approx(final_top1, abs=1e-6)
    assert f"accuracy {100 * correct / len(y):.2f}% ({correct}/{len(y)} images)" in printed
    for c, name in enumerate(CLASS_NAMES):
        hits = int(((direct == y) & (y == c)).sum())
        assert re.search(rf"^  {name} +[0-9.]+%  \({hits}/{int((y == c).sum())}\)$", printed, re.M), name
    with Image.open(tmp_path / "test_confusion.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    again = tmp_path / "again.csv"
    model_pt = os.path.join(run_dir, "model.pt")
    assert predict.main([model_pt, "--test-dir", root, "--out", str(again), "--batch-size", "7"]) == 0
    assert [r["class"] for r in read_csv(again)] == [r["class"] for r in rows]


def test_unreadable_files_are_named_and_marked_and_the_rest_predicted(run_dir, test_images, tmp_path, capsys):
    root, _, _ = test_images
    folder = tmp_path / "mixed"
    shutil.copytree(os.path.join(root, "dog"), folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"hidden files are skipped, as --dataset folder skips them")
    out = tmp_path / "p.csv"
    assert predict.main([run_dir, str(folder), "--out", str(out)]) == predict.EXIT_UNREADABLE == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "broken.png" in err[0] and "notes.txt" in err[1]
    rows = {os.path.basename(r["path"]): r for r in read_csv(out)}
    assert ".DS_Store" not in rows and len(rows) == len(os.listdir(folder)) - 1
    for name in ("broken.png", "notes.txt"):
        assert "is not an image Pillow can read" in rows[name]["error"] and rows[name]["class"] == ""
    good = [r for n, r in rows.items() if n.endswith(".png") and n != "broken.png"]
    assert good and all(r["class"] in CLASS_NAMES and r["error"] == "" for r in good)


def test_its_own_output_in_a_searched_folder_is_not_an_image(run_dir, test_images, tmp_path, monkeypatch, capsys):
    root, _, _ = test_images
    shutil.copytree(os.path.join(root, "frog"), tmp_path / "frogs")
    monkeypatch.chdir(tmp_path)
    assert predict.main([run_dir, "."]) == 0
    assert predict.main([run_dir, "."]) == 0  # the second call finds predictions.csv in "." and leaves it out
    assert len(read_csv(tmp_path / "predictions.csv")) == len(os.listdir(tmp_path / "frogs"))


def bad_inputs(run_dir: str, root: str, tmp) -> list[tuple[list[str], str]]:
    """(arguments, what the one line on stderr says) for every kind of bad input."""
    unfinished = tmp / "unfinished"
    unfinished.mkdir()
    (unfinished / "args.json").write_text("{}")
    (unfinished / "checkpoint.pt").write_bytes(b"")
    old = tmp / "old"  # finished before runs wrote model.pt
    shutil.copytree(run_dir, old)
    os.remove(old / "model.pt")
    garbled = tmp / "garbled.pt"
    garbled.write_bytes(b"PK\x03\x04 not a model")
    (tmp / "empty").mkdir()
    odd = tmp / "odd"
    shutil.copytree(os.path.join(root, "cat"), odd / "cat")
    (odd / "kitten").mkdir()
    (odd / "puppy").mkdir()
    image = os.path.join(root, "cat", sorted(os.listdir(os.path.join(root, "cat")))[0])
    return [
        ([str(tmp / "nowhere"), image], f"{tmp / 'nowhere'} not found"),
        ([str(unfinished), image], "the run has not finished (model.pt is written at the end)"),
        ([str(old), image], "delete its results.json and rerun its command"),
        ([str(tmp), image], "is not a run folder"),
        ([str(garbled), image], "is not a readable model.pt"),
        ([run_dir, str(tmp / "empty")], f"{tmp / 'empty'} holds no images"),
        ([run_dir, str(tmp / "missing.jpg")], f"{tmp / 'missing.jpg'} not found"),
        ([run_dir, "--test-dir", str(odd)], "not the model's classes: kitten, puppy"),
        ([run_dir, "--test-dir", str(tmp / "empty")], "holds no images"),
        ([run_dir, image, "--top-k", "0"], "--top-k must be >= 1, got 0"),
        ([run_dir, image, "--top-k", "11"], "--top-k must be at most 10, the model's number of classes; got 11"),
        ([run_dir, image, "--batch-size", "0"], "--batch-size must be >= 1"),
        ([run_dir], "nothing to predict"),
        ([run_dir, image, "--test-dir", root], "not both"),
        ([run_dir, image, "--out", str(tmp / "no" / "p.csv")], "the folder"),
        ([run_dir, image, "--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
    ] + ([] if torch.cuda.is_available() else [([run_dir, image, "--device", "cuda"], "CUDA is not available")])


def test_bad_input_exits_2_with_one_line_and_writes_nothing(run_dir, test_images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, message in bad_inputs(run_dir, test_images[0], tmp_path):
        assert predict.main(argv) == predict.EXIT_BAD_INPUT == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)
        assert not (tmp_path / "predictions.csv").exists()


def test_command_line_exit_statuses_without_traceback(run_dir, test_images, tmp_path):
    """Through the real command line: bad input exits 2 with one line, an unreadable file 1, no traceback."""
    script = os.path.join(ROOT, "predict.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path / "nowhere"), "x.png"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    good = os.path.join(test_images[0], "ship")
    proc = subprocess.run([sys.executable, script, run_dir, good, "bad.jpg"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "bad.jpg" in proc.stderr
    assert "Traceback" not in proc.stderr and "could not be read" in proc.stdout
    assert len(read_csv(tmp_path / "predictions.csv")) == len(os.listdir(good)) + 1


def test_the_documented_lines_load_the_model_in_another_project(run_dir, test_images, tmp_path):
    """docs/predict.md's snippet, run in a folder that holds only a copy of common.py (another project), gives
    the class predict.py gives."""
    with open(os.path.join(ROOT, "docs", "predict.md")) as f:
        snippet = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    image = os.path.join(test_images[0], "horse", sorted(os.listdir(os.path.join(test_images[0], "horse")))[0])
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(os.path.join(ROOT, "common.py"), project)
    code = snippet.replace("runs/fixmatch_n250_seed0/model.pt", os.path.join(run_dir, "model.pt"))
    code = code.replace("cat.jpg", image)
    assert code != snippet and image in code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=project,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert predict.main([run_dir, image, "--out", str(tmp_path / "one.csv")]) == 0
    assert proc.stdout.split() == [read_csv(tmp_path / "one.csv")[0]["class"]]
