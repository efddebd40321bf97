"""MixMatch's pieces on hand-computed tensors: sharpening, label guessing, MixUp and its random draws,
interleaving and its BatchNorm handling, both losses, the ramp-up, the optimiser choice, and one step."""

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

from common import WideResNet  # noqa: E402
from mixmatch import (deinterleave, forward_interleaved, frozen_bn_statistics, guess_labels, interleave,  # noqa: E402
                      linear_rampup, make_optimizer, mixmatch_unlabeled_loss, mixup, parse_args, pseudo_label_stats,
                      sample_mixup, sharpen, soft_cross_entropy, train_step)


def close(a: torch.Tensor, b, tol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


def test_sharpen_hand_computed():
    # [0.6, 0.3, 0.1] squared (T = 0.5) is [0.36, 0.09, 0.01], sum 0.46.
    q = sharpen(torch.tensor([[0.6, 0.3, 0.1]]), 0.5)
    assert close(q, [[0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46]])


def test_sharpen_keeps_argmax_sums_to_one_and_lowers_entropy():
    p = torch.softmax(torch.randn(50, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    q = sharpen(p, 0.5)
    assert torch.equal(q.argmax(1), p.argmax(1))
    assert close(q.sum(1), torch.ones(50), 1e-6)
    entropy = lambda d: -(d * d.log()).sum(1)  # noqa: E731
    assert (entropy(q) < entropy(p)).all()
    assert close(sharpen(p, 1.0), p)  # T = 1 leaves the distribution alone


def test_guess_labels_average_the_views_then_sharpen():
    # Logits log(p) have softmax p: views [0.7, 0.2, 0.1] and [0.5, 0.4, 0.1] average to [0.6, 0.3, 0.1].
    views = torch.tensor([[[0.7, 0.2, 0.1]], [[0.5, 0.4, 0.1]]]).log().requires_grad_()
    q = guess_labels(views, 0.5)
    assert q.shape == (1, 3) and not q.requires_grad
    assert close(q, [[0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46]], 1e-6)


def test_mixup_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    lam = torch.tensor([0.3, 0.8, 0.5])  # lambda' = max(lambda, 1 - lambda) = [0.7, 0.8, 0.5]
    perm = torch.tensor([2, 0, 1])
    x_mix, t_mix = mixup(x, t, lam, perm)
    assert close(x_mix, [[0.7 * 1 + 0.3 * 2, 0.3 * 2], [0.2 * 1, 0.8 * 1], [0.5 * 2, 0.5 * 2 + 0.5 * 1]])
    assert close(t_mix, [[0.7 + 0.15, 0.15], [0.2, 0.8], [0.25, 0.25 + 0.5]])


def test_mixup_keeps_each_example_at_least_half_its_own():
    x = torch.eye(4).view(4, 1, 2, 2)  # image i is 1 at pixel i only
    t = torch.eye(4)
    lam = torch.tensor([0.0, 0.1, 0.49, 0.9])
    x_mix, t_mix = mixup(x, t, lam, torch.tensor([1, 2, 3, 0]))
    own = t_mix.diagonal()
    assert close(own, [1.0, 0.9, 0.51, 0.9]) and (own >= 0.5).all()
    assert close(x_mix.view(4, 4), t_mix)  # images and targets are mixed with the same lambda'
    assert close(t_mix.sum(1), torch.ones(4))


def test_sample_mixup_draws_per_example_and_is_reproducible():
    rng = np.random.default_rng(0)
    lam, perm = sample_mixup(rng, 300, 0.75, torch.device("cpu"))
    assert lam.shape == (300,) and lam.dtype == torch.float32 and ((lam > 0) & (lam < 1)).all()
    assert lam.unique().numel() == 300  # one lambda per example, not one per batch
    assert abs(lam.mean().item() - 0.5) < 0.05  # Beta(0.75, 0.75) is symmetric about 1/2
    assert sorted(perm.tolist()) == list(range(300))
    state = rng.bit_generator.state
    a = sample_mixup(rng, 10, 0.75, torch.device("cpu"))
    rng2 = np.random.default_rng(123)
    rng2.bit_generator.state = state  # what resuming from a checkpoint does
    b = sample_mixup(rng2, 10, 0.75, torch.device("cpu"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_interleave_hand_computed_and_inverse():
    parts = [torch.arange(6) + 10 * i for i in range(3)]
    batches = interleave(parts)
    assert [b.tolist() for b in batches] == [[0, 1, 10, 11, 20, 21], [2, 3, 12, 13, 22, 23], [4, 5, 14, 15, 24, 25]]
    assert all(torch.equal(a, b) for a, b in zip(deinterleave(batches), parts))


@pytest.mark.parametrize("n_parts,length", [(3, 7), (2, 5), (4, 8), (9, 64), (1, 3)])
def test_interleave_uneven_every_batch_holds_every_part(n_parts, length):
    parts = [torch.arange(length) + 100 * i for i in range(n_parts)]
    batches = interleave(parts)
    assert len(batches) == n_parts and sum(len(b) for b in batches) == n_parts * length
    for b in batches:
        assert sorted(set((b // 100).tolist())) == list(range(n_parts))  # a slice of every part
        assert len(b) in (n_parts * (length // n_parts), n_parts * (length // n_parts + 1))
    back = deinterleave(batches)
    assert all(torch.equal(a, b) for a, b in zip(back, parts))
    assert all(torch.equal(a, b) for a, b in zip(interleave(back), batches))


def tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1), nn.Flatten(), nn.LazyLinear(5))


def test_frozen_bn_statistics_keeps_running_statistics_but_normalises_with_the_batch():
    net = tiny_bn_net()
    x = torch.randn(8, 3, 6, 6) * 3 + 2
    net(x)  # materialise the lazy layer; moves the statistics once
    bn = net[1]
    before = (bn.running_mean.clone(), bn.running_var.clone())
    with frozen_bn_statistics(net):
        out = net(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert bn.track_running_stats and bn.num_batches_tracked.item() == 1  # restored; this pass was not counted
    assert torch.allclose(out, net(x))  # the same batch-statistics output as an ordinary train-mode pass
    assert not torch.equal(bn.running_mean, before[0])  # outside the context the statistics move again


def forward_per_pass(model: nn.Module, parts: list[torch.Tensor], amp: bool) -> list[torch.Tensor]:
    """The former forward_interleaved, kept as the reference: a forward pass per interleaved batch, only the
    first updating BatchNorm's running statistics."""
    batches = interleave(parts)
    with torch.autocast(batches[0].device.type, dtype=torch.bfloat16, enabled=amp):
        logits = [model(batches[0].contiguous(memory_format=torch.channels_last))]
        with frozen_bn_statistics(model):
            logits += [model(batch.contiguous(memory_format=torch.channels_last)) for batch in batches[1:]]
    return deinterleave(logits)


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """max |a - b| <= rel * max |b|: equal to float rounding, relative to the tensor's scale."""
    assert a.shape == b.shape and (a - b).abs().max() <= rel * b.abs().max(), what


def small_wrn() -> nn.Module:
    torch.manual_seed(0)
    return WideResNet(depth=10, widen_factor=1).to(memory_format=torch.channels_last)


# Parts with different means, as labeled vs unlabeled; 3 parts of 7 interleave into batches of 9, 6 and 6.
PARTS = [torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(i)) + i for i in range(3)]


def test_forward_interleaved_is_one_pass_with_the_logits_gradients_and_statistics_of_a_pass_per_batch():
    net = small_wrn()
    reference = copy.deepcopy(net)
    logits, expected = forward_interleaved(net, PARTS, amp=False), forward_per_pass(reference, PARTS, amp=False)
    assert [tuple(t.shape) for t in logits] == [(7, 10)] * 3
    for a, b in zip(logits, expected):
        assert_rel_close(a, b)
    w = torch.randn(21, 10, generator=torch.Generator().manual_seed(9))  # weighs every logit of every part
    (torch.cat(logits) * w).sum().backward()
    (torch.cat(expected) * w).sum().backward()
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        assert_rel_close(p.grad, q.grad, what=name)
    # The running statistics moved once, from the first interleaved batch, as in the passes one by one.
    for (name, a), b in zip(net.named_buffers(), reference.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7), name
    assert net.bn.num_batches_tracked.item() == 1
    first = copy.deepcopy(small_wrn())
    first(interleave(PARTS)[0].contiguous(memory_format=torch.channels_last))  # one ordinary pass on batch 0
    assert torch.allclose(net.bn.running_var, first.bn.running_var, rtol=1e-5, atol=1e-7)
    # ... which differs from running each part alone (its own statistics): interleaving matters.
    alone = [copy.deepcopy(small_wrn())(p) for p in PARTS]
    assert not torch.allclose(logits[0], alone[0], atol=1e-3)


def test_label_guessing_pass_has_the_logits_of_a_pass_per_view_and_leaves_running_statistics_alone():
    """train_step guesses labels from the K views in one pass with bn_groups; the reference makes a pass per view.
    Same logits to float rounding, and neither touches BatchNorm's running statistics."""
    model = small_wrn()
    views = [p.clone() for p in PARTS]  # 3 "views" of 7 images, of different means
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad(), frozen_bn_statistics(model):
        per_view = torch.stack([model(v.contiguous(memory_format=torch.channels_last)) for v in views])
        one_pass = model(torch.cat(views).contiguous(memory_format=torch.channels_last), bn_groups=[7] * 3)
    assert_rel_close(one_pass.unflatten(0, (3, 7)), per_view)
    with torch.no_grad(), frozen_bn_statistics(model):  # without the groups: whole-batch statistics, other logits
        assert not torch.allclose(model(torch.cat(views)).unflatten(0, (3, 7)), per_view, rtol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_step_with_one_pass_equals_the_step_with_a_pass_per_batch(monkeypatch):
    """The whole step with forward_interleaved (one pass, statistics per group) and with the former one (a pass
    per interleaved batch): the same losses, guessed labels, gradients, weights and running statistics."""
    import mixmatch
    args = argparse.Namespace(temperature=0.5, lambda_u=75.0, k=2, alpha=0.75, rampup_steps=16)
    g = torch.Generator().manual_seed(0)
    x_l, u = (torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2))
    results = []
    for forward in (mixmatch.forward_interleaved, forward_per_pass):
        monkeypatch.setattr(mixmatch, "forward_interleaved", forward)
        model = small_wrn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rngs = (torch.Generator().manual_seed(1), np.random.default_rng(0))
        stats, q = train_step(model, opt, x_l, torch.arange(7), u, 8, rngs, args, amp=False)
        results.append((stats, q, model))
    (stats, q, model), (stats_ref, q_ref, model_ref) = results
    for name in stats:
        assert_rel_close(stats[name], stats_ref[name], what=name)
    assert torch.equal(q, q_ref)  # guessed before the mixed pass: untouched
    for (name, p), p_ref in zip(model.named_parameters(), model_ref.parameters()):
        assert_rel_close(p.grad, p_ref.grad, what=name)
        assert_rel_close(p, p_ref, what=name)
    for (name, a), b in zip(model.named_buffers(), model_ref.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7), name


def test_soft_cross_entropy_hand_computed():
    logits = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]).log()
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = (-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)) - math.log(0.8)) / 2
    assert close(soft_cross_entropy(logits, targets), expected, 1e-6)


def test_mixmatch_unlabeled_loss_averages_over_examples_and_classes():
    logits = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # squared errors: row 1 0.25 + 0.25, row 2 0.01 + 0.01; mean over 2 examples x 2 classes
    assert close(mixmatch_unlabeled_loss(logits, targets), (0.5 + 0.02) / 4, 1e-6)
    assert close(mixmatch_unlabeled_loss(targets.clamp(min=1e-30).log(), targets), 0.0, 1e-12)


def test_linear_rampup():
    assert [linear_rampup(s, 16384) for s in (0, 4096, 8192, 16384, 10**6)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert linear_rampup(0, 0) == 1.0  # no ramp-up


def test_optimizer_choice_and_its_defaults():
    sgd, adam = parse_args([]), parse_args(["--optimizer", "adam"])
    assert (sgd.lr, sgd.weight_decay, adam.lr, adam.weight_decay) == (0.03, 5e-4, 0.002, 0.02)
    assert parse_args(["--optimizer", "adam", "--lr", "0.001"]).lr == 0.001
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    opt = make_optimizer(model, adam, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    # Decoupled decay on the weight matrix only: with zero gradients one step multiplies it by 1 - lr * wd.
    w = model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model[0].weight, w * (1 - 0.002 * 0.02))
    assert isinstance(make_optimizer(model, sgd, torch.device("cpu")), torch.optim.SGD)


def test_train_step_runs_and_reports_its_statistics():
    from common import WideResNet, normalize, weak_augment
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1)
    args = argparse.Namespace(temperature=0.5, lambda_u=75.0, k=2, alpha=0.75, rampup_steps=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    b, k = 4, 2
    x_l = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g)
    u = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g)
    y_l, y_u = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    rngs = (torch.Generator().manual_seed(1), np.random.default_rng(0))
    w = model.fc.weight.detach().clone()
    before = copy.deepcopy(model)
    stats, q = train_step(model, opt, x_l, y_l, u, 8, rngs, args, amp=False)
    # Named 0-dim statistics on the device, without gradient (the loop sums them with no host sync).
    assert list(stats) == ["loss", "loss_x", "loss_u", "ramp"]
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    loss, loss_x, loss_u, ramp = (v.item() for v in stats.values())
    assert math.isclose(loss, loss_x + 75.0 * 0.5 * loss_u, rel_tol=1e-5)  # step 8 of a 16-step ramp: 0.5
    assert ramp == 0.5 and 0 < loss_u < 1
    assert not torch.equal(model.fc.weight, w)  # the step changed the weights
    # The step's views, from its generator in its order: the labeled batch's weak view, then the K unlabeled ones.
    g = torch.Generator().manual_seed(1)
    weak_augment(x_l, g)
    x_u = weak_augment(u, g, views=k)
    # q: the sharpened average of the predictions of the model before the step over the K views, without gradient.
    with torch.no_grad(), frozen_bn_statistics(before):
        expected = guess_labels(torch.stack([before(normalize(view)) for view in x_u]), 0.5)
    assert q.shape == (b, 10) and not q.requires_grad and close(q, expected, 1e-5)
    # The MixUp draws came from the numpy generator: a lambda per image of X^ and U^, then a permutation.
    rng = np.random.default_rng(0)
    rng.beta(0.75, 0.75, size=(k + 1) * b)
    rng.permutation((k + 1) * b)
    assert rngs[1].bit_generator.state == rng.bit_generator.state
    # The loop's diagnostic of the guessed label argmax q, without a mask: every true label is known here.
    acc = pseudo_label_stats(q.argmax(dim=1), None, y_u)
    assert list(acc) == ["pseudo_acc", "known_rate"] and acc["known_rate"].item() == 1
    assert acc["pseudo_acc"].item() == pytest.approx((q.argmax(dim=1) == y_u).float().mean().item())
