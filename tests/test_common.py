"""Tests of common.py: every augmentation op against Pillow, the weak/strong pipelines, the labeled split,
the loader (including its errors), the index stream and the WideResNet. CPU only, a few seconds."""

import copy
import io
import math
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common

# The per-image Pillow version of each RandAugment op, shared with the throughput benchmark.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from augment_throughput import pil_op  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# Pillow references
# ----------------------------------------------------------------------------------------------------
def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def generator_pair(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Two CPU generators in the same state: one for the function under test, one to replay its draws."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


def pil_batch(name: str, x: torch.Tensor, values) -> torch.Tensor:
    values = [float(values)] * len(x) if np.isscalar(values) else [float(v) for v in values]
    return torch.stack([from_pil(pil_op(to_pil(img), name, v)) for img, v in zip(x, values)])


@pytest.fixture(scope="module")
def images(photo_like_images) -> torch.Tensor:
    """Photo-like images plus the corner cases the lookup-table ops special-case."""
    base = photo_like_images[:24]
    g = torch.Generator().manual_seed(0)
    constant = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)  # AutoContrast/Equalize leave it alone
    one_flat_channel = base[:1].clone()
    one_flat_channel[:, 1] = 200
    narrow = (100 + base[1:2].float() / 255 * 10).round().to(torch.uint8)  # values 100..110 only
    two_values = torch.where(torch.rand(1, 1, 32, 32, generator=g) < 0.3, 10, 240).to(torch.uint8).expand(1, 3, 32, 32)
    noise = torch.randint(0, 256, (1, 3, 32, 32), generator=g, dtype=torch.uint8)  # not smooth at all
    return torch.cat([base, constant, one_flat_channel, narrow, two_values, noise])


# ----------------------------------------------------------------------------------------------------
# Each op vs Pillow at fixed magnitudes across its range
# ----------------------------------------------------------------------------------------------------
def _op_cases():
    cases = []
    for name, (_, _, lo, hi) in common.RANDAUGMENT_OPS.items():
        if lo == hi:
            cases.append(pytest.param(name, float(lo), id=name))
            continue
        values = [lo + (hi - lo) * q for q in (0, 0.25, 0.5, 0.75, 1)]
        if name == "Posterize":
            # PIL accepts 1..8 bits, so the top end is the largest value below 9 (it keeps 8 bits); also a
            # value just below an integer, to check the floor.
            values = values[:-1] + [math.nextafter(9.0, 0.0), 4.99]
        if name == "Solarize":
            values.append(127.9)  # floored to 127
        for v in values:
            cases.append(pytest.param(name, float(v), id=f"{name}-{v:g}"))
    # Shear 0.2 puts the sample points of every fifth row exactly on a pixel edge (0.5 + 0.2 * (row + 0.5)
    # is a whole number), where Pillow's 16.16 fixed-point coefficients decide the side: common.warp must
    # use the same arithmetic to agree there.
    for name in ("ShearX", "ShearY"):
        cases.append(pytest.param(name, 0.2, id=f"{name}-0.2-tie"))
    # A translation whose sample points lie 1e-7 px before a pixel edge: Pillow floors them in floating
    # point (its scale path), where 16.16 fixed point would round them onto the edge, one pixel further.
    for name in ("TranslateX", "TranslateY"):
        cases.append(pytest.param(name, (2.5 - 1e-7) / 32, id=f"{name}-near-edge"))
    return cases


@pytest.mark.parametrize("name, v", _op_cases())
def test_op_matches_pillow(images, name, v):
    ours = common.apply_op(name, images, v)
    ref = pil_batch(name, images, v)
    assert ours.dtype == torch.uint8 and ours.shape == images.shape
    differ = (ours != ref).any(1)
    assert torch.equal(ours, ref), f"{int(differ.sum())} of {differ.numel()} pixels differ"


@pytest.mark.parametrize("name", common.OP_NAMES)
def test_op_with_one_value_per_image_matches_pillow(images, name):
    _, _, lo, hi = common.RANDAUGMENT_OPS[name]
    g = torch.Generator().manual_seed(common.OP_NAMES.index(name))
    values = lo + (hi - lo) * torch.rand(len(images), generator=g, dtype=torch.float64)
    ours = common.apply_op(name, images, values)
    ref = pil_batch(name, images, values)
    differ = (ours != ref).any(1)
    assert torch.equal(ours, ref), f"{int(differ.sum())} of {differ.numel()} pixels differ"


