"""ReMixMatch's pieces on hand-computed tensors: distribution alignment and the prediction history it reads,
the guessed label, rotations, the pieces shared with MixMatch (sharpen, MixUp, interleave, ramp-up), and one
training step wired from them (which view feeds p~, which weights ramp, the separate rotation head, the guessed
labels it returns)."""

import argparse
import copy
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import WideResNet, normalize, weak_augment  # noqa: E402
from test_mixmatch import assert_rel_close, forward_per_pass  # noqa: E402 (the reference: a pass per batch)
from remixmatch import (PredictionHistory, RotationHead, deinterleave, distribution_alignment,  # noqa: E402
                        guess_labels, interleave, labeled_distribution, linear_rampup, mixup,
                        parse_args, pseudo_label_stats, rotate_batch, sharpen, soft_cross_entropy, train_step)


def close(a: torch.Tensor, b, tol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


def test_labeled_distribution_counts_the_split():
    p = labeled_distribution(torch.tensor([0, 0, 1, 2, 2, 2, 9, 9]))
    assert close(p, [2 / 8, 1 / 8, 3 / 8, 0, 0, 0, 0, 0, 0, 2 / 8])


def test_distribution_alignment_hand_computed():
    # q * p(y) / p~(y) = [0.5 * 2/3, 0.3 * 4/3, 0.2 * 4/3] = [1/3, 0.4, 4/15], which already sums to 1.
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    aligned = distribution_alignment(probs, torch.full((3,), 1 / 3), torch.tensor([0.5, 0.25, 0.25]))
    assert close(aligned, [[1 / 3, 0.4, 4 / 15]])
    # A non-uniform p(y) and a renormalisation: [0.5 * 0.2/0.5, 0.5 * 0.8/0.5] = [0.2, 0.8].
    aligned = distribution_alignment(torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([0.2, 0.8]),
                                     torch.tensor([0.5, 0.5]))
    assert close(aligned, [[0.2, 0.8], [0.18 / 0.26, 0.08 / 0.26]])


def test_distribution_alignment_moves_skewed_predictions_toward_the_labeled_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 10, generator=g)
    logits[:, 0] += 2.0  # the model over-predicts class 0
    probs = torch.softmax(logits, dim=1)
    p_data = torch.full((10,), 0.1)
    aligned = distribution_alignment(probs, p_data, probs.mean(0))
    assert (aligned >= 0).all() and close(aligned.sum(1), torch.ones(256), 1e-6)  # still distributions
    before, after = (probs.mean(0) - p_data).abs().sum(), (aligned.mean(0) - p_data).abs().sum()
    assert after < 0.5 * before
    assert aligned[:, 0].mean() < probs[:, 0].mean()
    assert close(distribution_alignment(probs, p_data, p_data), probs)  # p~ = p(y): nothing to align


