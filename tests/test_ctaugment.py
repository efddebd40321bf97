"""Tests of common.py's CTAugment: every op against the reference's Pillow calls (bit for bit, as the RandAugment
ops), whole policies against the ops image by image, the sampler (bins below the threshold are never drawn, the
others in proportion to rate_to_p) and the update against a per-image transcription of the reference's
CTAugment.update_rates (google-research/fixmatch, libml/ctaugment.py). CPU only, a few seconds."""

import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from augment_throughput import pil_cta_op  # noqa: E402


def pil_images(name: str, x: torch.Tensor, level: np.ndarray, where: np.ndarray) -> torch.Tensor:
    """The reference's op on every image of x, level [B, 2] and Cutout's `where` [B, 2]."""
    out = [np.array(pil_cta_op(Image.fromarray(img.permute(1, 2, 0).numpy()), name, lv[0], lv[1], tuple(wh)))
           for img, lv, wh in zip(x, level, where)]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def images(photo_like_images) -> torch.Tensor:
    """Photo-like images, a constant one, one that is pure noise, and one with a narrow range of values."""
    g = torch.Generator().manual_seed(0)
    constant = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    noise = torch.randint(0, 256, (1, 3, 32, 32), generator=g, dtype=torch.uint8)
    narrow = (100 + photo_like_images[1:2].float() / 255 * 10).round().to(torch.uint8)
    return torch.cat([photo_like_images[:13], constant, noise, narrow])


def _levels() -> list[float]:
    # Both ends, the start of a bin of 17 and of 8, rotate's half-degree tie (level 0.5 + 0.5 / 90: 0.5 degrees,
    # which np.round takes to 0), and values between.
    return [0.0, 3 / 17, 0.25, 3 / 8, 0.5, 0.5 + 0.5 / 90, 0.7, 0.93, 1 - 1e-9]


@pytest.mark.parametrize("name", [n for n in common.CTA_NAMES if n != "rescale"])
def test_cta_op_matches_pillow(images, name):
    where = np.random.default_rng(1).uniform(0, 1, (len(images), 2))  # Cutout's centres, corners included
    where[:2] = [[0, 0], [0.999, 0.999]]
    for lv in _levels():
        level = np.full((len(images), 2), lv)
        ours, ref = common.cta_apply_op(name, images, level, where), pil_images(name, images, level, where)
        assert ours.dtype == torch.uint8 and ours.shape == images.shape
        assert torch.equal(ours, ref), f"{name} at {lv}: {int((ours != ref).any(1).sum())} pixels differ"


@pytest.mark.parametrize("method", common.RESCALE_METHODS)
def test_cta_rescale_matches_pillow_every_crop(images, method):
    # scale = level / 4 of 32 px gives crops of 0 to 8 px per side; the levels hit each, and a half-pixel tie
    # (level 2.5 / 8: crop box 2.5, rounded to 2 as Python's round does).
    m = (common.RESCALE_METHODS.index(method) + 0.5) / 6
    for lv in [k / 8 for k in range(9)][:-1] + [1 - 1e-9, 2.5 / 8, 0.01, 0.45]:
        level = np.tile([lv, m], (len(images), 1))
        where = np.zeros((len(images), 2))
        ours, ref = common.cta_apply_op("rescale", images, level, where), pil_images("rescale", images, level, where)
        assert torch.equal(ours, ref), f"{method} at {lv}: {int((ours != ref).any(1).sum())} pixels differ"


@pytest.mark.parametrize("name", common.CTA_NAMES)
def test_cta_op_with_one_level_per_image_matches_pillow(images, name):
    rng = np.random.default_rng(common.CTA_NAMES.index(name))
    level, where = rng.uniform(0, 1, (len(images), 2)), rng.uniform(0, 1, (len(images), 2))
    assert torch.equal(common.cta_apply_op(name, images, level, where), pil_images(name, images, level, where))


def test_cta_translate_is_the_identity_as_in_the_reference(images):
    # The reference's translate moves by at most 0.3 px, which NEAREST sampling rounds away (docs/data.md).
    for name in ("translate_x", "translate_y"):
        assert torch.equal(common.cta_apply_op(name, images, 0.0), images)
        assert torch.equal(common.cta_apply_op(name, images, 1 - 1e-9), images)


