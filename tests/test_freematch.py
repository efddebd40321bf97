"""FreeMatch's pieces on hand-computed tensors: the EMA update of tau_t, p~_t and h~_t, the class thresholds
MaxNorm(p~_t) * tau_t, the mask against each image's predicted class, the self-adaptive fairness loss; each
against a transcription of USB's FreeMatchThresholingHook and entropy_loss over a run of random batches; and
one training step wired from them."""

import argparse
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freematch import (class_thresholds, fairness_loss, freematch_mask, self_adaptive_update,  # noqa: E402
                       train_step)
from test_flexmatch import FixedLogits, labels  # noqa: E402


def test_self_adaptive_update_is_one_ema_step_of_mean_confidence_mean_probabilities_and_histogram():
    third = torch.full((3,), 1 / 3)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    tau, p_tilde, h_tilde = self_adaptive_update(torch.tensor(0.1), third, third, probs, decay=0.9)
    assert tau.item() == pytest.approx(0.9 * 0.1 + 0.1 * (0.7 + 0.5) / 2)  # 0.15
    assert p_tilde.tolist() == pytest.approx([0.3 + 0.1 * 0.45, 0.3 + 0.1 * 0.35, 0.3 + 0.1 * 0.2])
    assert h_tilde.tolist() == pytest.approx([0.3 + 0.1 * 0.5, 0.3 + 0.1 * 0.5, 0.3])  # argmax: classes 0 and 1
    assert torch.equal(third, torch.full((3,), 1 / 3))  # a pure function: the inputs are left as they are


def test_class_thresholds_scale_tau_by_the_max_normalised_local_estimate():
    thresholds = class_thresholds(torch.tensor(0.8), torch.tensor([0.2, 0.5, 0.3]))
    assert thresholds.tolist() == pytest.approx([0.8 * 0.4, 0.8, 0.8 * 0.6])


def test_class_thresholds_at_the_start_are_one_over_c_for_every_class():
    c = 10
    thresholds = class_thresholds(torch.tensor(1 / c), torch.full((c,), 1 / c))
    assert thresholds.tolist() == pytest.approx([1 / c] * c)


def test_freematch_mask_compares_each_image_with_its_own_class_threshold():
    thresholds = torch.tensor([0.32, 0.8, 0.48])
    confidence = torch.tensor([0.32, 0.79, 0.81, 0.5, 0.47])
    predicted = labels(0, 1, 1, 2, 2)
    # 0.32 >= 0.32 (ties pass); 0.79 < 0.8; 0.81 >= 0.8; 0.5 >= 0.48; 0.47 < 0.48
    assert freematch_mask(confidence, predicted, thresholds).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


STRONG = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.25, 0.25]])


def test_fairness_loss_by_hand():
    # Masked in: images 0 and 1. p-bar = [0.4, 0.5, 0.1]; their argmax 0 and 1: h-bar = [0.5, 0.5, 0].
    # p-bar / h-bar with 1/0 -> 0: [0.8, 1.0, 0] -> SumNorm [4/9, 5/9, 0].
    # p~ / h~ = [0.5, 0.3, 0.2] / [0.5, 0.25, 0.25] = [1, 1.2, 0.8] -> SumNorm [1/3, 0.4, 0.8/3].
    loss = fairness_loss(STRONG.log(), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.5, 0.3, 0.2]),
                         torch.tensor([0.5, 0.25, 0.25]))
    expected = 1 / 3 * math.log(4 / 9 + 1e-12) + 0.4 * math.log(5 / 9 + 1e-12) + 0.8 / 3 * math.log(1e-12)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_fairness_loss_is_zero_with_a_finite_gradient_when_no_image_is_masked_in():
    logits = STRONG.log().requires_grad_()
    loss = fairness_loss(logits, torch.zeros(3), torch.full((3,), 1 / 3), torch.full((3,), 1 / 3))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all() and not logits.grad.any()