def test_prediction_history_is_the_mean_of_the_last_batches():
    h = PredictionHistory(num_classes=2, size=2, device=torch.device("cpu"))
    assert close(h(), [0.5, 0.5])  # starts uniform
    h.update(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert close(h(), [0.75, 0.25])  # one uniform row left
    h.update(torch.tensor([[0.0, 1.0], [0.5, 0.5]]))  # batch mean [0.25, 0.75]
    assert close(h(), [0.625, 0.375])
    h.update(torch.tensor([[0.0, 1.0]]))  # the oldest batch, [1, 0], drops out
    assert close(h(), [0.125, 0.875]) and h.pos == 1
    state = copy.deepcopy(h.state_dict())
    h2 = PredictionHistory(2, 2, torch.device("cpu"))
    h2.load_state_dict(state)
    h.update(torch.tensor([[1.0, 0.0]]))
    h2.update(torch.tensor([[1.0, 0.0]]))
    assert torch.equal(h(), h2()) and h2.pos == h.pos == 0


def test_guess_labels_align_then_sharpen():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().requires_grad_()
    q = guess_labels(logits, torch.full((3,), 1 / 3), torch.tensor([0.5, 0.25, 0.25]), 0.5)
    sq = torch.tensor([1 / 9, 0.16, 16 / 225])  # [1/3, 0.4, 4/15] squared
    assert close(q, (sq / sq.sum()).unsqueeze(0)) and not q.requires_grad
    # Alignment before sharpening, not after: the other order gives a different guess.
    other = distribution_alignment(sharpen(torch.tensor([[0.5, 0.3, 0.2]]), 0.5), torch.full((3,), 1 / 3),
                                   torch.tensor([0.5, 0.25, 0.25]))
    assert not close(q, other, 1e-3)


def test_rotate_batch_on_a_2x2_image():
    img = torch.tensor([[1, 2], [3, 4]]).view(1, 1, 2, 2).expand(4, 1, 2, 2)
    out = rotate_batch(img, torch.tensor([0, 1, 2, 3]))
    assert out[0, 0].tolist() == [[1, 2], [3, 4]]
    assert out[1, 0].tolist() == [[2, 4], [1, 3]]  # 90 degrees counter-clockwise
    assert out[2, 0].tolist() == [[4, 3], [2, 1]]
    assert out[3, 0].tolist() == [[3, 1], [4, 2]]


def test_rotate_batch_per_image_and_inverse():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    r = torch.tensor([3, 0, 2, 1, 1, 2])
    y = rotate_batch(x, r)
    assert y.dtype == x.dtype and not torch.equal(y[0], x[0]) and torch.equal(y[1], x[1])
    assert torch.equal(rotate_batch(y, (4 - r) % 4), x)
    assert torch.equal(y[3], torch.rot90(x[3], 1, dims=(1, 2)))


def test_shared_pieces_sharpen_mixup_interleave_ramp():
    assert close(sharpen(torch.tensor([[0.6, 0.3, 0.1]]), 0.5), [[0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46]])
    x, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x_mix, t_mix = mixup(x, t, torch.tensor([0.25, 0.6]), torch.tensor([1, 1]))  # lambda' = [0.75, 0.6]
    assert close(x_mix, [[0.75 * 1 + 0.25 * 3], [3.0]]) and close(t_mix, [[0.75, 0.25], [0.0, 1.0]])
    parts = [torch.arange(4) + 10 * i for i in range(4)]
    expected = [[0, 10, 20, 30], [1, 11, 21, 31], [2, 12, 22, 32], [3, 13, 23, 33]]
    assert [b.tolist() for b in interleave(parts)] == expected
    assert all(torch.equal(a, b) for a, b in zip(deinterleave(interleave(parts)), parts))
    assert [linear_rampup(s, 100) for s in (0, 25, 100, 101)] == [0.0, 0.25, 1.0, 1.0]
    logits = torch.tensor([[0.5, 0.5]]).log()
    assert close(soft_cross_entropy(logits, torch.tensor([[0.2, 0.8]])), math.log(2))


def test_defaults_are_the_papers():
    a = parse_args([])
    assert (a.k_strong, a.temperature, a.alpha, a.lambda_u, a.lambda_u1, a.lambda_rot, a.rampup_steps,
            a.da_batches) == (8, 0.5, 0.75, 1.5, 0.5, 0.5, 16384, 128)
    assert (a.optimizer, a.lr, a.weight_decay) == ("sgd", 0.03, 5e-4)
    assert (parse_args(["--optimizer", "adam"]).lr, parse_args(["--optimizer", "adam"]).weight_decay) == (0.002, 0.02)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1)
    model.rot_head = RotationHead(model.num_features)  # as train() attaches it
    return model


def test_rotation_head_is_the_former_inline_linear_head():
    """RotationHead draws what the head attached inline in train() drew (nn.Linear's initialisation, then the
    reference's Glorot-normal weights and zero bias), from the same random stream, and saves under the same
    state_dict keys: runs reproduce and old checkpoints load."""
    torch.manual_seed(0)
    head = RotationHead(32)
    after_head = torch.rand(1)
    torch.manual_seed(0)
    old = nn.Linear(32, 4)
    nn.init.xavier_normal_(old.weight)
    nn.init.zeros_(old.bias)
    assert torch.equal(torch.rand(1), after_head)  # the same number of draws
    assert isinstance(head, nn.Linear) and head.weight.shape == (4, 32)
    assert torch.equal(head.weight, old.weight) and torch.equal(head.bias, torch.zeros(4))
    model = make_model()
    keys = list(model.state_dict())
    assert keys[-2:] == ["rot_head.weight", "rot_head.bias"]  # after the class head, as before
    assert [n for n, _ in model.named_parameters()][-2:] == ["rot_head.weight", "rot_head.bias"]
    old_model = WideResNet(depth=10, widen_factor=1)
    old_model.rot_head = nn.Linear(old_model.num_features, 4)
    model.load_state_dict(old_model.state_dict())  # strict: an old checkpoint's model loads


def step_inputs(b: int = 8):
    """A labeled and an unlabeled batch of uint8 images, not yet augmented, their labels, and the step's generators."""
    g = torch.Generator().manual_seed(1)
    x_l, u = (torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2))
    y_l, y_u = torch.arange(b) % 10, (torch.arange(b) + 3) % 10
    return x_l, y_l, u, y_u, (torch.Generator().manual_seed(2), np.random.default_rng(0))


def step_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"temperature": 0.5, "lambda_u": 1.5, "lambda_u1": 0.5, "lambda_rot": 0.5,
                                 "k_strong": 2, "labeled_aug": "weak", "augment": "randaugment", "alpha": 0.75,
                                 "rampup_steps": 100, **kw})


