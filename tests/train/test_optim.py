"""LARS against a per-parameter transcription of the MoCo v3 / BYOL form, and the optimizer choice."""

import pytest
import torch

from moco_dali.train.optim import LARS, make_optimizer


def reference_lars(params, grads, buffers, lr, momentum, wd, tc):
    for p, g, buf in zip(params, grads, buffers):
        d = g.clone()
        if p.ndim > 1:  # neither decay nor adaptation for biases and BN parameters
            d = d + wd * p
            w_norm, u_norm = p.norm(), d.norm()
            if w_norm > 0 and u_norm > 0:
                d = d * (tc * w_norm / u_norm)
        buf.mul_(momentum).add_(d)
        p.sub_(lr * buf)


def test_lars_matches_the_per_parameter_formula():
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (8,), (10, 8), (10,), (3, 3)]
    ours = [torch.randn(s, generator=g) for s in shapes]
    ours[-1].zero_()  # a zero weight keeps ratio 1
    theirs = [p.clone() for p in ours]
    params = [torch.nn.Parameter(p) for p in ours]
    optimizer = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02)
    buffers = [torch.zeros_like(p) for p in theirs]
    for _ in range(4):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()
        reference_lars(theirs, grads, buffers, 0.5, 0.9, 1e-2, 0.02)
        for p, t in zip(params, theirs):
            torch.testing.assert_close(p.detach(), t, rtol=1e-6, atol=1e-6)


def test_lars_skips_parameters_without_gradients_and_saves_state():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3))
    optimizer = LARS([a, b], lr=0.1)
    a.grad = torch.ones(2, 2)
    optimizer.step()
    assert torch.equal(b.detach(), torch.ones(3)) and not torch.equal(a.detach(), torch.ones(2, 2))
    restored = LARS([a, b], lr=0.1)
    restored.load_state_dict(optimizer.state_dict())
    assert torch.equal(restored.state[a]["momentum_buffer"], optimizer.state[a]["momentum_buffer"])


def test_make_optimizer_choices():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert (
        make_optimizer("sgd", params, 0.1, 0.9, 0.0, torch.device("cpu")).defaults["fused"] is True
    )
    assert not make_optimizer(
        "sgd", params, 0.1, 0.9, 0.0, torch.device("cpu"), fast=False
    ).defaults["fused"]
    assert isinstance(make_optimizer("lars", params, 0.1, 0.9, 0.0, torch.device("cpu")), LARS)
    with pytest.raises(ValueError, match="choose sgd or lars"):
        make_optimizer("adam", params, 0.1, 0.9, 0.0, torch.device("cpu"))


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_a_non_finite_gradient_skips_the_step_on_the_device(name):
    """backward_step: weights and momentum buffers untouched by a NaN step, then training goes on."""
    from moco_dali.train.step import backward_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = make_optimizer(name, model.parameters(), 0.1, 0.9, 1e-4, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(8, 4)
    assert not backward_step(model(x).square().mean(), optimizer, scaler).item()
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    optimizer.zero_grad()
    assert backward_step(model(x).square().mean() * float("nan"), optimizer, scaler).item()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(
        torch.equal(b, optimizer.state[p]["momentum_buffer"])
        for b, p in zip(buffers, model.parameters())
    )
    optimizer.zero_grad()
    assert not backward_step(model(x).square().mean(), optimizer, scaler).item()
    assert not any(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _scaler_steps(device: torch.device, autocast_dtype):
    """backward_step with an enabled gradient scaler: an overflow of the scaled gradients, then a NaN loss."""
    from moco_dali.train.step import backward_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(device)
    optimizer = make_optimizer("sgd", model.parameters(), 0.1, 0.9, 1e-4, device)
    # A scale so large that the scaled gradients overflow: the scaler's normal back-off.
    scaler = torch.amp.GradScaler(
        device.type, init_scale=2.0**120 if autocast_dtype is None else 2.0**40
    )
    x = torch.randn(8, 4, device=device)

    def loss(factor: float = 1.0) -> torch.Tensor:
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            return model(x).square().mean().float() * factor

    before = [p.detach().clone() for p in model.parameters()]
    overflow = backward_step(loss(1e6), optimizer, scaler)  # finite, its scaled gradients not
    assert scaler.get_scale() < (2.0**120 if autocast_dtype is None else 2.0**40), (
        "the scaler did not back off"
    )
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), (
        "the overflowing step was applied"
    )
    optimizer.zero_grad()
    nan = backward_step(loss(float("nan")), optimizer, scaler)
    return bool(overflow.item()), bool(nan.item())


def test_the_scalers_back_off_is_not_a_non_finite_loss():
    """fp16's loss scaler skips steps whose scaled gradients overflow: normal, not counted; a NaN loss is."""
    overflow, nan = _scaler_steps(torch.device("cpu"), None)
    assert (overflow, nan) == (False, True)


@pytest.mark.gpu
def test_the_scalers_back_off_is_not_a_non_finite_loss_in_fp16_on_the_gpu():
    overflow, nan = _scaler_steps(torch.device("cuda"), torch.float16)
    assert (overflow, nan) == (False, True)