def test_fairness_loss_gradient_flows_through_the_strong_probabilities_only():
    logits = STRONG.log().requires_grad_()
    p_tilde, h_tilde = torch.tensor([0.5, 0.3, 0.2], requires_grad=True), torch.tensor([0.5, 0.25, 0.25])
    fairness_loss(logits, torch.tensor([1.0, 1.0, 0.0]), p_tilde, h_tilde).backward()
    assert p_tilde.grad is None  # the target is a constant
    assert logits.grad[:2].abs().sum() > 0 and not logits.grad[2].any()  # the unmasked image has no say


# ---- A transcription of USB's FreeMatch (semilearn/algorithms/freematch: FreeMatchThresholingHook.update and
# .masking, entropy_loss), written the way it is written there: boolean selection, bincount, 1/x with inf -> 0.
def usb_update_and_mask(state: dict, probs: torch.Tensor, m: float) -> torch.Tensor:
    max_probs, max_idx = torch.max(probs, dim=-1, keepdim=True)
    state["time_p"] = state["time_p"] * m + (1 - m) * max_probs.mean()
    state["p_model"] = state["p_model"] * m + (1 - m) * probs.mean(dim=0)
    hist = torch.bincount(max_idx.reshape(-1), minlength=state["p_model"].shape[0]).to(state["p_model"].dtype)
    state["label_hist"] = state["label_hist"] * m + (1 - m) * (hist / hist.sum())
    max_probs, max_idx = probs.max(dim=-1)
    mod = state["p_model"] / torch.max(state["p_model"], dim=-1)[0]
    return max_probs.ge(state["time_p"] * mod[max_idx]).to(max_probs.dtype)


def usb_entropy_loss(mask, logits_s, prob_model, label_hist):
    def replace_inf_to_zero(val):
        val[val == float("inf")] = 0.0
        return val
    logits_s = logits_s[mask.bool()]
    prob_s = logits_s.softmax(dim=-1)
    _, pred_label_s = torch.max(prob_s, dim=-1)
    hist_s = torch.bincount(pred_label_s, minlength=logits_s.shape[1]).to(logits_s.dtype)
    hist_s = hist_s / hist_s.sum()
    prob_model, label_hist = prob_model.reshape(1, -1), label_hist.reshape(1, -1)
    mod_prob_model = prob_model * replace_inf_to_zero(1 / label_hist)
    mod_prob_model = mod_prob_model / mod_prob_model.sum(dim=-1, keepdim=True)
    mod_mean_prob_s = prob_s.mean(dim=0, keepdim=True) * replace_inf_to_zero(1 / hist_s)
    mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum(dim=-1, keepdim=True)
    return (mod_prob_model * torch.log(mod_mean_prob_s + 1e-12)).sum(dim=1).mean()


def test_thresholds_mask_and_fairness_loss_match_usb_over_a_run_of_random_batches():
    gen, c, m = torch.Generator().manual_seed(0), 10, 0.9  # a fast decay, so that the state moves a lot
    usb = {"time_p": torch.tensor(1 / c), "p_model": torch.full((c,), 1 / c), "label_hist": torch.full((c,), 1 / c)}
    tau, p_tilde, h_tilde = torch.tensor(1 / c), torch.full((c,), 1 / c), torch.full((c,), 1 / c)
    masked_in = []
    for step in range(30):
        # Sharper and sharper predictions, skewed towards the low classes: thresholds rise and differ by class.
        logits_w = torch.randn(32, c, generator=gen) * (1 + step / 5) + torch.linspace(2, 0, c)
        logits_s = torch.randn(32, c, generator=gen) * 3
        probs = torch.softmax(logits_w, dim=1)
        usb_mask = usb_update_and_mask(usb, probs, m)
        tau, p_tilde, h_tilde = self_adaptive_update(tau, p_tilde, h_tilde, probs, m)
        confidence, predicted = probs.max(dim=1)
        mask = freematch_mask(confidence, predicted, class_thresholds(tau, p_tilde))
        assert torch.equal(mask, usb_mask), step
        torch.testing.assert_close([tau, p_tilde, h_tilde], [usb["time_p"], usb["p_model"], usb["label_hist"]])
        if mask.sum() > 0:
            torch.testing.assert_close(fairness_loss(logits_s, mask, p_tilde, h_tilde),
                                       usb_entropy_loss(mask, logits_s, usb["p_model"], usb["label_hist"]))
        masked_in.append(mask.mean().item())
    assert 0 < min(masked_in) < 1 and max(masked_in) > 0  # the comparison saw partial masks