def test_train_step_weights_ramps_and_feeds_p_model_from_the_weak_view():
    model = make_model()
    before = copy.deepcopy(model)
    args = step_args()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x_l, y_l, u, y_u, rngs = step_inputs()
    history = PredictionHistory(10, 128, torch.device("cpu"))
    p_data = torch.full((10,), 0.1)
    stats, q, probe = train_step(model, opt, x_l, y_l, u, 25, p_data, history, rngs, args, amp=False)
    # Named 0-dim statistics on the device, without gradient (the loop sums them with no host sync).
    assert list(stats) == ["loss", "loss_x", "loss_u", "loss_u1", "loss_rot", "ramp"]
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    loss, loss_x, loss_u, loss_u1, loss_rot, ramp = (v.item() for v in stats.values())
    # Step 25 of a 100-step ramp: 0.25. Only lambda_u and lambda_u1 carry it; the rotation loss and L_x do not.
    assert math.isclose(loss, loss_x + 0.25 * (1.5 * loss_u + 0.5 * loss_u1) + 0.5 * loss_rot, rel_tol=1e-5)
    assert ramp == 0.25 and loss_rot > 0
    # The step drew from its generators: the labeled images' weak view first, then the unlabeled weak view.
    g = torch.Generator().manual_seed(2)
    weak_augment(x_l, g)
    x_uw = weak_augment(u, g)
    # p~ was updated once, with the mean prediction on the weak view (train-mode BatchNorm, as in the step).
    assert history.pos == 1
    with torch.no_grad():
        logits_weak = before(normalize(x_uw).contiguous(memory_format=torch.channels_last))
        weak = torch.softmax(logits_weak, dim=1).mean(0)
    assert torch.allclose(history.buffer[0], weak, atol=1e-5)
    # q: the guess on the weak view of the model before the step, aligned with p~ as it was before the update
    # (still uniform), then sharpened; without gradient.
    expected = guess_labels(logits_weak, p_data, torch.full((10,), 0.1), 0.5)
    assert q.shape == (8, 10) and not q.requires_grad and close(q, expected, 1e-5)
    # The loop's diagnostic of the guessed label argmax q, without a mask: every true label is known here.
    acc = pseudo_label_stats(q.argmax(dim=1), None, y_u)
    assert list(acc) == ["pseudo_acc", "known_rate"] and acc["known_rate"].item() == 1
    assert acc["pseudo_acc"].item() == pytest.approx((q.argmax(dim=1) == y_u).float().mean().item())
    assert torch.allclose(history.buffer[1:], torch.full((127, 10), 0.1))
    # The rotation head is its own parameters, and the rotation loss trained it.
    assert model.rot_head.weight.shape == (4, model.num_features) and model.rot_head.weight.grad.abs().sum() > 0
    assert not torch.equal(model.rot_head.weight, before.rot_head.weight)
    # The MixUp draws came from the numpy generator: one lambda per image of X^ and the K + 1 views, then a
    # permutation of them.
    rng = np.random.default_rng(0)
    rng.beta(0.75, 0.75, size=(2 + 2) * 8)
    rng.permutation((2 + 2) * 8)
    assert rngs[1].bit_generator.state == rng.bit_generator.state


def test_train_step_without_ramp_or_rotation_weight_is_labeled_loss_only():
    model = make_model()
    args = step_args(lambda_rot=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x_l, y_l, u, _, rngs = step_inputs()
    stats, _, _ = train_step(model, opt, x_l, y_l, u, 0, torch.full((10,), 0.1),
                          PredictionHistory(10, 128, torch.device("cpu")), rngs, args, amp=False)
    assert stats["loss"].item() == stats["loss_x"].item()  # ramp 0 at step 0: L = L_x
    assert stats["ramp"].item() == 0 and stats["loss_rot"].item() > 0  # the rotation loss is there, unweighted
    assert model.rot_head.weight.grad.abs().sum() == 0  # nothing but the rotation loss reaches the rotation head


@pytest.mark.parametrize("labeled_aug", ["weak", "strong"])
def test_train_step_with_one_pass_equals_the_step_with_a_pass_per_batch(monkeypatch, labeled_aug):
    """The whole step with forward_interleaved (one pass over the K + 2 interleaved batches, BatchNorm statistics
    per batch) and with the former one (a pass per batch): the same losses, guessed labels, p~, gradients, weights
    and running statistics. B = 7 makes interleaved batches of unequal sizes (8, 8, 8, 4)."""
    import remixmatch
    args = step_args(labeled_aug=labeled_aug)
    x_l, y_l, u, _, _ = step_inputs(7)
    results = []
    for forward in (remixmatch.forward_interleaved, forward_per_pass):
        monkeypatch.setattr(remixmatch, "forward_interleaved", forward)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        history = PredictionHistory(10, 4, torch.device("cpu"))
        rngs = (torch.Generator().manual_seed(2), np.random.default_rng(0))
        stats, q, _ = train_step(model, opt, x_l, y_l, u, 50, torch.full((10,), 0.1), history, rngs, args, amp=False)
        results.append((stats, q, history, model))
    (stats, q, history, model), (stats_ref, q_ref, history_ref, model_ref) = results
    for name in stats:
        assert_rel_close(stats[name], stats_ref[name], what=name)
    assert torch.equal(q, q_ref) and torch.equal(history.buffer, history_ref.buffer)  # before the mixed pass
    for (name, p), p_ref in zip(model.named_parameters(), model_ref.parameters()):
        assert_rel_close(p.grad, p_ref.grad, what=name)
        assert_rel_close(p, p_ref, what=name)
    for (name, a), b in zip(model.named_buffers(), model_ref.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7), name
