"""Tests for polyalign.train.optim: schedule hand values, guarded steps, clipping, micro-batch invariance."""

import math
import random

import pytest
import torch
from torch import nn

from polyalign.train.optim import (
    NonFiniteError,
    build_optimizer,
    lr_at,
    micro_batches,
    seed_everything,
    set_lr,
    step_optimizer,
)


def test_warmup_is_linear_from_first_step():
    """base 1e-3, warmup 4: steps 0..3 get 1/4, 2/4, 3/4, 4/4 of base; then constant."""
    got = [lr_at(s, 1e-3, warmup_steps=4) for s in range(6)]
    assert got == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_linear_decay_hand_values():
    """warmup 2, total 10: progress = (step-2)/8. step 6 -> 0.5."""
    assert lr_at(2, 1.0, 2, 10, "linear") == pytest.approx(1.0)
    assert lr_at(6, 1.0, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_at(10, 1.0, 2, 10, "linear") == pytest.approx(0.0)
    assert lr_at(25, 1.0, 2, 10, "linear") == pytest.approx(0.0)


def test_cosine_hand_values():
    """total 8, no warmup: step 2 -> (1 + cos(pi/4))/2 = 0.853553; step 4 -> 0.5; step 8 -> 0."""
    assert lr_at(0, 2.0, 0, 8, "cosine") == pytest.approx(2.0)
    assert lr_at(2, 2.0, 0, 8, "cosine") == pytest.approx(2.0 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(4, 2.0, 0, 8, "cosine") == pytest.approx(1.0)
    assert lr_at(8, 2.0, 0, 8, "cosine") == pytest.approx(0.0)
    assert lr_at(1, 2.0, 2, 8, "cosine") == pytest.approx(2.0)  # still warming up: (1+1)/2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schedule": "step"}, "unknown schedule"),
        ({"schedule": "cosine"}, "needs total_steps"),
        ({"schedule": "linear", "total_steps": 5, "warmup_steps": 5}, "must exceed"),
    ],
)
def test_lr_at_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_at(0, 1.0, **kwargs)


def test_set_lr_changes_every_group():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    opt = build_optimizer(model.named_parameters(), lr=1.0, weight_decay=0.1)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_named_params_exclude_bias_and_norm_from_weight_decay():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    opt = build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay[0.1] == {id(model[0].weight), id(model[2].weight)}
    assert by_decay[0.0] == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    plain = build_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0.1


def test_build_optimizer_is_adamw_and_errors():
    model = nn.Linear(2, 2)
    assert isinstance(build_optimizer(model.parameters(), 1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="must be >= 0"):
        build_optimizer(model.parameters(), -1.0)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(model.parameters(), 1e-3)


def _model_and_opt():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    return model, build_optimizer(model.parameters(), lr=0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_skips_step(bad):
    model, opt = _model_and_opt()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(2, 4)).sum() * bad
    loss.backward()
    result = step_optimizer(model.parameters(), opt, max_grad_norm=1.0)
    assert result.skipped and not math.isfinite(result.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert opt.state_dict()["state"] == {}  # Adam moments untouched


def test_nonfinite_grad_skips_step_even_with_finite_loss():
    model, opt = _model_and_opt()
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 4)).sum().backward()
    model.weight.grad[0, 1] = float("nan")
    result = step_optimizer(model.parameters(), opt)
    assert result.skipped and math.isnan(result.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_finite_step_applies_update_and_zeroes_grads():
    model, opt = _model_and_opt()
    before = model.weight.detach().clone()
    loss = model(torch.ones(2, 4)).sum()
    loss.backward()
    result = step_optimizer(model.parameters(), opt)
    assert not result.skipped and result.grad_norm > 0
    assert not torch.equal(before, model.weight)
    assert all(p.grad is None for p in model.parameters())


def test_an_update_that_makes_weights_non_finite_is_an_error():
    """Adam's first step moves each weight by ~lr; lr 1e39 overflows float32: a named error right after the
    update (a finite gradient norm, so the update was applied); lr 1e30 stays finite."""
    for lr, finite in ((1e30, True), (1e39, False)):
        model, _ = _model_and_opt()
        opt = build_optimizer(model.parameters(), lr=lr)
        model(torch.ones(2, 4)).sum().backward()
        if finite:
            assert not step_optimizer(model.parameters(), opt).skipped
            continue
        with pytest.raises(NonFiniteError, match="non-finite.*lower train.lr"):
            step_optimizer(model.parameters(), opt)


def test_step_without_backward_is_an_error():
    model, opt = _model_and_opt()
    with pytest.raises(ValueError, match="backward"):
        step_optimizer(model.parameters(), opt)


def test_grad_clipping_scales_to_max_norm():
    """grad (3, 4) has norm 5; clip to 1 -> (0.6, 0.8); SGD lr 1 moves the param by exactly that."""
    param = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=1.0)
    param.grad = torch.tensor([3.0, 4.0])
    result = step_optimizer([param], opt, max_grad_norm=1.0)
    assert result.grad_norm == pytest.approx(5.0)
    assert torch.allclose(param.detach(), torch.tensor([-0.6, -0.8]))
    param.grad = torch.tensor([3.0, 4.0])
    step_optimizer([param], opt, max_grad_norm=None)  # no clipping: full step of (3, 4)
    assert torch.allclose(param.detach(), torch.tensor([-3.6, -4.8]))


def test_micro_batches_cover_rows():
    assert micro_batches(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert micro_batches(2, 8) == [slice(0, 2)]
    with pytest.raises(ValueError, match="micro_batch_size"):
        micro_batches(8, 0)


@pytest.mark.parametrize("micro_size", [1, 3, 8])
def test_accumulated_micro_batch_gradient_equals_full_batch(micro_size):
    """1x8 == 8x1 (and uneven 3+3+2): scaled micro-batch mean losses sum to the full-batch mean."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    nn.functional.mse_loss(model(x), y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for micro in micro_batches(8, micro_size):
        loss = nn.functional.mse_loss(model(x[micro]), y[micro]) * (
            len(range(8)[micro]) / 8
        )  # rows in it / rows in all
        loss.backward()
    for g_full, p in zip(full, model.parameters()):
        assert torch.allclose(g_full, p.grad, atol=1e-6)


def test_seed_everything_repeats_draws():
    np = pytest.importorskip("numpy")
    seed_everything(123)
    first = (random.random(), torch.rand(3), np.random.rand())
    seed_everything(123)
    second = (random.random(), torch.rand(3), np.random.rand())
    assert first[0] == second[0] and torch.equal(first[1], second[1]) and first[2] == second[2]