def test_train_step_updates_the_thresholds_before_they_mask_the_batch():
    # 3 classes stand in for C; the state starts at 1/3 with lam = 0.5, so one step moves it halfway.
    third = torch.full((3,), 1 / 3)
    adaptive = {"tau": torch.tensor(1 / 3), "p_tilde": third.clone(), "h_tilde": third.clone()}
    weak = torch.tensor([[0.8, 0.1, 0.1],    # class 0 at 0.8
                         [0.3, 0.4, 0.3],    # class 1 at 0.4
                         [0.2, 0.2, 0.6]])   # class 2 at 0.6
    # tau = (1/3 + 0.6) / 2 = 0.4667; p~ = (1/3 + [0.4333, 0.2333, 0.3333]) / 2 = [0.3833, 0.2833, 0.3333];
    # thresholds = p~ / 0.3833 * 0.4667 = [0.4667, 0.3449, 0.4058]: images 0 and 2 pass, image 1 (0.4) does too.
    b = 2
    logits = torch.cat([torch.zeros(b, 3), weak.log(), torch.zeros(3, 3)])  # strong-view logits all 0: H = log 3
    model = FixedLogits(logits)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(threshold_decay=0.5, lambda_u=1.0, lambda_f=0.5)
    image = lambda n: torch.zeros(n, 3, 2, 2, dtype=torch.uint8)  # noqa: E731 (the stand-in ignores the pixels)
    stats, pseudo, mask = train_step(model, optimizer, image(b), labels(0, 1), image(3), image(3), adaptive, args,
                                     amp=False)
    assert list(stats) == ["loss", "loss_x", "loss_u", "loss_f", "mask_rate", "tau", "threshold_min",
                           "threshold_max"]
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())
    tau = (1 / 3 + 0.6) / 2
    p_tilde = [(1 / 3 + 1.3 / 3) / 2, (1 / 3 + 0.7 / 3) / 2, (1 / 3 + 1 / 3) / 2]
    assert adaptive["tau"].item() == pytest.approx(tau)
    assert adaptive["p_tilde"].tolist() == pytest.approx(p_tilde)
    assert adaptive["h_tilde"].tolist() == pytest.approx([(1 / 3 + 1 / 3) / 2] * 3)  # one image per class
    assert pseudo.tolist() == [0, 1, 2] and mask.tolist() == [1, 1, 1]
    loss, loss_x, loss_u, loss_f, mask_rate, tau_stat, t_min, t_max = (v.item() for v in stats.values())
    assert tau_stat == pytest.approx(tau) and t_max == pytest.approx(tau)
    assert t_min == pytest.approx(p_tilde[1] / p_tilde[0] * tau)
    assert loss_x == pytest.approx(math.log(3), abs=1e-5) and loss_u == pytest.approx(math.log(3), abs=1e-5)
    # Strong views all uniform: p-bar uniform, every argmax is class 0, so h-bar = [1, 0, 0] and SumNorm(p-bar / h-bar)
    # = [1, 0, 0]; the target SumNorm(p~ / h~) is SumNorm(p~), so L_f = p~_0 / sum(p~) * log(1) + rest * log(1e-12).
    target = [p / sum(p_tilde) for p in p_tilde]
    assert loss_f == pytest.approx((target[1] + target[2]) * math.log(1e-12), rel=1e-5)
    assert loss == pytest.approx(loss_x + loss_u + 0.5 * loss_f, rel=1e-5)
    assert mask_rate == 1