# ----------------------------------------------------------------------------------------------------
# Weak augmentation and Cutout
# ----------------------------------------------------------------------------------------------------
def test_flip_translate_matches_numpy_pad_and_crop(photo_like_images):
    cases = [(False, 0, 0), (True, 0, 0), (False, -4, -4), (True, 4, 4), (False, 4, -4), (True, -4, 3),
             (False, 2, -1), (True, -3, 0), (True, 1, -2), (False, 0, 4)]
    x = photo_like_images[:len(cases)]
    flip, dy, dx = (torch.tensor(c) for c in zip(*cases))
    out = common.flip_translate(x, flip, dy, dx)
    for i, (f, sy, sx) in enumerate(cases):
        img = x[i].numpy()
        if f:
            img = img[:, :, ::-1]
        padded = np.pad(img, ((0, 0), (4, 4), (4, 4)), mode="reflect")
        ref = padded[:, 4 + sy:4 + sy + 32, 4 + sx:4 + sx + 32]
        np.testing.assert_array_equal(out[i].numpy(), ref, err_msg=f"flip={f} dy={sy} dx={sx}")


def test_weak_augment_is_flip_translate_with_its_draws(photo_like_images):
    x = photo_like_images
    g, replay = generator_pair(3)
    out = common.weak_augment(x, g)
    flip = torch.rand(len(x), generator=replay) < 0.5
    shift = torch.randint(-4, 5, (2, len(x)), generator=replay)
    assert flip.any() and not flip.all() and shift.abs().max() == 4  # the draws span the whole range
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, common.flip_translate(x, flip, shift[0], shift[1]))


def test_cutout_hand_computed():
    x = (torch.arange(2 * 3 * 8 * 8) % 101).to(torch.uint8).reshape(2, 3, 8, 8)  # no pixel is 127 yet
    out = common.cutout(x, cy=torch.tensor([4, 0]), cx=torch.tensor([3, 7]), size=4, fill=127)
    expected = x.clone()
    expected[0, :, 2:6, 1:5] = 127  # rows 4-2..4+1, columns 3-2..3+1
    expected[1, :, 0:2, 5:8] = 127  # centre in the top-right corner: clipped to 2 rows x 3 columns
    assert torch.equal(out, expected)


def test_cutout_default_size_clipped_at_border():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    out = common.cutout(x, cy=torch.tensor([31]), cx=torch.tensor([0]))
    expected = x.clone()
    expected[0, :, 23:32, 0:8] = 127  # a 16 px square centred at (31, 0): rows 23..38, columns -8..7
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------------
# RandAugment and strong augmentation
# ----------------------------------------------------------------------------------------------------
def test_randaugment_equals_apply_op_image_by_image(images):
    x = images
    g, replay = generator_pair(11)
    out = common.randaugment(x, g)
    ref, drawn = x.clone(), set()
    for _ in range(2):  # randaugment's draws per round: the op per image, then a uniform per image
        op = torch.randint(0, len(common.OP_NAMES), (len(x),), generator=replay)
        u = torch.rand(len(x), generator=replay, dtype=torch.float64)
        for i in range(len(x)):
            name = common.OP_NAMES[op[i]]
            _, _, lo, hi = common.RANDAUGMENT_OPS[name]
            ref[i:i + 1] = common.apply_op(name, ref[i:i + 1], lo + (hi - lo) * u[i])
            drawn.add(name)
    assert len(drawn) >= 12  # the batch mixes (almost) every op, so the grouping by op is exercised
    assert torch.equal(out, ref)


@pytest.mark.parametrize("augment", [common.randaugment, common.strong_augment])
def test_augment_is_random_per_image(photo_like_images, augment):
    x = photo_like_images[5:6].expand(64, 3, 32, 32).contiguous()
    out = augment(x, torch.Generator().manual_seed(0))
    distinct = torch.unique(out.reshape(64, -1), dim=0)
    assert len(distinct) >= 56, f"only {len(distinct)} distinct outputs for 64 copies of one image"


