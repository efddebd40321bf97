"""SoftMatch's pieces on hand-computed tensors: the running mean of the predictions (started by the first
batch), uniform alignment, the EMA of the Gaussian's mean and variance, the truncated-Gaussian weight; each
against a transcription of USB's DistAlignEMAHook and SoftMatchWeightingHook over a run of random batches; and
one training step wired from them."""

import argparse
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from softmatch import (fixmatch_unlabeled_loss, train_step, truncated_gaussian_weight, uniform_alignment,  # noqa: E402
                       update_gaussian, update_prob_mean)
from test_flexmatch import FixedLogits, labels  # noqa: E402


def test_update_prob_mean_starts_from_the_first_batch_then_is_an_ema():
    probs = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
    first = update_prob_mean(torch.zeros(2), probs, decay=0.9)
    assert first.tolist() == pytest.approx([0.4, 0.6])  # zeros: no batch yet
    second = update_prob_mean(first, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), decay=0.9)
    assert second.tolist() == pytest.approx([0.9 * 0.4 + 0.1, 0.9 * 0.6])


def test_uniform_alignment_divides_by_the_running_mean_and_renormalises():
    aligned = uniform_alignment(torch.tensor([[0.6, 0.4]]), torch.tensor([0.8, 0.2]))
    # 0.6 * 0.5 / 0.8 = 0.375 and 0.4 * 0.5 / 0.2 = 1.0 -> [0.375, 1.0] / 1.375 (the 1e-6 terms aside)
    assert aligned.tolist()[0] == pytest.approx([0.375 / 1.375, 1 / 1.375], abs=1e-5)
    assert uniform_alignment(torch.tensor([[0.6, 0.4]]), torch.tensor([0.5, 0.5])).tolist()[0] == pytest.approx(
        [0.6, 0.4])  # a uniform running mean changes nothing


def test_update_gaussian_is_one_ema_step_of_the_mean_and_the_unbiased_variance():
    mu, var = update_gaussian(torch.tensor(0.1), torch.tensor(1.0), torch.tensor([0.2, 0.4, 0.9]), decay=0.9)
    # mean 0.5; unbiased variance (0.09 + 0.01 + 0.16) / 2 = 0.13
    assert mu.item() == pytest.approx(0.9 * 0.1 + 0.1 * 0.5)
    assert var.item() == pytest.approx(0.9 * 1.0 + 0.1 * 0.13)


def test_truncated_gaussian_weight_by_hand():
    confidence = torch.tensor([0.3, 0.4, 0.5, 0.9])
    # mu = 0.5, sigma2 = 0.04, n_sigma = 2: the Gaussian's variance is 0.01. 0.3 is 0.2 below: exp(-0.04 / 0.02);
    # 0.4 is 0.1 below: exp(-0.01 / 0.02); at or above the mean: lambda_max.
    weights = truncated_gaussian_weight(confidence, torch.tensor(0.5), torch.tensor(0.04), n_sigma=2)
    assert weights.tolist() == pytest.approx([math.exp(-2), math.exp(-0.5), 1, 1])
    half = truncated_gaussian_weight(confidence, torch.tensor(0.5), torch.tensor(0.04), n_sigma=1, lambda_max=0.5)
    assert half.tolist() == pytest.approx([0.5 * math.exp(-0.5), 0.5 * math.exp(-0.125), 0.5, 0.5])


def test_soft_unlabeled_loss_weighs_each_image():
    logits = torch.zeros(2, 4)  # H = log 4 for any label
    loss = fixmatch_unlabeled_loss(logits, labels(0, 3), torch.tensor([1.0, 0.25]))
    assert loss.item() == pytest.approx((1 + 0.25) * math.log(4) / 2)


# ---- A transcription of USB's SoftMatch (semilearn/algorithms/hooks/dist_align.py DistAlignEMAHook with a uniform
# target, and semilearn/algorithms/softmatch/utils.py SoftMatchWeightingHook, per_class False), as written there.
def usb_dist_align(state: dict, probs: torch.Tensor, m: float) -> torch.Tensor:
    p_target = torch.ones(probs.shape[1]) / probs.shape[1]
    if state["p_model"] is None:
        state["p_model"] = torch.mean(probs, dim=0)
    else:
        state["p_model"] = state["p_model"] * m + torch.mean(probs, dim=0) * (1 - m)
    aligned = probs * (p_target + 1e-6) / (state["p_model"] + 1e-6)
    return aligned / aligned.sum(dim=-1, keepdim=True)


def usb_masking(state: dict, probs: torch.Tensor, m: float, n_sigma: int = 2) -> torch.Tensor:
    max_probs, _ = probs.max(dim=-1)
    state["mu"] = m * state["mu"] + (1 - m) * torch.mean(max_probs).item()
    state["var"] = m * state["var"] + (1 - m) * torch.var(max_probs, unbiased=True).item()
    return torch.exp(-((torch.clamp(max_probs - state["mu"], max=0.0) ** 2) / (2 * state["var"] / (n_sigma ** 2))))


