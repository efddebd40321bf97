"""Data sets beyond CIFAR-10 (issue 17): CIFAR-100 in its real file format and a folder of your own images of
mixed sizes and formats, on tiny synthetic data. The loaders and their errors, the balanced split with images
that have no label, augmentation that follows the image size, and the scripts end to end on both layouts."""

import argparse
import importlib
import json
import os
import pickle
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import predict  # noqa: E402
from conftest import synthetic_images  # noqa: E402
from test_flexmatch import FixedLogits  # noqa: E402
from test_scripts import SCRIPTS  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Writers of the two layouts
# ----------------------------------------------------------------------------------------------------
CIFAR100_NAMES = [f"fine_{c:02d}" for c in range(100)]


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are Python-2 pickles, like CIFAR-10's


def write_cifar100(root: str, n_train_per_class: int = 3, n_test_per_class: int = 1, seed: int = 0) -> str:
    """A synthetic CIFAR-100 in <root>/cifar-100-python/{train,test,meta}, the real format: dicts with bytes keys,
    b"data" uint8 [N, 3072] (R, G, B planes), b"fine_labels" and b"coarse_labels" lists (coarse = fine // 5, so
    that reading the wrong key shows), meta with b"fine_label_names" and b"coarse_label_names"."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        images = synthetic_images(fine % 10, seed=int(rng.integers(2**31)))
        _dump(os.path.join(folder, split), {
            b"filenames": [f"synthetic_{split}_{i}.png".encode() for i in range(len(fine))],
            b"batch_label": f"{split} batch 1 of 1".encode(),
            b"fine_labels": [int(y) for y in fine],
            b"coarse_labels": [int(y) // 5 for y in fine],
            b"data": images.reshape(len(fine), 3072),
        })
    _dump(os.path.join(folder, "meta"), {b"fine_label_names": [n.encode() for n in CIFAR100_NAMES],
                                         b"coarse_label_names": [f"coarse_{c}".encode() for c in range(20)]})
    return root


FOLDER_CLASSES = ["bird", "cat", "dog"]  # sorted: written in another order below
# (width, height, Pillow mode, file extension) of the images, cycled through: any size, any format.
FORMATS = [(32, 32, "RGB", ".png"), (48, 40, "RGB", ".jpg"), (20, 36, "L", ".png"), (64, 64, "RGBA", ".png"),
           (17, 23, "P", ".gif"), (40, 30, "RGB", ".bmp"), (33, 50, "RGB", ".jpeg")]


def _save(path: str, array: np.ndarray, mode: str) -> None:
    """Write an RGB uint8 [H, W, 3] array as an image of the given mode (format from the extension)."""
    img = Image.fromarray(array)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(200)
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
        img.info["transparency"] = 0  # a transparent palette entry: Pillow warns if it is converted naively
    img.save(path, **({"transparency": 0} if mode == "P" else {}))


def _photo(label: int, width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB image of the class's colour, [height, width, 3]."""
    small = synthetic_images(np.array([label]), seed)[0].transpose(1, 2, 0)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def write_folder(root: str, n_train: dict | None = None, n_test: int = 2, n_unlabeled: int = 5) -> str:
    """<root>/train/<class>/, <root>/test/<class>/ and <root>/unlabeled/ with images of mixed sizes and formats.

    n_train: images per class (default 4, 3, 5 for bird, cat, dog: unbalanced). Every class also gets an image in
    a subfolder and a hidden file that is not an image; unlabeled/ holds bright images and a hidden file too.
    """
    n_train = n_train or {"dog": 5, "bird": 4, "cat": 3}
    k = 0
    for split, counts in (("train", n_train), ("test", {c: n_test for c in n_train})):
        for name, n in counts.items():  # not in sorted order: the loader sorts
            label = FOLDER_CLASSES.index(name)
            folder = os.path.join(root, split, name)
            os.makedirs(os.path.join(folder, "more"), exist_ok=True)
            for i in range(n):
                w, h, mode, ext = FORMATS[k % len(FORMATS)]
                where = folder if i else os.path.join(folder, "more")  # subfolders count too
                _save(os.path.join(where, f"img{i:02d}{ext}"), _photo(label, w, h, seed=k), mode)
                k += 1
            with open(os.path.join(folder, ".DS_Store"), "wb") as f:
                f.write(b"\x00\x01 not an image")
    if n_unlabeled:
        os.makedirs(os.path.join(root, "unlabeled"), exist_ok=True)
        for i in range(n_unlabeled):
            w, h, mode, ext = FORMATS[(k + i) % len(FORMATS)]
            _save(os.path.join(root, "unlabeled", f"u{i:02d}{ext}"), np.full((h, w, 3), 250, np.uint8), mode)
        with open(os.path.join(root, "unlabeled", ".hidden"), "wb") as f:
            f.write(b"not an image")
    return root


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory) -> str:
    return write_cifar100(str(tmp_path_factory.mktemp("cifar100")))


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory) -> str:
    return write_folder(str(tmp_path_factory.mktemp("folder")))


