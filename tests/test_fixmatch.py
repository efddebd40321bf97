"""FixMatch's functions and the shared recipe (cosine schedule, weight-decay groups, EMA) on hand-computed
tensors."""

import argparse
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fixmatch  # noqa: E402


def test_pseudo_labels_hand_computed():
    # softmax([2, 0, 0]) = [e^2, 1, 1] / (e^2 + 2) -> max 0.7870; softmax([0, 0, 0]) max 1/3 (tie: class 0);
    # softmax([0, 3, 0]) max e^3 / (e^3 + 2) = 0.9094.
    logits = torch.tensor([[2.0, 0, 0], [0, 0, 0], [0, 3.0, 0]], requires_grad=True)
    labels, mask = fixmatch.pseudo_labels(logits, threshold=0.78)
    assert labels.tolist() == [0, 0, 1]
    assert mask.tolist() == [1.0, 0.0, 1.0]
    assert not mask.requires_grad  # no gradient through the pseudo-labels
    _, mask = fixmatch.pseudo_labels(logits, threshold=0.79)  # just above e^2 / (e^2 + 2) = 0.78699
    assert mask.tolist() == [0.0, 0.0, 1.0]


def test_pseudo_labels_threshold_is_inclusive():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert fixmatch.pseudo_labels(logits, threshold=0.5)[1].item() == 1.0


def test_unlabeled_loss_hand_computed():
    # Two classes, equal logits: H = ln 2 for either label. Logits [ln 3, 0] for label 0: H = ln(4/3).
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]])
    labels = torch.tensor([1, 0, 1])
    mask = torch.tensor([1.0, 1.0, 0.0])
    expected = (math.log(2) + math.log(4 / 3) + 0) / 3  # averaged over all 3 images, masked one included
    assert fixmatch.fixmatch_unlabeled_loss(logits, labels, mask).item() == pytest.approx(expected, rel=1e-6)


def test_unlabeled_loss_none_and_all_masked():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    labels = torch.tensor([0, 0])
    assert fixmatch.fixmatch_unlabeled_loss(logits, labels, torch.zeros(2)).item() == 0.0
    all_masked = fixmatch.fixmatch_unlabeled_loss(logits, labels, torch.ones(2)).item()
    assert all_masked == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-6)


def test_unlabeled_loss_gradient_flows_to_strong_logits_only_where_masked():
    logits = torch.zeros(2, 3, requires_grad=True)
    fixmatch.fixmatch_unlabeled_loss(logits, torch.tensor([0, 1]), torch.tensor([1.0, 0.0])).backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    # d/dz of H(0, softmax(z)) / 2 at z = 0: (softmax - onehot) / 2 = ([1/3, 1/3, 1/3] - [1, 0, 0]) / 2
    assert torch.allclose(logits.grad[0], torch.tensor([-1 / 3, 1 / 6, 1 / 6]))


def test_cosine_lr():
    assert fixmatch.cosine_lr(0, 1000, 0.03) == 0.03
    assert fixmatch.cosine_lr(500, 1000, 0.03) == pytest.approx(0.03 * math.cos(7 * math.pi / 32))
    assert fixmatch.cosine_lr(1000, 1000, 0.03) == pytest.approx(0.03 * 0.19509, rel=1e-4)  # cos(7 pi / 16)


def test_weight_decay_only_on_conv_and_linear_weights():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    args = argparse.Namespace(weight_decay=5e-4, lr=0.03)
    opt = fixmatch.make_optimizer(model, args, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_ema_update_hand_computed():
    model = torch.nn.BatchNorm1d(2)
    ema = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 3.0]))
        ema.weight.copy_(torch.tensor([0.0, 1.0]))
        model.running_mean.copy_(torch.tensor([5.0, 6.0]))
    model.num_batches_tracked.fill_(7)
    fixmatch.ema_update(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, torch.tensor([0.1, 1.2]))  # 0.9 * ema + 0.1 * model
    assert torch.equal(ema.running_mean, torch.tensor([5.0, 6.0]))  # BatchNorm statistics are copied
    assert ema.num_batches_tracked.item() == 7


def test_summarize_pseudo_label_accuracy_over_confident_images():
    # Two steps: mask rates 0.5 and 0.25, confident-and-correct rates 0.25 and 0.25 -> 0.25 / 0.375. Every true
    # label is known (the last two entries: the known rate 1, and the masked known rate, the mask rate).
    names = ["loss", "loss_x", "loss_u", "mask_rate", "masked_correct_rate", "pseudo_acc", "known_rate",
             "masked_known_rate"]
    stats = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.25, 0.6, 1, 0.5], [3.0, 1.5, 1.5, 0.25, 0.25, 0.8, 1, 0.25]]).sum(0)
    mean = fixmatch.summarize(names, stats, 2)
    assert mean["mask_rate"] == pytest.approx(0.375) and mean["pseudo_acc_masked"] == pytest.approx(0.25 / 0.375)
    assert mean["loss"] == pytest.approx(2.0) and "masked_correct_rate" not in mean
    assert mean["pseudo_acc"] == pytest.approx(0.7) and "known_rate" not in mean and "masked_known_rate" not in mean
    assert fixmatch.summarize(names, torch.tensor([1.0, 1, 0, 0, 0, 0.5, 1, 0]), 1)["pseudo_acc_masked"] is None
    assert list(mean) == ["loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc", "pseudo_acc_masked"]


def test_pseudo_label_stats_hand_computed():
    # Pseudo-labels 0, 1, 2, 2 with mask 1, 1, 0, 1; true labels 0, 2, 2, -1 (the last one unknown).
    stats = fixmatch.pseudo_label_stats(torch.tensor([0, 1, 2, 2]), torch.tensor([1.0, 1, 0, 1]),
                                        torch.tensor([0, 2, 2, -1]))
    assert list(stats) == ["masked_correct_rate", "pseudo_acc", "known_rate", "masked_known_rate"]
    assert [v.item() for v in stats.values()] == [0.25, 0.5, 0.75, 0.5]