def test_cta_augment_equals_the_ops_image_by_image(images):
    # Whole policies (depth 2, mixed ops) through the grouped rounds give each image its ops in order.
    rates = common.cta_rates()
    g = torch.Generator().manual_seed(4)
    x = images.repeat(4, 1, 1, 1)
    for probe in (False, True):
        policy = common.cta_policy(rates, g, len(x), probe=probe)
        out = common.cta_augment(x, policy)
        ref = x.clone()
        for r in range(2):
            for i in range(len(x)):
                name = common.CTA_NAMES[policy["op"][r, i]]
                ref[i:i + 1] = common.cta_apply_op(name, ref[i:i + 1], policy["level"][r, i:i + 1],
                                                   policy["where"][r, i:i + 1])
        assert len(set(policy["op"].ravel().tolist())) == 19  # every op in the batch: every group exercised
        assert torch.equal(out, ref)
        assert torch.equal(common.cta_augment(x.float(), policy), out.float())  # float images: the same values


def test_cta_policy_is_seeded_and_advances_the_generator():
    rates = common.cta_rates()
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    p, q = common.cta_policy(rates, a, 64), common.cta_policy(rates, b, 64)
    assert all(np.array_equal(p[k], q[k]) for k in p)
    r = common.cta_policy(rates, a, 64)
    assert not np.array_equal(p["level"], r["level"])
    assert p["op"].shape == (2, 64) and p["level"].shape == p["where"].shape == (2, 64, 2)


# ----------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------
def test_rate_to_p_hand_computed():
    rates = common.cta_rates().numpy().copy()
    blur = slice(17, 34)  # blur's 17 bins follow autocontrast's
    rates[blur] = 0.5
    rates[17 + 3], rates[17 + 7], rates[17 + 9] = 0.99, 0.8, 0.83
    p = common.rate_to_p(rates)[blur]  # rate + 0.01 over the largest (1.0): 1, 0.81, 0.84; 0.51 is below 0.8
    expected = np.zeros(17)
    expected[3], expected[7], expected[9] = 1.0, 0.81, 0.84
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert (common.rate_to_p(rates)[:17] == 1).all()  # a parameter with all rates 1: all bins p = 1
    assert (common.rate_to_p(rates, threshold=0.85)[blur] > 0).sum() == 1  # 0.81 and 0.84 fall below 0.85


def test_cta_sampler_never_draws_below_the_threshold_and_follows_p():
    rng = np.random.default_rng(0)
    rates = torch.from_numpy(rng.uniform(0.5, 1.0, int(common._CTA_BINS.sum())))
    p = common.rate_to_p(rates.numpy())
    assert (p == 0).sum() > 100 and (p > 0).sum() > 60  # many bins out, many in
    policy = common.cta_policy(rates, torch.Generator().manual_seed(0), 20000)
    param = common._CTA_PARAM[policy["op"]]
    used = param >= 0
    n = common._CTA_BINS[param[used]]
    drawn = np.floor(policy["level"][used] * n).astype(np.int64)  # the bin the level was drawn in
    flat = common._CTA_START[param[used]] + drawn
    assert (p[flat] > 0).all(), "a bin below the threshold was drawn"
    counts = np.bincount(flat, minlength=len(p))
    for k, (start, size) in enumerate(zip(common._CTA_START, common._CTA_BINS)):
        share, freq = p[start:start + size] / p[start:start + size].sum(), counts[start:start + size]
        assert np.abs(freq / freq.sum() - share).max() < 0.06, f"parameter {k}: {freq} against {share}"
    inside = policy["level"][used] * n - drawn  # uniform inside the bin
    assert 0.48 < inside.mean() < 0.52 and inside.min() < 0.01 and inside.max() > 0.99
    ops = np.bincount(policy["op"].ravel(), minlength=19) / policy["op"].size  # each op 1/19
    assert np.abs(ops - 1 / 19).max() < 0.005