def _one_clean_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__  # no chained traceback buries the line
    return message


# ----------------------------------------------------------------------------------------------------
# CIFAR-100
# ----------------------------------------------------------------------------------------------------
def test_load_cifar100_reads_fine_labels_meta_and_pixels(cifar100_dir):
    data = common.load_dataset("cifar100", cifar100_dir, download=False)
    assert data["train_x"].shape == (300, 3, 32, 32) and data["train_x"].dtype == torch.uint8
    assert data["test_x"].shape == (100, 3, 32, 32) and data["test_y"].dtype == torch.int64
    assert torch.bincount(data["train_y"]).tolist() == [3] * 100  # fine labels: 100 classes, not 20 coarse ones
    assert data["num_classes"] == 100 and data["classes"] == CIFAR100_NAMES
    assert data["mean"] == common.CIFAR100_MEAN and data["std"] == common.CIFAR100_STD
    with open(os.path.join(cifar100_dir, "cifar-100-python", "train"), "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert data["train_y"].tolist() == entry[b"fine_labels"]
    assert torch.equal(data["train_x"][7], torch.from_numpy(entry[b"data"][7].reshape(3, 32, 32)))


def test_load_cifar100_without_meta_numbers_its_classes(cifar100_dir, tmp_path):
    shutil.copytree(cifar100_dir, tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "cifar-100-python" / "meta")
    assert common.load_cifar100(str(tmp_path), download=False)["classes"] == [str(c) for c in range(100)]


def test_load_cifar100_offline_names_the_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)  # never download in a test
    with pytest.raises(common.DataError) as e:
        common.load_dataset("cifar100", str(tmp_path / "nowhere"))
    message = _one_clean_line(e)
    assert os.path.join(str(tmp_path / "nowhere"), "cifar-100-python") in message and "download failed" in message


def _labels_out_of_range(path):
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    entry[b"fine_labels"] = [y + 100 for y in entry[b"fine_labels"]]
    _dump(str(path), entry)


def _garbage(path):
    path.write_bytes(b"\x80\x02}q\x00garbage")


