"""The pieces MoCo is built from: queue, momentum update, split BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moco_dali.model import momentum
from moco_dali.model.encoders import resnet
from moco_dali.model.queue import KeyQueue
from moco_dali.model.shuffle_bn import SplitBatchNorm2d, batch_shuffle_local, batch_unshuffle_local

# ---------------------------------------------------------------- queue


def test_queue_starts_as_random_unit_vectors_identical_for_a_seed(device):
    a, b, c = (KeyQueue(100, 16, seed=s).to(device) for s in (3, 3, 4))
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(100, device=device))
    assert torch.equal(a.queue, b.queue) and not torch.equal(a.queue, c.queue)
    assert a.queue.shape == (100, 16) and int(a.queue_ptr) == 0


def test_queue_wraps_around_for_any_batch_size(device):
    queue = KeyQueue(5, 2).to(device)
    batches = [torch.full((3, 2), float(i), device=device) for i in range(1, 5)]
    for keys in batches:
        queue.enqueue(keys)
    # 12 keys into 5 slots: the newest five survive, oldest first.
    assert queue.oldest_first()[:, 0].tolist() == [3.0, 3.0, 4.0, 4.0, 4.0]
    assert int(queue.queue_ptr) == 12 % 5


def test_queue_half_precision_storage_reads_back_as_float32(device):
    queue = KeyQueue(8, 4, dtype=torch.float16).to(device)
    keys = F.normalize(torch.randn(8, 4, device=device), dim=1)
    queue.enqueue(keys)
    assert queue.queue.dtype == torch.float16 and queue.keys().dtype == torch.float32
    torch.testing.assert_close(queue.keys(), keys, rtol=1e-3, atol=1e-3)


def test_queue_and_pointer_survive_a_state_dict_round_trip(device):
    queue = KeyQueue(6, 3).to(device)
    queue.enqueue(torch.randn(4, 3, device=device))
    restored = KeyQueue(6, 3, seed=99).to(device)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.queue, queue.queue) and int(restored.queue_ptr) == 4


# ---------------------------------------------------------------- momentum


@pytest.mark.parametrize("implementation", ["foreach_lerp", "foreach", "auto"])
def test_fused_momentum_update_equals_the_per_parameter_formula(implementation, device):
    torch.manual_seed(0)
    query, key = (
        resnet("resnet18")(num_classes=128).to(device),
        resnet("resnet18")(num_classes=128).to(device),
    )
    expected = [
        0.99 * k.detach() + 0.01 * q.detach() for k, q in zip(key.parameters(), query.parameters())
    ]
    buffers = [b.clone() for b in key.buffers()]
    momentum.momentum_update_(key, query, 0.99, implementation)
    for got, want in zip(key.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-7)  # float32 rounding
    # A loop that skipped a tensor would leave it 1 % off; parameters only were touched.
    # Parameters only: the key encoder's BN statistics are its own.
    assert all(torch.equal(a, b) for a, b in zip(key.buffers(), buffers))


def test_flattened_encoders_update_in_one_pass_with_the_per_parameter_formula(device):
    """Each encoder's parameters are views into one buffer (channels-last weights keep their
    strides); the update is one lerp over the two buffers and equals the formula."""
    torch.manual_seed(0)
    query, key = (
        resnet("resnet18")(num_classes=128).to(device).to(memory_format=torch.channels_last)
        for _ in range(2)
    )
    expected = [
        0.99 * k.detach() + 0.01 * q.detach() for k, q in zip(key.parameters(), query.parameters())
    ]
    strides = [p.stride() for p in key.parameters()]
    flat_k, flat_q = momentum.flatten_parameters_(key), momentum.flatten_parameters_(query)
    assert [p.stride() for p in key.parameters()] == strides
    for got in key.parameters():  # every parameter now lives in the one buffer
        assert got.untyped_storage().data_ptr() == flat_k.untyped_storage().data_ptr()
    assert momentum.resolve_implementation("auto", key, query) == "flat_lerp"
    calls = []
    lerp = torch.Tensor.lerp_
    torch.Tensor.lerp_ = lambda self, *a, **k: calls.append(self) or lerp(self, *a, **k)
    try:
        momentum.momentum_update_(key, query, 0.99)
    finally:
        torch.Tensor.lerp_ = lerp
    assert len(calls) == 1 and calls[0] is flat_k
    for got, want in zip(key.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-7)
    # A move afterwards gives the parameters storage of their own: the update falls back.
    moved = key.to(torch.float64)
    assert momentum.resolve_implementation("auto", moved, query) != "flat_lerp"
    assert flat_q.numel() == sum(p.numel() for p in query.parameters())


def test_momentum_extremes_and_errors(device):
    query, key = nn.Linear(4, 4).to(device), nn.Linear(4, 4).to(device)
    before = [p.clone() for p in key.parameters()]
    momentum.momentum_update_(key, query, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(key.parameters(), before))
    momentum.momentum_update_(key, query, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(key.parameters(), query.parameters()))
    with pytest.raises(ValueError, match="momentum must be in"):
        momentum.momentum_update_(key, query, 1.5)
    with pytest.raises(ValueError, match="unknown momentum implementation"):
        momentum.momentum_update_(key, query, 0.5, "magic")
    assert {"loop", "foreach", "foreach_lerp"} <= set(momentum.available_implementations())


# ---------------------------------------------------------------- split BN


def per_split_reference(bn: SplitBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """What split BN means: one ``F.batch_norm`` per contiguous sub-batch, each on its own
    copy of the running statistics, whose average becomes the running statistics."""
    outputs, means, variances = [], [], []
    for chunk in x.chunk(bn.num_splits):
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        outputs.append(
            F.batch_norm(chunk, mean, var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
        )
        means.append(mean)
        variances.append(var)
    with torch.no_grad():
        bn.running_mean.copy_(torch.stack(means).mean(0))
        bn.running_var.copy_(torch.stack(variances).mean(0))
    return torch.cat(outputs)


def _split_bn_pair(device, dtype=torch.float64, channels=6, splits=4):
    torch.manual_seed(0)
    ours = SplitBatchNorm2d(channels, num_splits=splits).to(device, dtype)
    with torch.no_grad():  # parameters and statistics away from their defaults
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
    reference = SplitBatchNorm2d(channels, num_splits=splits).to(device, dtype)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"]
)
def test_split_bn_equals_one_batch_norm_per_sub_batch(device, channels_last, dtype, tolerance):
    ours, reference = _split_bn_pair(device, dtype)
    # Sub-batches with different means and spreads: statistics over the whole batch, or
    # over interleaved samples instead of contiguous slices, are far off.
    x = (
        torch.randn(8, 6, 5, 7, dtype=dtype, device=device)
        * torch.arange(1.0, 9.0, device=device).view(8, 1, 1, 1)
        + torch.arange(8.0, device=device).view(8, 1, 1, 1) * 2
    )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 6, 5, 7, dtype=dtype, device=device)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), per_split_reference(reference, x_ref)
    y_ours.backward(grad)
    y_ref.backward(grad)
    # Rounding alone keeps every figure within 4e-7 (float32) or 2e-15 (float64) of the
    # reference; biased variance in the running update is 1 % off, statistics over the
    # whole batch or over interleaved sub-batches 40 % or more, a gradient missing its
    # mean term 12 %.
    assert (
        y_ours.dtype == dtype and y_ours.stride() == x.stride()
    )  # channels-last stays channels-last, no copy
    for ours_value, reference_value in [
        (y_ours, y_ref),
        (x_ours.grad, x_ref.grad),
        (ours.weight.grad, reference.weight.grad),
        (ours.bias.grad, reference.bias.grad),
        (ours.running_mean, reference.running_mean),
        (ours.running_var, reference.running_var),
    ]:
        assert _relative(ours_value, reference_value) < tolerance
    assert x_ours.grad.stride() == x.stride()
    assert int(ours.num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_split_bn_in_half_precision_keeps_float32_statistics(device, dtype):
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("autocast uses float16 on a GPU only")
    # What autocast hands split BN: the convolution's output in half precision, float32
    # parameters. Outputs and gradients must be as close to the exact values (float64 on
    # the same rounded input) as half-precision rounding allows: measured for bf16 within
    # 0.5 rounding units (2^-8) for outputs and input gradients and 1.2 for the weight
    # gradient, over seeds; statistics and arithmetic in bf16 (a mean ten deviations
    # from zero) put the outputs 7 units off and the running statistics 3e-3.
    ours, exact = _split_bn_pair(device, torch.float32)
    exact.double()
    x = (
        (torch.randn(16, 6, 6, 6, device=device) * 2 + 20)
        .to(dtype)
        .contiguous(memory_format=torch.channels_last)
    )
    grad = torch.randn(16, 6, 6, 6, device=device).to(dtype)
    x_ours, x_exact = x.clone().requires_grad_(), x.double().requires_grad_()
    y_ours, y_exact = ours(x_ours), exact(x_exact)
    y_ours.backward(grad)
    y_exact.backward(grad.double())
    assert y_ours.dtype == dtype and x_ours.grad.dtype == dtype and y_ours.stride() == x.stride()
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for ours_value, exact_value in [(y_ours, y_exact), (x_ours.grad, x_exact.grad)]:
        assert _relative(ours_value, exact_value) < 2 * rounding
    for ours_value, exact_value in [
        (ours.weight.grad, exact.weight.grad),
        (ours.bias.grad, exact.bias.grad),
    ]:
        assert _relative(ours_value, exact_value) < 4 * rounding
    for ours_value, exact_value in [
        (ours.running_mean, exact.running_mean),
        (ours.running_var, exact.running_var),
    ]:
        assert (
            _relative(ours_value, exact_value) < 1e-5
        )  # from float32 statistics of the same values


def test_split_bn_momentum_none_is_the_cumulative_average(device):
    bn = SplitBatchNorm2d(3, num_splits=2, momentum=None).to(device)
    batches = [torch.randn(4, 3, 5, 5, device=device) + i for i in range(3)]
    for x in batches:
        bn(x)
    # BatchNorm's momentum=None: the running mean is the plain average of the batches' means.
    expected = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 3


def test_split_bn_without_affine_or_running_statistics(device):
    x = torch.randn(6, 3, 4, 4, device=device)
    bn = SplitBatchNorm2d(3, num_splits=3, affine=False, track_running_stats=False).to(device)
    y = bn(x.requires_grad_())
    y.sum().backward()
    ref = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.detach().chunk(3)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert x.grad.abs().max() < 1e-4  # a per-sub-batch normalisation removes any constant shift


def test_split_bn_eval_and_errors(device):
    split = SplitBatchNorm2d(3, num_splits=2).to(device)
    x = torch.randn(4, 3, 6, 6, device=device)
    split(x)
    split.eval()
    plain = nn.BatchNorm2d(3).to(device)
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain.eval()(x))
    with pytest.raises(ValueError, match="not divisible by num_splits=2"):
        split.train()(torch.randn(3, 3, 4, 4, device=device))
    with pytest.raises(ValueError, match="single value per channel"):
        split.train()(torch.randn(2, 3, 1, 1, device=device))


def test_local_shuffle_is_undone(device):
    x = torch.arange(10.0, device=device).view(10, 1)
    shuffled, idx = batch_shuffle_local(x)
    assert sorted(shuffled.view(-1).tolist()) == list(range(10))
    assert torch.equal(batch_unshuffle_local(shuffled, idx), x)