def test_cta_probe_policy_draws_uniform_levels():
    position = np.arange(int(common._CTA_BINS.sum())) - common._CTA_START[common._CTA_SEGMENT]  # bin in parameter
    rates = torch.from_numpy((position % 2 == 0).astype(np.float64))  # a training policy draws only even bins
    policy = common.cta_policy(rates, torch.Generator().manual_seed(1), 4000, probe=True)
    level = policy["level"].ravel()
    assert np.histogram(level, 10, (0, 1))[0].min() > 0.09 * level.size
    train = common.cta_policy(rates, torch.Generator().manual_seed(1), 4000)
    param = common._CTA_PARAM[train["op"]][..., 0]
    bins = np.floor(train["level"][..., 0] * common._CTA_BINS[np.maximum(param, 0)]).astype(np.int64)
    assert (bins[param >= 0] % 2 == 0).all()


# ----------------------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------------------
def reference_update(rates: dict, policy: list, proximity: float, decay: float = 0.99) -> None:
    """CTAugment.update_rates, transcribed: the policy as the reference holds it, [(op name, [levels])]."""
    for name, levels in policy:
        for level, rate in zip(levels, rates[name]):
            k = int(level * len(rate) * 0.999)
            rate[k] = rate[k] * decay + proximity * (1 - decay)


def as_reference(policy: dict, i: int) -> list:
    """Image i's policy in the reference's form: per round, the op's name and its parameters' levels."""
    out = []
    for op, level in zip(policy["op"][:, i], policy["level"][:, i]):
        name = common.CTA_NAMES[op]
        out.append((name, level[:len(common.CTA_OPS[name][1])].tolist()))
    return out


def sequential_update(rates: torch.Tensor, policy: dict, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cta/lib/train.py train_step's loop: image after image, its proximity, then update_rates."""
    ref = {name: [r.numpy().copy() for r in common.cta_rates_of(rates, name)] for name in common.CTA_NAMES}
    for i in range(len(labels)):
        error = probs[i].double().numpy().copy()
        error[labels[i]] -= 1
        reference_update(ref, as_reference(policy, i), 1 - 0.5 * np.abs(error).sum())
    return torch.from_numpy(np.concatenate([r for name in common.CTA_NAMES for r in ref[name]]))


def test_proximity_hand_computed():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 0, 0, 2])
    # 1 - (|p - onehot|_1) / 2: exact; wrong and sure; (0.5 + 0.25 + 0.25) / 2; (0.2 + 0.3 + 0.5) / 2
    torch.testing.assert_close(common.proximity(probs, labels), torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64))


def test_cta_update_hand_computed():
    # Three probe images: 0 and 2 both hit blur's bin 5 (twice within image 2: both rounds), 1 hits
    # posterize's bin 2 and rotate (which shares nothing). Level 6 / 17 counts in bin 5 (int(6 * 0.999)).
    blur, post, rot = (common.CTA_NAMES.index(n) for n in ("blur", "posterize", "rotate"))
    policy = {"op": np.array([[blur, post, blur], [rot, rot, blur]]),
              "level": np.array([[[5.5 / 17, 0], [2.2 / 8, 0], [6 / 17, 0]], [[0.0, 0], [1 - 1e-9, 0], [5.9 / 17, 0]]])}
    probs = torch.tensor([[0.8, 0.2], [0.1, 0.9], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    e = [0.8, 0.9, 0.4]  # 1 - |p - onehot|_1 / 2
    rates = common.cta_rates()
    rates[17 + 5] = 0.5
    new = common.cta_update(rates, policy, probs, labels)
    d = 0.99
    expected = rates.clone()
    # blur bin 5: hit by e0, then e2 twice: d^3 r + (1 - d)(d^2 e0 + d e2 + e2)
    expected[17 + 5] = d ** 3 * 0.5 + (1 - d) * (d ** 2 * e[0] + d * e[2] + e[2])
    p0 = common._CTA_START[common._CTA_PARAM[post, 0]]
    expected[p0 + 2] = d + (1 - d) * e[1]
    r0 = common._CTA_START[common._CTA_PARAM[rot, 0]]
    expected[r0 + 0] = d + (1 - d) * e[0]
    expected[r0 + 16] = d + (1 - d) * e[1]
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-15)
    assert new.dtype == torch.float64 and torch.equal(rates[17 + 5], torch.tensor(0.5, dtype=torch.float64))  # pure


@pytest.mark.parametrize("collide", [False, True])
def test_cta_update_equals_the_reference_image_after_image(collide):
    # Random probe policies over several steps (rates from earlier steps feed the next), and batches in which
    # many images hit the same bins (few ops, levels on a coarse grid), against the transcription.
    g, rng = torch.Generator().manual_seed(7), np.random.default_rng(7)
    rates = common.cta_rates()
    ref = rates.clone()
    for step in range(5):
        policy = common.cta_policy(rates, g, 64, probe=True)
        if collide:
            policy["op"] = rng.choice([1, 8, 9, 10], policy["op"].shape)  # blur, identity, posterize, rescale
            policy["level"] = rng.integers(0, 3, policy["level"].shape) / 3
        probs = torch.softmax(torch.from_numpy(rng.normal(0, 2, (64, 10))).float(), 1)
        labels = torch.from_numpy(rng.integers(0, 10, 64))
        rates = common.cta_update(rates, policy, probs, labels)
        ref = sequential_update(ref, policy, probs, labels)
        torch.testing.assert_close(rates, ref, rtol=0, atol=1e-13)
    hits = np.bincount(common.cta_bins(policy).ravel(), minlength=len(rates) + 1)[:-1]
    assert hits.max() >= (10 if collide else 2)
    assert (rates != 1).sum() > (10 if collide else 150)


def test_cta_rates_are_a_checkpointable_tensor():
    rates = common.cta_update(common.cta_rates(), common.cta_policy(common.cta_rates(), torch.Generator(), 8, True),
                              torch.full((8, 10), 0.1), torch.zeros(8, dtype=torch.int64))
    buffer = io.BytesIO()
    torch.save({"cta_rates": rates}, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True)["cta_rates"], rates)
    assert [len(r) for r in common.cta_rates_of(rates, "rescale")] == [17, 6] and rates.shape == (303,)
    assert common.cta_rates_of(rates, "identity") == []