@pytest.mark.parametrize("augment", [common.weak_augment, common.randaugment, common.strong_augment])
def test_augment_dtype_shape_and_seed(photo_like_images, augment):
    x = photo_like_images
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    # Float images with integer values give the same values (common.py's augmentation contract).
    f = augment(x.float(), torch.Generator().manual_seed(5))
    assert f.dtype == torch.float32 and torch.equal(f, a.float())


@pytest.mark.parametrize("augment", [common.weak_augment, common.strong_augment])
def test_views_are_the_images_and_draws_of_calls_in_a_row(photo_like_images, augment):
    x = photo_like_images[:24]
    g, replay = generator_pair(13)
    out = augment(x, g, views=3)
    calls = torch.stack([augment(x, replay) for _ in range(3)])
    assert out.shape == (3, *x.shape) and torch.equal(out, calls)
    assert torch.equal(g.get_state(), replay.get_state())  # the next draws are the same too
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("views", [None, 3])
def test_fixed_shapes_are_the_same_images_and_draws(images, views):
    # Every image through every kind of op (identity where it drew another kind) gives the grouped route's images
    # bit for bit, on uint8 and on float images, and leaves the generator where the grouped route leaves it.
    for seed in range(4):
        g, replay = generator_pair(seed)
        out = common.strong_augment(images, g, views=views, fixed_shapes=True)
        assert torch.equal(out, common.strong_augment(images, replay, views=views))
        assert torch.equal(g.get_state(), replay.get_state())
    f = common.strong_augment(images.float(), torch.Generator().manual_seed(0), views=views, fixed_shapes=True)
    ref = common.strong_augment(images, torch.Generator().manual_seed(0), views=views)
    assert f.dtype == torch.float32 and torch.equal(f, ref.float())


@pytest.mark.parametrize("name", common.OP_NAMES)
def test_fixed_shapes_each_op_for_the_whole_batch(images, name):
    # One op drawn by every image (and so none of the other kinds: their identities carry every image), at
    # values across its range: the fixed-shape round equals the op itself.
    b, (_, _, lo, hi) = len(images), common.RANDAUGMENT_OPS[name]
    op, v = np.full(b, common.OP_NAMES.index(name)), np.linspace(lo, hi, b)
    plan = [torch.from_numpy(a) for a in common._plan_ops_fixed(op, v, 32, 32)]
    assert torch.equal(common._run_ops_fixed(images, *plan), common.apply_op(name, images, v))


def test_fixed_shapes_plan_shapes_do_not_depend_on_the_draws():
    # What a CUDA graph needs: the same arrays, shapes and dtypes whatever ops the images drew.
    shapes = {tuple((a.shape, a.dtype.str) for a in common.plan_strong(torch.Generator().manual_seed(s), 16, 32, 32))
              for s in range(20)}
    assert len(shapes) == 1


def test_cutout_odd_size_hand_computed():
    x = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    out = common.cutout(x, cy=torch.tensor([2]), cx=torch.tensor([3]), size=3, fill=9)
    expected = x.clone()
    expected[0, 0, 1:3, 2:4] = 9  # size // 2 = 1 either side of the centre, end exclusive: 2 x 2
    assert torch.equal(out, expected)


def test_warp_source_hand_computed():
    # Shear x by 0.5 on a 4 x 4 image: output pixel (i, j) samples column floor(j + .5 + 0.5 * (i + .5)).
    matrix = np.array([[1.0, 0.5, 0.0, 0.0, 1.0, 0.0]])
    src = common.warp_source(torch.from_numpy(common.warp_fixed_point(matrix)), 4, 4).view(4, 4)
    columns = [[0, 1, 2, 3], [1, 2, 3, None], [1, 2, 3, None], [2, 3, None, None]]
    expected = [[i * 4 + c if c is not None else 16 for c in row] for i, row in enumerate(columns)]
    assert src.tolist() == expected