def test_alignment_and_weights_match_usb_over_a_run_of_random_batches():
    gen, c, m = torch.Generator().manual_seed(0), 10, 0.9
    usb = {"p_model": None, "mu": torch.tensor(1 / c), "var": torch.tensor(1.0)}
    prob_mean, mu, var = torch.zeros(c), torch.tensor(1 / c), torch.tensor(1.0)
    weights_seen = []
    for step in range(30):
        logits_w = torch.randn(32, c, generator=gen) * (1 + step / 5) + torch.linspace(2, 0, c)
        probs = torch.softmax(logits_w, dim=1)
        usb_weights = usb_masking(usb, usb_dist_align(usb, probs, m), m)
        prob_mean = update_prob_mean(prob_mean, probs, m)
        confidence = uniform_alignment(probs, prob_mean).max(dim=1).values
        mu, var = update_gaussian(mu, var, confidence, m)
        weights = truncated_gaussian_weight(confidence, mu, var, n_sigma=2)
        torch.testing.assert_close([prob_mean, mu, var, weights], [usb["p_model"], usb["mu"], usb["var"], usb_weights])
        weights_seen.append(weights)
    weights = torch.cat(weights_seen)
    assert weights.min() < 0.5 and (weights == 1).any()  # the comparison saw both sides of the truncation


def test_train_step_updates_the_state_before_it_weighs_the_batch():
    # 2 classes stand in for C; m = 0.5. E[q] starts at zeros, so the batch mean [0.5, 0.5] starts it and the
    # alignment changes nothing.
    adaptive = {"prob_mean": torch.zeros(2), "mu": torch.tensor(0.5), "var": torch.tensor(1.0)}
    weak = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.1, 0.9]])  # mean [0.5, 0.5]
    b = 2
    logits = torch.cat([torch.zeros(b, 2), weak.log(), torch.zeros(4, 2)])  # strong-view logits all 0: H = log 2
    model = FixedLogits(logits)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(gaussian_decay=0.5, n_sigma=2.0, uniform_alignment=True, lambda_u=1.0)
    image = lambda n: torch.zeros(n, 3, 2, 2, dtype=torch.uint8)  # noqa: E731 (the stand-in ignores the pixels)
    stats, pseudo, weights = train_step(model, optimizer, image(b), labels(0, 1), image(4), image(4), adaptive, args,
                                        amp=False)
    assert list(stats) == ["loss", "loss_x", "loss_u", "mask_rate", "mu", "sigma"]
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())
    # Confidences 0.9, 0.6, 0.6, 0.9: mean 0.75, unbiased variance 4 * 0.0225 / 3 = 0.03.
    mu, var = 0.5 * 0.5 + 0.5 * 0.75, 0.5 * 1.0 + 0.5 * 0.03
    assert adaptive["prob_mean"].tolist() == pytest.approx([0.5, 0.5])
    assert [adaptive["mu"].item(), adaptive["var"].item()] == pytest.approx([mu, var])
    assert pseudo.tolist() == [0, 1, 0, 1]
    below = math.exp(-(0.6 - mu) ** 2 / (2 * var / 4))
    assert weights.tolist() == pytest.approx([1, below, below, 1])
    loss, loss_x, loss_u, mask_rate, mu_stat, sigma = (v.item() for v in stats.values())
    assert [mu_stat, sigma] == pytest.approx([mu, math.sqrt(var)])
    assert mask_rate == pytest.approx((2 + 2 * below) / 4)
    assert loss_u == pytest.approx(mask_rate * math.log(2), abs=1e-6)
    assert loss == pytest.approx(loss_x + loss_u, abs=1e-6)


def test_train_step_without_uniform_alignment_leaves_the_running_mean_alone():
    adaptive = {"prob_mean": torch.zeros(2), "mu": torch.tensor(0.5), "var": torch.tensor(1.0)}
    weak = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    model = FixedLogits(torch.cat([torch.zeros(1, 2), weak.log(), torch.zeros(2, 2)]))
    args = argparse.Namespace(gaussian_decay=0.5, n_sigma=2.0, uniform_alignment=False, lambda_u=1.0)
    image = lambda n: torch.zeros(n, 3, 2, 2, dtype=torch.uint8)  # noqa: E731
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), image(1), labels(0), image(2), image(2), adaptive,
               args, amp=False)
    assert not adaptive["prob_mean"].any()
    assert adaptive["mu"].item() == pytest.approx(0.5 * 0.5 + 0.5 * 0.8)  # the raw confidences 0.9 and 0.7