# ----------------------------------------------------------------------------------------------------
# CTAugment in a training step: the views (AugmentPoolCTA) and the probe (cta/lib/train.py)
# ----------------------------------------------------------------------------------------------------
def test_cta_labeled_views_draw_the_probe_policy_then_the_training_policy(images):
    """The labeled batch as AugmentPoolCTA makes it from weak images: probe = the probe policy's ops, the training
    image = a training policy's ops, drawn in that order from the one generator."""
    rates = common.cta_rates()
    rates[::3] = 0.0  # a non-uniform sampler: training levels follow the rates
    x = images[:8]
    image, (probe, policy) = common.cta_labeled_views(x, rates, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    probe_policy = common.cta_policy(rates, g, 8, probe=True)
    train_policy = common.cta_policy(rates, g, 8)
    assert all(np.array_equal(policy[k], probe_policy[k]) for k in policy)
    assert torch.equal(probe, common.cta_augment(x, probe_policy))
    assert torch.equal(image, common.cta_augment(x, train_policy))
    assert image.shape == x.shape and image.dtype == x.dtype and not torch.equal(image, probe)


def test_cta_strong_augment_is_weak_then_a_policy_per_image_and_view(images):
    rates = common.cta_rates()
    x = images[:4]
    views = common.cta_strong_augment(x, rates, torch.Generator().manual_seed(2), views=3)
    g = torch.Generator().manual_seed(2)
    weak = common.weak_augment(x, g, views=3).flatten(0, 1)
    expected = common.cta_augment(weak, common.cta_policy(rates, g, 12)).unflatten(0, (3, 4))
    assert views.shape == (3, 4, 3, 32, 32) and torch.equal(views, expected)
    one = common.cta_strong_augment(x, rates, torch.Generator().manual_seed(2))  # no views: [B, ...]
    g = torch.Generator().manual_seed(2)
    weak = common.weak_augment(x, g)
    assert torch.equal(one, common.cta_augment(weak, common.cta_policy(rates, g, 4)))


@pytest.mark.parametrize("training", [True, False])
def test_cta_probe_moves_only_the_probed_bins_and_leaves_the_model_alone(images, training):
    """The probe: the model's eval-mode predictions on the probe images (no gradient, BatchNorm's running
    statistics untouched) give cta_update's rates; only the bins the probe policy used move, and the model's
    mode and state are as before."""
    torch.manual_seed(0)
    model = common.WideResNet(depth=10, widen_factor=1).train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rates = common.cta_rates()
    labels = torch.arange(8) % 10
    image, probe = common.cta_labeled_views(images[:8], rates, torch.Generator().manual_seed(1))
    new = common.cta_probe(model, probe, labels, rates, amp=False)
    assert model.training == training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not new.requires_grad
    with torch.no_grad():
        x = common.normalize(probe[0]).contiguous(memory_format=torch.channels_last)  # as evaluate's input
        probs = torch.softmax(model.eval()(x), dim=1)
    assert torch.equal(new, common.cta_update(rates, probe[1], probs, labels))
    used = np.unique(common.cta_bins(probe[1]))
    used = used[used < len(rates)]
    moved = torch.nonzero(new != rates).flatten().numpy()
    assert len(moved) > 0 and set(moved) <= set(used.tolist())
    assert torch.equal(rates, common.cta_rates())  # a new tensor: the caller decides where it goes


def test_cta_rates_tool_reads_the_final_rates_and_names_the_kept_bins(tmp_path):
    # tools/cta_rates.py (issue 35, part 4): the final rates of each finished CTA run, the bins still drawn.
    import json
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import cta_rates

    def run(name, augment, seed, step, rates=None):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "args.json").write_text(json.dumps({"augment": augment, "n_labeled": 40, "seed": seed,
                                                      "epochs": 1, "steps_per_epoch": 2}))
        (folder / "results.json").write_text(json.dumps({"algorithm": "remixmatch", "final_top1": 0.3}))
        torch.save({"step": step, **({"cta_rates": rates} if rates is not None else {})}, folder / "checkpoint.pt")

    rates = common.cta_rates()
    rotate = common.cta_rates_of(rates, "rotate")[0]
    rotate[10:] = 0.5  # (0.5 + 0.01) / 1.01 < 0.80 of the best bin: never drawn
    rotate[3] = 0.123456  # also dropped, and rounded to 4 decimals in the file
    run("remixmatch_n40_seed0", "ctaugment", 0, 2, rates)
    run("remixmatch_n40_seed1", "ctaugment", 1, 2, common.cta_rates())
    run("remixmatch_n40_seed2", "ctaugment", 2, 2, common.cta_rates())
    run("remixmatch_n40_seed3", "randaugment", 3, 2)  # not a CTA run: skipped
    rows = cta_rates.rows_from_runs(str(tmp_path / "runs"), "test")
    assert [(r["seed"], r["source"]) for r in rows] == [(0, "test"), (1, "test"), (2, "test")]
    assert rows[0]["rates"][int(common._CTA_START[common._CTA_PARAM[common.CTA_NAMES.index("rotate"), 0]]) + 3] \
        == 0.1235
    by_parameter = dict(zip(cta_rates.PARAMETERS, cta_rates.per_parameter(np.array(rows[0]["rates"]))))
    assert by_parameter[("rotate", 0)][10:].tolist() == [0.5] * 7 and by_parameter[("rescale", 1)].shape == (6,)
    assert cta_rates.bin_ranges(np.array([0, 1, 2, 4, 6, 7]), 17) == "0-2, 4, 6-7"
    # One seed of three drops rotate's bins 3 and 10-16: not most seeds, so every bin counts as kept ...
    lines = {line.split(" |")[0]: line for line in cta_rates.markdown(rows).splitlines()}
    assert lines["| rotate"] == f"| rotate | all 17; {(2 + (9 + 7 * 0.5 + 0.1235) / 17) / 3:.2f} |"
    # ... two of three do.
    rows[1]["rates"] = rows[0]["rates"]
    lines = {line.split(" |")[0]: line for line in cta_rates.markdown(rows).splitlines()}
    assert lines["| rotate"] == f"| rotate | 0-2, 4-9; {(1 + 2 * (9 + 7 * 0.5 + 0.1235) / 17) / 3:.2f} |"
    assert lines["| rescale (filter)"] == "| rescale (filter) | all 6; 1.00 |"
    cta_rates.plot(rows, str(tmp_path / "rates.png"))
    assert (tmp_path / "rates.png").stat().st_size > 0
    run("remixmatch_n250_seed0", "ctaugment", 0, 1, common.cta_rates())  # its checkpoint is not the last step's
    with pytest.raises(SystemExit, match="not the last step"):
        cta_rates.rows_from_runs(str(tmp_path / "runs"), "test")