@pytest.mark.parametrize("name,damage", [("train", _garbage), ("test", _labels_out_of_range), ("meta", _garbage)])
def test_load_cifar100_broken_file_names_it(cifar100_dir, tmp_path, name, damage):
    shutil.copytree(cifar100_dir, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "cifar-100-python" / name
    damage(path)
    with pytest.raises(common.DataError) as e:
        common.load_dataset("cifar100", str(tmp_path), download=False)
    assert str(path) in _one_clean_line(e)


# ----------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------
def test_folder_layout_classes_labels_and_unlabeled_images(folder_dir):
    data = common.load_dataset("folder", folder_dir, image_size=16)
    assert data["classes"] == FOLDER_CLASSES and data["num_classes"] == 3
    # train/ images class by class (sorted), then the 5 unlabeled/ images with label -1; hidden files skipped.
    assert data["train_y"].tolist() == [0] * 4 + [1] * 3 + [2] * 5 + [-1] * 5
    assert data["test_y"].tolist() == [0, 0, 1, 1, 2, 2]
    assert data["train_x"].shape == (17, 3, 16, 16) and data["test_x"].shape == (6, 3, 16, 16)
    assert data["train_x"].dtype == torch.uint8 and data["train_x"].is_contiguous()
    assert (data["train_x"][-5:] >= 245).all()  # the bright unlabeled images, whatever their format
    # Within a class: its files in name order, then its subfolders' (depth first); hidden files are skipped.
    bird = os.path.join(folder_dir, "train", "bird")
    found = [os.path.splitext(os.path.relpath(p, bird))[0] for p in common.image_files(bird)]
    assert found == ["img01", "img02", "img03", os.path.join("more", "img00")]


def test_folder_images_are_resized_by_the_shorter_side_then_centre_cropped(tmp_path):
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)   # 20 wide, 12 high: columns 4..15 are kept
    tall = rng.integers(0, 256, (18, 12, 3), dtype=np.uint8)   # rows 3..14 are kept
    bands = np.zeros((30, 90, 3), np.uint8)                    # red | green | blue thirds, scaled down 3x
    bands[:, :30, 0], bands[:, 30:60, 1], bands[:, 60:, 2] = 255, 255, 255
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
    for name, array in (("1_square", square), ("2_wide", wide), ("3_tall", tall), ("4_bands", bands)):
        Image.fromarray(array).save(tmp_path / "train" / "a" / f"{name}.png")
    Image.fromarray(np.full((300, 200, 3), 77, np.uint8)).save(tmp_path / "train" / "b" / "big.png")
    for c in ("a", "b"):
        Image.fromarray(square).save(tmp_path / "test" / c / "x.png")
    x = common.load_dataset("folder", str(tmp_path), image_size=12)["train_x"].permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(x[0], square)  # already the size: bit-exact
    np.testing.assert_array_equal(x[1], wide[:, 4:16])  # the centre crop of the wider side, nothing squashed
    np.testing.assert_array_equal(x[2], tall[3:15])
    assert (x[3][:, 1:-1] == [0, 255, 0]).all()  # only the green middle third (its edges may blend a little)
    assert (x[4] == 77).all()  # a large image, scaled down
    assert len(x) == 5


def test_folder_mean_and_std_come_from_the_train_images(folder_dir):
    data = common.load_dataset("folder", folder_dir, image_size=16)
    train = data["train_x"][data["train_y"] >= 0].permute(1, 0, 2, 3).reshape(3, -1).double().numpy() / 255
    np.testing.assert_allclose(data["mean"], train.mean(1), rtol=1e-12)
    np.testing.assert_allclose(data["std"], train.std(1), rtol=1e-9)  # population std, like CIFAR-10's constants
    everything = data["train_x"].permute(1, 0, 2, 3).reshape(3, -1).double().numpy() / 255
    assert (everything.mean(1) - np.array(data["mean"])).min() > 0.01  # the bright unlabeled/ images not included


