"""FlexMatch's pieces on hand-computed tensors: the learning effect, the class thresholds (with and without
threshold warm-up, both mappings, the all-unused start), the mask against each image's predicted class, the
update of selected_label (repeated indices included), and one training step wired from them."""

import argparse
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flexmatch import (class_thresholds, flexmatch_mask, learning_effect, pseudo_label_stats, train_step,  # noqa: E402
                       update_selected_label)


def labels(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_learning_effect_counts_every_image_and_the_unused_ones():
    sigma, unused = learning_effect(labels(-1, 0, 0, 2, -1, -1, 1, 0), num_classes=4)
    assert sigma.tolist() == [3, 1, 1, 0]  # class 3 was never selected
    assert unused.item() == 3


# 12 unlabeled images, 3 classes: sigma = [4, 2, 0] and 6 unused images (more than max sigma = 4).
UNUSED_DOMINATES = labels(0, 0, 0, 0, 1, 1, -1, -1, -1, -1, -1, -1)


@pytest.mark.parametrize("warmup, mapping, expected", [
    # warm-up: beta = sigma / max(4, 6) = [2/3, 1/3, 0]
    (True, "convex", [0.9 * (2 / 3) / (2 - 2 / 3), 0.9 * (1 / 3) / (2 - 1 / 3), 0.0]),  # = [0.45, 0.18, 0]
    (True, "linear", [0.9 * 2 / 3, 0.9 * 1 / 3, 0.0]),                                   # = [0.6, 0.3, 0]
    # no warm-up: beta = sigma / 4 = [1, 1/2, 0]
    (False, "convex", [0.9, 0.9 * 0.5 / 1.5, 0.0]),                                      # = [0.9, 0.3, 0]
    (False, "linear", [0.9, 0.45, 0.0]),
])
def test_class_thresholds_hand_computed(warmup, mapping, expected):
    t = class_thresholds(UNUSED_DOMINATES, 3, tau=0.9, warmup=warmup, mapping=mapping)
    assert t.dtype == torch.float32 and t.shape == (3,)
    assert t.tolist() == pytest.approx(expected, abs=1e-6)
    if (warmup, mapping) == (True, "convex"):
        assert t.tolist() == pytest.approx([0.45, 0.18, 0.0], abs=1e-6)


def test_warmup_changes_nothing_once_a_class_outnumbers_the_unused_images():
    # sigma = [6, 3, 0], 3 unused: max(max sigma, unused) = max sigma, so beta = [1, 1/2, 0] either way.
    selected = labels(0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1, -1)
    for mapping, expected in (("convex", [0.95, 0.95 / 3, 0.0]), ("linear", [0.95, 0.475, 0.0])):
        with_warmup = class_thresholds(selected, 3, 0.95, warmup=True, mapping=mapping)
        without = class_thresholds(selected, 3, 0.95, warmup=False, mapping=mapping)
        assert with_warmup.tolist() == pytest.approx(expected, abs=1e-6)
        assert without.tolist() == pytest.approx(expected, abs=1e-6)


def test_unused_count_is_over_the_whole_unlabeled_set():
    # The same selected images, once among 6 images and once among 1000: only the warm-up denominator moves.
    few = class_thresholds(labels(0, 0, 1, -1, -1, -1), 2, 0.95, warmup=True, mapping="linear")
    many = class_thresholds(torch.cat([labels(0, 0, 1), torch.full((997,), -1)]), 2, 0.95, warmup=True,
                            mapping="linear")
    assert few.tolist() == pytest.approx([0.95 * 2 / 3, 0.95 / 3], abs=1e-6)
    assert many.tolist() == pytest.approx([0.95 * 2 / 997, 0.95 / 997], abs=1e-6)


@pytest.mark.parametrize("mapping", ["convex", "linear"])
def test_all_unused_start_gives_zero_thresholds_and_a_full_mask(mapping):
    """Warm-up, every image unused: beta = 0 / N = 0 and M(0) = 0, so every pseudo-label is used."""
    selected = torch.full((50000,), -1, dtype=torch.int64)
    t = class_thresholds(selected, 10, 0.95, warmup=True, mapping=mapping)
    assert t.tolist() == [0.0] * 10
    confidence = torch.tensor([0.1, 0.11, 0.5, 0.99])
    assert flexmatch_mask(confidence, labels(0, 3, 9, 5), t).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_no_warmup_with_nothing_selected_is_zero_not_nan():
    """Without warm-up beta = sigma / max sigma, which is 0 / 0 at the start: defined as 0."""
    t = class_thresholds(torch.full((20,), -1, dtype=torch.int64), 10, 0.95, warmup=False, mapping="convex")
    assert not t.isnan().any() and t.tolist() == [0.0] * 10


def test_one_selected_class_without_warmup_gets_the_full_threshold():
    # A single confident image: without warm-up its class jumps to beta = 1, T = tau; with warm-up it barely moves.
    selected = torch.cat([labels(4), torch.full((99,), -1)])
    assert class_thresholds(selected, 10, 0.95, warmup=False)[4].item() == pytest.approx(0.95)
    assert class_thresholds(selected, 10, 0.95, warmup=True)[4].item() == pytest.approx(0.95 * (1 / 99) / (2 - 1 / 99))


def test_unknown_mapping_is_an_error():
    with pytest.raises(ValueError, match="mapping"):
        class_thresholds(labels(0, 1), 2, 0.95, mapping="concave")


def test_mask_uses_the_threshold_of_each_images_predicted_class():
    thresholds = torch.tensor([0.9, 0.1, 0.5])
    confidence = torch.tensor([0.5, 0.5, 0.5, 0.95, 0.1, 0.49])
    predicted = labels(0, 1, 2, 0, 1, 2)
    # 0.5 < T(0) = 0.9; 0.5 >= T(1) = 0.1; 0.5 >= T(2) = 0.5 (ties pass); 0.95 >= 0.9; 0.1 >= 0.1; 0.49 < 0.5
    assert flexmatch_mask(confidence, predicted, thresholds).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_update_selected_label_changes_only_confident_images():
    selected = labels(-1, 3, -1, 0, 2)
    before = selected.clone()
    idx = labels(0, 1, 4, 2)
    confidence = torch.tensor([0.96, 0.5, 0.99, 0.9499])
    predicted = labels(1, 2, 3, 1)
    new = update_selected_label(selected, idx, confidence, predicted, tau=0.95)
    # image 0: -1 -> 1 (confident); image 1 keeps 3 (0.5 < tau); image 4: 2 -> 3 (a newer confident
    # prediction replaces an older one); image 2 stays -1 (0.9499 < tau); image 3 is not in the batch.
    assert new.tolist() == [1, 3, -1, 0, 3]
    assert torch.equal(selected, before)  # a pure function: the input is left as it is
    assert new.dtype == torch.int64 and new.shape == selected.shape


def test_update_selected_label_with_repeated_indices_keeps_the_last_confident_occurrence():
    """As if the batch were written in order: for each image the last confident occurrence wins, and an
    unconfident occurrence after it changes nothing."""
    selected = torch.full((4,), -1, dtype=torch.int64)
    idx = labels(2, 0, 2, 2, 0, 1)
    confidence = torch.tensor([0.99, 0.97, 0.98, 0.10, 0.20, 0.30])
    predicted = labels(1, 2, 3, 0, 1, 2)
    # image 2: positions 0 (confident, 1), 2 (confident, 3), 3 (not confident, 0) -> 3
    # image 0: positions 1 (confident, 2), 4 (not confident, 1)                     -> 2
    # image 1: position 5 (not confident) -> stays -1; image 3 is not in the batch  -> stays -1
    expected = [2, -1, 3, -1]
    assert update_selected_label(selected, idx, confidence, predicted, tau=0.95).tolist() == expected
    # The same batch written the slow, obviously sequential way.
    sequential = selected.clone()
    for i, c, p in zip(idx.tolist(), confidence.tolist(), predicted.tolist()):
        if c >= 0.95:
            sequential[i] = p
    assert sequential.tolist() == expected


def test_update_selected_label_with_nothing_confident_is_the_identity():
    selected = labels(0, -1, 2)
    new = update_selected_label(selected, labels(0, 1, 2, 1), torch.full((4,), 0.5), labels(1, 1, 1, 1), tau=0.95)
    assert new.tolist() == [0, -1, 2]


class FixedLogits(torch.nn.Module):
    """A stand-in network: the same logits for every call, plus a trainable bias so the optimizer has work."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.bias = torch.nn.Parameter(torch.zeros(logits.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == self.logits.shape[0]
        return self.logits + self.bias


def test_train_step_uses_thresholds_from_before_the_step_then_updates_selected_label():
    # 8 unlabeled images; the network predicts only classes 0..2 here: sigma = [3, 1, 0, ...], 4 unused
    # -> warm-up beta = [3/4, 1/4, 0, ...] -> convex T = 0.9 * [0.6, 1/7, 0, ...] = [0.54, 0.128571, 0, ...].
    selected = labels(0, 0, 0, 1, -1, -1, -1, -1)
    idx_u = labels(4, 5, 3)
    weak = torch.tensor([[0.25, 0.5, 0.25],     # image 4: class 1 at 0.5  >= T(1) = 0.129 -> used; < tau: stays -1
                         [0.5, 0.25, 0.25],     # image 5: class 0 at 0.5  <  T(0) = 0.54  -> not used
                         [0.025, 0.025, 0.95]])  # image 3: class 2 at 0.95 >= T(2) = 0      -> used; >= tau: 1 -> 2
    b = 2
    logits = torch.cat([torch.zeros(b, 3), weak.log(), torch.zeros(3, 3)])  # strong-view logits all 0: H = log 3
    model = FixedLogits(logits)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(threshold=0.9, threshold_warmup=True, mapping="convex", lambda_u=1.0)
    image = lambda n: torch.zeros(n, 3, 2, 2, dtype=torch.uint8)  # noqa: E731 (the stand-in ignores the pixels)
    stats, pseudo, mask = train_step(model, optimizer, image(b), labels(0, 1), image(3), image(3), idx_u, selected,
                                     args, amp=False)
    assert list(stats) == ["loss", "loss_x", "loss_u", "mask_rate", "threshold_min", "threshold_mean",
                           "threshold_max", "unused_fraction"]
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())
    assert pseudo.tolist() == [1, 0, 2] and mask.tolist() == [1, 0, 1]
    loss, loss_x, loss_u, mask_rate, t_min, t_mean, t_max, unused = (v.item() for v in stats.values())
    # The accuracy diagnostic, outside the step, with the true labels 1, 2, 2.
    masked_correct, pseudo_acc, known, masked_known = (
        v.item() for v in pseudo_label_stats(pseudo, mask, labels(1, 2, 2)).values())
    assert known == 1 and masked_known == pytest.approx(mask_rate)  # every true label is known here
    assert selected.tolist() == [0, 0, 0, 2, -1, -1, -1, -1]  # updated in place, after the loss
    assert mask_rate == pytest.approx(2 / 3)
    assert loss_x == pytest.approx(math.log(3), abs=1e-5)
    assert loss_u == pytest.approx(2 * math.log(3) / 3, abs=1e-5)  # mean over the whole unlabeled batch
    assert loss == pytest.approx(loss_x + loss_u, abs=1e-5)
    assert pseudo_acc == pytest.approx(2 / 3) and masked_correct == pytest.approx(2 / 3)  # true labels 1, 2, 2
    # train_step thresholds CIFAR-10's 10 classes: classes 2..9 were never selected, so T = 0 for them.
    assert [t_min, t_mean, t_max] == pytest.approx([0.0, (0.54 + 0.9 / 7) / 10, 0.54], abs=1e-6)
    assert unused == pytest.approx(0.5)  # 4 of all 8 images, before the step (the batch holds 2 unused)