def test_strong_augment_is_weak_randaugment_cutout(photo_like_images):
    x = photo_like_images
    g, replay = generator_pair(8)
    out = common.strong_augment(x, g)
    ref = common.randaugment(common.weak_augment(x, replay), replay)
    centre = torch.randint(0, 32, (2, len(x)), generator=replay)
    assert torch.equal(out, common.cutout(ref, centre[0], centre[1], 16, 127))
    # Cutout comes last: every image keeps at least an 8x8 (corner-clipped) square of pure 127 gray.
    gray = (out == 127).all(1)
    for i in range(len(x)):
        cy, cx = int(centre[0, i]), int(centre[1, i])
        assert gray[i, max(cy - 8, 0):cy + 8, max(cx - 8, 0):cx + 8].all()


# ----------------------------------------------------------------------------------------------------
# Labeled split
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    """5000 labels, 500 per class, in a shuffled order."""
    return (torch.arange(5000) % 10)[torch.randperm(5000, generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("n", [10, 40, 37, 250, 1234, 4999, 5000])
def test_labeled_split_size_balance_sorted(labels, n):
    idx = common.labeled_split(labels, n, seed=0)
    assert idx.dtype == torch.int64 and len(idx) == n
    assert (idx[1:] > idx[:-1]).all()  # sorted and unique
    assert 0 <= idx.min() and idx.max() < len(labels)
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert sorted(counts.tolist()) == sorted([n // 10 + (c < n % 10) for c in range(10)])


def test_labeled_split_seeding(labels):
    a = common.labeled_split(labels, 250, seed=1)
    assert torch.equal(a, common.labeled_split(labels, 250, seed=1))
    b = common.labeled_split(labels, 250, seed=2)
    assert len(set(a.tolist()) ^ set(b.tolist())) > 100  # mostly different images, not a reordering
    # Which classes get the extra image is seeded too.
    extra = {tuple(torch.bincount(labels[common.labeled_split(labels, 37, s)], minlength=10).tolist())
             for s in range(5)}
    assert len(extra) > 1


def test_labeled_split_unbalanced_classes():
    labels = torch.cat([torch.zeros(30, dtype=torch.int64), torch.arange(1, 10).repeat_interleave(100)])
    idx = common.labeled_split(labels, 300, seed=0)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [30] * 10
    with pytest.raises(common.DataError, match="class 0 has 30"):
        common.labeled_split(labels, 310, seed=0)


@pytest.mark.parametrize("n", [0, 9, 5001])
def test_labeled_split_out_of_range(labels, n):
    with pytest.raises(common.DataError, match="between 10 and 5000"):
        common.labeled_split(labels, n, seed=0)


# ----------------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------------
def _read_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_load_cifar10_matches_files(cifar_dir):
    data = common.load_cifar10(cifar_dir, download=False)
    folder = os.path.join(cifar_dir, "cifar-10-batches-py")
    assert data["train_x"].shape == (500, 3, 32, 32) and data["train_x"].dtype == torch.uint8
    assert data["test_x"].shape == (200, 3, 32, 32) and data["test_x"].dtype == torch.uint8
    assert data["train_y"].dtype == torch.int64 and data["test_y"].dtype == torch.int64
    assert torch.bincount(data["train_y"]).tolist() == [50] * 10
    assert torch.bincount(data["test_y"]).tolist() == [20] * 10
    # The batches are concatenated in file order; image k of data_batch_3 keeps its pixels (R, G, B planes,
    # each row-major) and its label.
    offset = sum(len(_read_pickle(os.path.join(folder, f"data_batch_{i}"))[b"labels"]) for i in (1, 2))
    entry = _read_pickle(os.path.join(folder, "data_batch_3"))
    k = 7
    row = entry[b"data"][k]
    img = data["train_x"][offset + k]
    assert img[0, 0, 0] == row[0] and img[0, 0, 1] == row[1] and img[0, 1, 0] == row[32]
    assert img[1, 0, 0] == row[1024] and img[2, 31, 31] == row[3071]
    assert torch.equal(img, torch.from_numpy(row.reshape(3, 32, 32)))
    assert data["train_y"][offset:offset + len(entry[b"labels"])].tolist() == entry[b"labels"]
    test = _read_pickle(os.path.join(folder, "test_batch"))
    assert torch.equal(data["test_x"][-1], torch.from_numpy(test[b"data"][-1].reshape(3, 32, 32)))


def test_load_cifar10_missing_folder(tmp_path):
    with pytest.raises(common.DataError) as e:
        common.load_cifar10(str(tmp_path / "nowhere"), download=False)
    assert os.path.join(str(tmp_path / "nowhere"), "cifar-10-batches-py") in str(e.value)


def test_load_cifar10_missing_file(cifar_dir, tmp_path):
    shutil.copytree(cifar_dir, tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(common.DataError, match="missing data_batch_4"):
        common.load_cifar10(str(tmp_path), download=False)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _garble(path):
    data = bytearray(path.read_bytes())
    data[:64] = b"\x00" * 64  # 0x00 is no pickle opcode
    path.write_bytes(bytes(data))


def _wrong_content(path):
    entry = _read_pickle(str(path))
    entry[b"labels"] = [y + 10 for y in entry[b"labels"]]  # a valid pickle, but labels 10..19
    path.write_bytes(pickle.dumps(entry, protocol=2))


def _not_a_dict(path):
    path.write_bytes(pickle.dumps([1, 2, 3]))


@pytest.mark.parametrize("damage", [_truncate, _garble, _wrong_content, _not_a_dict])
@pytest.mark.parametrize("name", ["data_batch_2", "test_batch"])
def test_load_cifar10_broken_file(cifar_dir, tmp_path, damage, name):
    shutil.copytree(cifar_dir, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "cifar-10-batches-py" / name
    damage(path)
    with pytest.raises(common.DataError) as e:
        common.load_cifar10(str(tmp_path), download=False)
    assert str(path) in str(e.value)
    # One clean line: no pickle exception chained to it (its traceback would bury the message).
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)


# ----------------------------------------------------------------------------------------------------
# Index stream
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [3, 10, 25])
def test_random_batches_epochs_without_replacement(batch_size):
    indices = torch.arange(100, 110)  # positions 0..9 hold values 100..109: the stream returns values
    stream = common.RandomBatches(indices, batch_size, seed=0)
    drawn = torch.cat([stream() for _ in range(30)])
    assert len(drawn) == 30 * batch_size
    epochs = drawn.reshape(-1, 10)  # 30 * batch_size is a whole number of epochs of 10
    assert (epochs.sort(1).values == indices).all()
    assert len({tuple(e.tolist()) for e in epochs}) > 1  # reshuffled between epochs


def test_random_batches_resume_is_exact():
    indices = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    stream = common.RandomBatches(indices, 16, seed=3)
    for _ in range(7):  # stop mid-epoch
        stream()
    buf = io.BytesIO()
    torch.save(stream.state_dict(), buf)  # the round trip a checkpoint makes
    expected = [stream() for _ in range(10)]
    resumed = common.RandomBatches(indices, 16, seed=99)
    fresh = [resumed() for _ in range(10)]
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    got = [resumed() for _ in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert not all(torch.equal(a, b) for a, b in zip(expected, fresh))


# ----------------------------------------------------------------------------------------------------
# Model and input normalization
# ----------------------------------------------------------------------------------------------------
def test_wrn_28_2_parameter_count():
    model = common.WideResNet()
    assert sum(p.numel() for p in model.parameters()) == 1_467_610


@pytest.mark.parametrize("depth, width, features", [(28, 2, 128), (10, 1, 64)])
def test_wrn_output_shapes(depth, width, features):
    model = common.WideResNet(num_classes=10, depth=depth, widen_factor=width).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model.features(x).shape == (3, features)
        assert model(x).shape == (3, 10)
    assert model.num_features == features


def test_ghost_batch_norm_hand_computed():
    # 2 groups of 2 samples, 1 channel, 1 pixel, eps ~0: each group is normalised with its own mean and (biased)
    # variance, y = gamma (x - mu_g) / sigma_g + beta with gamma 2 and beta 0.5.
    bn = torch.nn.BatchNorm2d(1, eps=1e-12, momentum=0.1)
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(0.5)
    x = torch.tensor([1.0, 3.0, 10.0, 16.0]).view(4, 1, 1, 1)
    y = common.ghost_batch_norm(bn, x, [2, 2])
    # group 1: mu 2, sigma 1 -> (-1, 1); group 2: mu 13, sigma 3 -> (-1, 1); then 2 * . + 0.5
    assert torch.allclose(y.flatten(), torch.tensor([-1.5, 2.5, -1.5, 2.5]), atol=1e-6)
    # Running statistics from group 1 only: mean 0.9 * 0 + 0.1 * 2, unbiased variance 0.9 * 1 + 0.1 * 2 (of 1, 3).
    assert torch.allclose(bn.running_mean, torch.tensor([0.2])) and torch.allclose(bn.running_var, torch.tensor([1.1]))
    assert bn.num_batches_tracked.item() == 1
    # Without groups it is the ordinary BatchNorm over the whole batch (mu 7.5), which is not the same thing.
    assert not torch.allclose(common.ghost_batch_norm(copy.deepcopy(bn), x), y)
    # In eval mode the running statistics normalise every sample; the groups do not matter, nothing moves.
    bn.eval()
    expected = 2 * (x - 0.2) / math.sqrt(1.1) + 0.5
    assert torch.allclose(common.ghost_batch_norm(bn, x, [2, 2]), expected, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1


def per_group_passes(model: torch.nn.Module, x: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """What bn_groups stands for: a forward pass per group, the first an ordinary one, the others with
    track_running_stats off (batch statistics, running statistics neither read nor updated)."""
    outs = []
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for i, part in enumerate(x.split(groups)):
        for m in bns:
            m.track_running_stats = i == 0
        outs.append(model(part))
    for m in bns:
        m.track_running_stats = True
    return torch.cat(outs)


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """max |a - b| <= rel * max |b|: equal to float rounding, relative to the tensor's scale."""
    assert a.shape == b.shape and (a.float() - b.float()).abs().max() <= rel * b.float().abs().max(), what


@pytest.mark.parametrize("groups", [[4, 4, 3], [5, 6], [11]])
def test_wrn_bn_groups_is_a_pass_per_group(groups):
    """One pass with bn_groups: the logits, gradients and running statistics of a pass per group."""
    torch.manual_seed(0)
    model = common.WideResNet(depth=10, widen_factor=1)
    reference = copy.deepcopy(model)
    x = torch.randn(11, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 1
    w = torch.randn(11, 10, generator=torch.Generator().manual_seed(2))  # a loss that weighs every logit
    logits, expected = model(x, bn_groups=groups), per_group_passes(reference, x, groups)
    assert_rel_close(logits, expected)
    (logits * w).sum().backward()
    (expected * w).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_rel_close(p.grad, q.grad, what=name)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7), name
    assert all(m.num_batches_tracked.item() == 1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert list(model.state_dict()) == list(common.WideResNet(depth=10, widen_factor=1).state_dict())


def test_wrn_bn_groups_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = common.WideResNet(depth=10, widen_factor=1).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    y = common.ghost_batch_norm(model.body[1].bn1, model.body[0](x), [6, 6])
    assert y.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, expected = model(x, bn_groups=[6, 6]), per_group_passes(reference, x, [6, 6])
    assert logits.dtype == expected.dtype == torch.bfloat16
    assert_rel_close(logits, expected, 2e-2)  # bf16's rounding; the same kernels, so usually equal
    assert torch.allclose(model.bn.running_mean, reference.bn.running_mean, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("depth", [4, 9, 27])
def test_wrn_invalid_depth(depth):
    with pytest.raises(ValueError, match="6n\\+4"):
        common.WideResNet(depth=depth)


def test_normalize_hand_computed():
    x = torch.tensor([[0, 255], [128, 51], [255, 0]], dtype=torch.uint8).reshape(1, 3, 1, 2)
    out = common.normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    # (v / 255 - mean) / std with CIFAR-10's per-channel statistics.
    expected = torch.tensor([[(0 - 0.4914) / 0.2471, (1 - 0.4914) / 0.2471],
                             [(128 / 255 - 0.4822) / 0.2435, (51 / 255 - 0.4822) / 0.2435],
                             [(1 - 0.4465) / 0.2616, (0 - 0.4465) / 0.2616]]).reshape(1, 3, 1, 2)
    assert torch.allclose(out, expected, atol=1e-5)
    assert abs(out[0, 0, 0, 0].item() - (-1.98867)) < 1e-4  # -0.4914 / 0.2471, worked by hand