def test_channel_stats_matches_numpy_on_large_chunks():
    x = torch.randint(0, 256, (300, 3, 70, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = common.channel_stats(x)  # 300 * 70 * 70 pixels: several chunks
    flat = x.permute(1, 0, 2, 3).reshape(3, -1).double().numpy() / 255
    np.testing.assert_allclose(mean, flat.mean(1), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(1), rtol=1e-9)


def _remove_tree(root, rel):
    shutil.rmtree(os.path.join(root, rel))


def _empty_class(root):
    for f in os.listdir(os.path.join(root, "train", "cat")):
        path = os.path.join(root, "train", "cat", f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _write(root, rel, data=b"this is not an image"):
    with open(os.path.join(root, rel), "wb") as f:
        f.write(data)


def _truncated_png(root, rel):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 9).save(os.path.join(root, rel))
    data = open(os.path.join(root, rel), "rb").read()
    _write(root, rel, data[:len(data) // 2])


FOLDER_ERRORS = [
    (lambda r: _remove_tree(r, "train"), "train not found"),
    (lambda r: _remove_tree(r, "test"), "test not found"),
    (_empty_class, os.path.join("train", "cat") + " holds no images"),
    (lambda r: _remove_tree(r, os.path.join("test", "dog")), "missing from test/: ['dog']"),
    (lambda r: os.makedirs(os.path.join(r, "test", "fish", "x")), "not in train/: ['fish']"),
    (lambda r: [_remove_tree(r, os.path.join(s, c)) for s in ("train", "test") for c in ("cat", "dog")],
     "only the class folder 'bird'"),
    (lambda r: _write(r, os.path.join("train", "notes.txt")),
     os.path.join("train", "notes.txt") + " is not in a class"),
    (lambda r: _write(r, os.path.join("train", "dog", "notes.txt")), os.path.join("train", "dog", "notes.txt")),
    (lambda r: _truncated_png(r, os.path.join("test", "cat", "cut.png")), os.path.join("test", "cat", "cut.png")),
    (lambda r: _write(r, os.path.join("unlabeled", "broken.jpg"), b"\xff\xd8\xff\xe0 garbage"),
     os.path.join("unlabeled", "broken.jpg")),
]


@pytest.mark.parametrize("damage,message", FOLDER_ERRORS)
def test_folder_errors_are_one_clear_line(folder_dir, tmp_path, damage, message):
    root = str(tmp_path / "data")
    shutil.copytree(folder_dir, root)
    damage(root)
    with pytest.raises(common.DataError) as e:
        common.load_dataset("folder", root, image_size=16)
    assert message in _one_clean_line(e)


# ----------------------------------------------------------------------------------------------------
# Split, arguments, normalization and augmentation for other data sets
# ----------------------------------------------------------------------------------------------------
def test_labeled_split_never_picks_unlabeled_images_and_all_takes_every_label():
    labels = torch.tensor([2, -1, 0, 1, -1, 2, 0, 1, 2, -1, 0, 1])
    for seed in range(5):
        idx = common.labeled_split(labels, 7, seed, num_classes=3)
        assert len(idx) == 7 and (labels[idx] >= 0).all()
        assert sorted(torch.bincount(labels[idx], minlength=3).tolist()) == [2, 2, 3]
    assert common.labeled_split(labels, "all", 0, num_classes=3).tolist() == [0, 2, 3, 5, 6, 7, 8, 10, 11]
    assert common.labeled_split(labels, 9, 0, num_classes=3).tolist() == [0, 2, 3, 5, 6, 7, 8, 10, 11]
    with pytest.raises(common.DataError, match=r"between 3 and 9 \(the training set\), got 10"):
        common.labeled_split(labels, 10, 0, num_classes=3)
    with pytest.raises(common.DataError, match="between 3 and 9"):
        common.labeled_split(labels, 2, 0, num_classes=3)


def test_labeled_split_100_classes_is_exact_and_balanced():
    labels = torch.arange(100).repeat(7)[torch.randperm(700, generator=torch.Generator().manual_seed(0))]
    idx = common.labeled_split(labels, 250, seed=3, num_classes=100)
    counts = torch.bincount(labels[idx], minlength=100)
    assert len(idx) == 250 and counts.min() == 2 and counts.max() == 3 and (counts == 3).sum() == 50


def test_labeled_split_of_cifar10_is_unchanged_by_the_num_classes_argument():
    labels = (torch.arange(5000) % 10)[torch.randperm(5000, generator=torch.Generator().manual_seed(0))]
    assert torch.equal(common.labeled_split(labels, 37, 1), common.labeled_split(labels, 37, 1, num_classes=10))
    assert torch.equal(common.labeled_split(labels, 5000, 0), common.labeled_split(labels, "all", 0))


@pytest.mark.parametrize("dataset,n,size,message", [
    ("cifar10", 5, 32, "--n-labeled must be between 10 and 50000, got 5"),
    ("cifar100", 50, 32, "--n-labeled must be between 100 and 50000, got 50"),
    ("cifar100", 50001, 32, "--n-labeled must be between 100 and 50000, got 50001"),
    ("cifar10", 250, 64, "--image-size is for --dataset folder"),
    ("folder", 0, 32, "--n-labeled must be a positive number or 'all'"),
    ("folder", 100, 4, "--image-size must be >= 8"),
])
def test_check_data_args_refuses(dataset, n, size, message):
    with pytest.raises(common.DataError, match=re.escape(message)):
        common.check_data_args(dataset, n, size)


@pytest.mark.parametrize("dataset,n,size", [("cifar10", "all", 32), ("cifar100", 400, 32), ("cifar100", 100, 32),
                                            ("folder", 1, 8), ("folder", "all", 96), ("folder", 10**6, 224)])
def test_check_data_args_accepts(dataset, n, size):
    common.check_data_args(dataset, n, size)


def test_n_labeled_flag_is_a_number_or_all():
    import fixmatch
    assert fixmatch.parse_args(["--n-labeled", "250"]).n_labeled == 250  # an int, as in older args.json files
    assert fixmatch.parse_args(["--n-labeled", "all"]).n_labeled == "all"
    with pytest.raises(argparse.ArgumentTypeError, match="a number of images or 'all'"):
        common.parse_n_labeled("some")
    assert fixmatch.parse_args(["--dataset", "cifar100", "--n-labeled", "400"]).out == os.path.join(
        "runs", "fixmatch_cifar100_n400_seed0")
    assert fixmatch.parse_args(["--n-labeled", "400"]).out == os.path.join("runs", "fixmatch_n400_seed0")


def test_normalize_with_a_data_sets_statistics():
    x = torch.tensor([[0, 255], [128, 51], [255, 0]], dtype=torch.uint8).reshape(1, 3, 1, 2)
    out = common.normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    expected = torch.tensor([[-1.0, 1.0], [(128 / 255 - 0.25) / 0.25, (51 / 255 - 0.25) / 0.25],
                             [1.0, 0.0]]).reshape(1, 3, 1, 2)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(common.normalize(x), common.normalize(x, common.CIFAR10_MEAN, common.CIFAR10_STD))


@pytest.mark.parametrize("size,shift", [(16, 2), (32, 4), (64, 8), (96, 12)])
def test_weak_augment_shift_is_an_eighth_of_the_size(size, shift):
    x = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g, replay = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    out = common.weak_augment(x, g)
    flip = torch.rand(64, generator=replay) < 0.5
    drawn = torch.randint(-shift, shift + 1, (2, 64), generator=replay)
    assert drawn.abs().max() == shift  # 64 images span the range
    assert torch.equal(out, common.flip_translate(x, flip, drawn[0], drawn[1]))


@pytest.mark.parametrize("size", [16, 48])
def test_strong_augment_cutout_is_half_the_size(size):
    x = torch.randint(0, 256, (24, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g, replay = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    out = common.strong_augment(x, g)
    ref = common.randaugment(common.weak_augment(x, replay), replay)
    centre = torch.randint(0, size, (2, 24), generator=replay)
    assert torch.equal(out, common.cutout(ref, centre[0], centre[1], size // 2, 127))


def test_randaugment_translation_is_a_fraction_of_the_size():
    # TranslateX by 0.25 of the width moves a 16-wide image by 4 px and a 48-wide one by 12 px (Pillow's
    # convention: content moves left for a positive value).
    for size in (16, 48):
        x = torch.arange(size, dtype=torch.uint8).expand(1, 3, size, size).contiguous()
        out = common.apply_op("TranslateX", x, 0.25)
        shift = size // 4
        assert torch.equal(out[0, :, :, :size - shift], x[0, :, :, shift:])
        assert (out[0, :, :, size - shift:] == 0).all()


@pytest.mark.parametrize("name", ["fixmatch", "flexmatch"])
def test_pseudo_label_accuracy_counts_only_images_with_a_label(name):
    """y_u = -1 (an unlabeled/ image) is neither right nor wrong: the accuracies are over the images with a label,
    as ratios of sums over the steps, so a step without any such image changes nothing (no zero counted)."""
    module = importlib.import_module(name)
    # 5 unlabeled images: predicted classes 0, 1, 1, 2, 0; confident (>= 0.9) the first three.
    weak = torch.tensor([[0.95, 0.04, 0.01], [0.02, 0.96, 0.02], [0.03, 0.92, 0.05], [0.3, 0.3, 0.4], [0.5, 0.3, 0.2]])
    logits = torch.cat([torch.zeros(2, 3), weak.log(), torch.zeros(5, 3)])
    model = FixedLogits(logits)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(threshold=0.9, lambda_u=1.0, threshold_warmup=True, mapping="convex")
    image = lambda n: torch.zeros(n, 3, 8, 8, dtype=torch.uint8)  # noqa: E731 (the stand-in ignores the pixels)

    def step(y_u):
        """The loop's statistics of one step: the algorithm's, then the diagnostic that reads y_u."""
        batch = (model, optimizer, image(2), torch.tensor([0, 1]), image(5), image(5))
        if name == "flexmatch":  # every image's latest confident class is 1: T(1) = 0.9, T(0) = T(2) = 0
            stats, labels, mask = module.train_step(*batch, torch.arange(5), torch.ones(5, dtype=torch.int64), args,
                                                    False, num_classes=3)
        else:
            stats, labels, mask = module.train_step(*batch, args, False)
        stats = {**stats, **module.pseudo_label_stats(labels, mask, y_u)}
        return list(stats), torch.stack(list(stats.values()))

    y_u = torch.tensor([0, -1, 2, 2, -1])  # right, unknown, wrong, right, unknown
    used = [1, 1, 1, 1, 1] if name == "flexmatch" else [1, 1, 1, 0, 0]
    known_used = [u for u, y in zip(used, y_u.tolist()) if y >= 0]
    right_used = [u for u, y, p in zip(used, y_u.tolist(), [0, 1, 1, 2, 0]) if y >= 0 and y == p]
    names, one = step(y_u)
    row = module.summarize(names, one, 1)
    assert row["mask_rate"] == pytest.approx(sum(used) / 5)
    assert row["pseudo_acc"] == pytest.approx(2 / 3)  # of the 3 images with a label, 2 right
    assert row["pseudo_acc_masked"] == pytest.approx(sum(right_used) / sum(known_used))
    # A second step of unlabeled/ images only: the mask rate averages over both, the accuracies stay.
    two = module.summarize(names, one + step(torch.full((5,), -1))[1], 2)
    assert two["mask_rate"] == pytest.approx(sum(used) / 5)
    assert two["pseudo_acc"] == pytest.approx(2 / 3)
    assert two["pseudo_acc_masked"] == pytest.approx(sum(right_used) / sum(known_used))
    nothing = module.summarize(*step(torch.full((5,), -1)), 1)
    assert nothing["pseudo_acc"] is None and nothing["pseudo_acc_masked"] is None and nothing["mask_rate"] > 0


@pytest.mark.parametrize("name", ["mixmatch", "remixmatch"])
def test_guessed_label_accuracy_is_a_ratio_of_sums_over_images_with_a_label(name):
    module = importlib.import_module(name)
    # The guessed label is argmax q, without a mask: 2 images, one right, one without a label (-1).
    stats = module.pseudo_label_stats(torch.tensor([3, 1]), None, torch.tensor([3, -1]))
    assert list(stats) == ["pseudo_acc", "known_rate"] and [v.item() for v in stats.values()] == [0.5, 0.5]
    # Per step: pseudo_acc = fraction of the batch right (-1 never is), known_rate = fraction with a label.
    names = ["loss", "pseudo_acc", "known_rate"]
    steps = torch.tensor([[1.0, 0.5, 0.75], [1.0, 0.0, 0.0], [1.0, 0.25, 0.25]])  # the middle: unlabeled/ only
    assert module.summarize(names, steps.sum(0), 3)["pseudo_acc"] == pytest.approx(0.75 / 1.0)
    assert module.summarize(names, steps[1], 1)["pseudo_acc"] is None


# ----------------------------------------------------------------------------------------------------
# The scripts on both layouts
# ----------------------------------------------------------------------------------------------------
TINY = ["--device", "cpu", "--depth", "10", "--widen-factor", "1", "--batch-size", "4", "--epochs", "2",
        "--steps-per-epoch", "2", "--eval-every", "2", "--log-every", "2"]


def _check_finished_run(out: str, num_classes: int, classes: list[str], n_labeled: int) -> list[dict]:
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert len(res["per_class_top1"]) == num_classes and res["classes"] == classes
    assert 0 <= res["final_top1"] <= res["final_top5"] <= 1
    with open(os.path.join(out, "labeled_indices.json")) as f:
        assert len(json.load(f)) == n_labeled
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert np.isfinite(r["loss"]) and np.isfinite(r["test_loss"])
        for key in ("pseudo_acc", "pseudo_acc_masked"):
            assert r.get(key) is None or 0 <= r[key] <= 1, (key, r[key])
    return rows


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_scripts_run_on_an_image_folder_at_another_size(name, folder_dir, tmp_path, capsys):
    """All seven on 3 unbalanced classes at 24x24, with extra unlabeled images (label -1) in the unlabeled set;
    --n-labeled all takes the 12 train/ images (an unbalanced split) for two of them."""
    n_labeled = "all" if name in ("supervised", "remixmatch") else "6"
    out = str(tmp_path / "run")
    argv = TINY + SCRIPTS[name] + ["--dataset", "folder", "--image-size", "24", "--data-dir", folder_dir,
                                        "--n-labeled", n_labeled, "--out", out]
    assert importlib.import_module(name).main(argv) == 0
    rows = _check_finished_run(out, 3, FOLDER_CLASSES, 12 if n_labeled == "all" else 6)
    with open(os.path.join(out, "labeled_indices.json")) as f:
        assert max(json.load(f)) < 12  # never one of the unlabeled/ images (indices 12..16)
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert state["model"]["fc.weight"].shape[0] == 3
    if name == "flexmatch":
        assert state["selected_label"].shape == (17,)  # one entry per unlabeled image, unlabeled/ included
        assert len(rows[-1]["class_thresholds"]) == 3
    if name == "remixmatch":
        assert state["p_model"]["buffer"].shape == (3, 3)
    if name != "supervised":  # the unlabeled stream runs over train/ and unlabeled/
        assert len(state["unlabeled_batches"]["perm"]) == 17
    # model.pt carries this data set's classes, image size, mean and std, and predict.py reads test/ as training
    # did: its --test-dir accuracy is the run's final top-1.
    _, meta = common.load_model(os.path.join(out, "model.pt"))
    data = common.load_dataset("folder", folder_dir, 24)
    assert meta["classes"] == FOLDER_CLASSES and meta["image_size"] == 24 and meta["architecture"]["num_classes"] == 3
    assert (meta["mean"], meta["std"]) == (list(data["mean"]), list(data["std"]))
    assert predict.main([out, "--test-dir", os.path.join(folder_dir, "test"), "--out", str(tmp_path / "p.csv")]) == 0
    correct, total = map(int, re.search(r"accuracy [0-9.]+% \((\d+)/(\d+) images\)", capsys.readouterr().out).groups())
    with open(os.path.join(out, "results.json")) as f:
        assert total == 6 and correct / total == pytest.approx(json.load(f)["final_top1"], abs=1e-6)


@pytest.mark.parametrize("name", ["flexmatch", "remixmatch"])
def test_scripts_run_on_cifar100(name, cifar100_dir, tmp_path):
    out = str(tmp_path / "run")
    argv = TINY + SCRIPTS[name] + ["--dataset", "cifar100", "--data-dir", cifar100_dir, "--n-labeled", "100",
                                        "--out", out]
    assert importlib.import_module(name).main(argv) == 0
    rows = _check_finished_run(out, 100, CIFAR100_NAMES, 100)
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert state["model"]["fc.weight"].shape[0] == 100
    if name == "flexmatch":
        assert len(rows[-1]["class_thresholds"]) == 100
    else:
        assert state["p_model"]["buffer"].shape == (3, 100)


def _copy_with(folder_dir, root, damage):
    shutil.copytree(folder_dir, root)
    damage(str(root))
    return str(root)


@pytest.mark.parametrize("name", ["fixmatch", "supervised"])
def test_scripts_bad_data_exits_2_with_one_line_and_nothing_on_disk(name, folder_dir, cifar100_dir, tmp_path,
                                                                   monkeypatch, capsys):
    import torchvision.datasets
    downloads = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", lambda *a, **k: downloads.append(a) or 1 / 0)
    broken = _copy_with(folder_dir, tmp_path / "broken", lambda r: _write(r, os.path.join("train", "cat", "x.png")))
    cases = [
        (["--dataset", "folder", "--data-dir", broken, "--n-labeled", "6"], os.path.join("train", "cat", "x.png")),
        (["--dataset", "folder", "--data-dir", folder_dir, "--n-labeled", "13"], "between 3 and 12 (the training set)"),
        (["--dataset", "folder", "--data-dir", folder_dir, "--n-labeled", "12"], "class 1 has 3 training images"),
        (["--dataset", "folder", "--data-dir", folder_dir, "--n-labeled", "6", "--image-size", "4"], "--image-size"),
        (["--dataset", "cifar100", "--data-dir", str(tmp_path / "none"), "--n-labeled", "50"], "between 100 and"),
        (["--dataset", "cifar100", "--data-dir", str(tmp_path / "none"), "--n-labeled", "400"], "cifar-100-python"),
        (["--data-dir", str(tmp_path / "none"), "--n-labeled", "250", "--image-size", "64"], "--image-size is for"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        assert importlib.import_module(name).main(TINY + SCRIPTS[name] + extra + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (extra, err)
        assert not out.exists()
    assert len(downloads) == 1  # only the valid cifar100 command tried to download (and failed)
    with pytest.raises(SystemExit) as e:  # argparse's own exit status for a malformed value
        importlib.import_module(name).main(TINY + ["--n-labeled", "many"])
    assert e.value.code == 2 and "a number of images or 'all'" in capsys.readouterr().err


def test_a_run_from_before_dataset_flags_resumes_and_refuses_another_data_set(cifar_dir, cifar100_dir, tmp_path,
                                                                            capsys):
    """args.json of older runs has no dataset/image_size: it is a CIFAR-10 run at 32x32, not 'other arguments'."""
    import supervised
    out = str(tmp_path / "run")
    argv = TINY + ["--n-labeled", "20", "--data-dir", cifar_dir, "--out", out]
    assert supervised.main(argv) == 0
    with open(os.path.join(out, "args.json")) as f:
        old = json.load(f)
    del old["dataset"], old["image_size"]
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(old, f)
    capsys.readouterr()
    assert supervised.main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    argv100 = TINY + ["--n-labeled", "100", "--dataset", "cifar100", "--data-dir", cifar100_dir, "--out", out]
    assert supervised.main(argv100) == 2
    assert "--dataset cifar10 -> cifar100" in capsys.readouterr().err
