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

def test_queue_starts_as_random_unit_vectors_identical_for_a_seed():
    a, b, c = KeyQueue(100, 16, seed=3), KeyQueue(100, 16, seed=3), KeyQueue(100, 16, seed=4)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(100))
    assert torch.equal(a.queue, b.queue) and not torch.equal(a.queue, c.queue)
    assert a.queue.shape == (100, 16) and int(a.queue_ptr) == 0


def test_queue_wraps_around_for_any_batch_size():
    queue = KeyQueue(5, 2)
    batches = [torch.full((3, 2), float(i)) for i in range(1, 5)]
    for keys in batches:
        queue.enqueue(keys)
    # 12 keys into 5 slots: the newest five survive, oldest first.
    assert queue.oldest_first()[:, 0].tolist() == [3.0, 3.0, 4.0, 4.0, 4.0]
    assert int(queue.queue_ptr) == 12 % 5


def test_queue_half_precision_storage_reads_back_as_float32():
    queue = KeyQueue(8, 4, dtype=torch.float16)
    keys = F.normalize(torch.randn(8, 4), dim=1)
    queue.enqueue(keys)
    assert queue.queue.dtype == torch.float16 and queue.keys().dtype == torch.float32
    torch.testing.assert_close(queue.keys(), keys, rtol=1e-3, atol=1e-3)


def test_queue_and_pointer_survive_a_state_dict_round_trip():
    queue = KeyQueue(6, 3)
    queue.enqueue(torch.randn(4, 3))
    restored = KeyQueue(6, 3, seed=99)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.queue, queue.queue) and int(restored.queue_ptr) == 4


# ---------------------------------------------------------------- momentum

@pytest.mark.parametrize("implementation", ["foreach_lerp", "foreach", "auto"])
def test_fused_momentum_update_equals_the_per_parameter_formula(implementation):
    torch.manual_seed(0)
    query, key = resnet("resnet18")(num_classes=128), resnet("resnet18")(num_classes=128)
    expected = [0.99 * k.detach() + 0.01 * q.detach() for k, q in zip(key.parameters(), query.parameters())]
    buffers = [b.clone() for b in key.buffers()]
    momentum.momentum_update_(key, query, 0.99, implementation)
    for got, want in zip(key.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-7)  # float32 rounding
    # Parameters only: the key encoder's BN statistics are its own.
    assert all(torch.equal(a, b) for a, b in zip(key.buffers(), buffers))


def test_momentum_extremes_and_errors():
    query, key = nn.Linear(4, 4), nn.Linear(4, 4)
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


def test_momentum_schedule():
    assert momentum.momentum_at(500, 1000, 0.99) == 0.99
    assert momentum.momentum_at(0, 1000, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum.momentum_at(500, 1000, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum.momentum_at(1000, 1000, 0.99, "cosine") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown momentum schedule"):
        momentum.momentum_at(0, 10, 0.99, "linear")


# ---------------------------------------------------------------- split BN

def test_split_bn_normalises_each_sub_batch_with_its_own_statistics():
    torch.manual_seed(0)
    split = SplitBatchNorm2d(4, num_splits=2)
    plain = nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 5, 5) + torch.arange(6.0).view(6, 1, 1, 1)  # sub-batches differ
    out = split(x)
    ref = torch.cat([plain.train()(x[:3]), nn.BatchNorm2d(4).train()(x[3:])])
    torch.testing.assert_close(out, ref)
    expected_mean = 0.1 * torch.stack([x[:3].mean(dim=(0, 2, 3)), x[3:].mean(dim=(0, 2, 3))]).mean(0)
    torch.testing.assert_close(split.running_mean, expected_mean)
    assert int(split.num_batches_tracked) == 1


def test_split_bn_channels_last_eval_and_errors():
    split = SplitBatchNorm2d(3, num_splits=2)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(split(x.contiguous(memory_format=torch.channels_last)), split(x))
    split.eval()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain.eval()(x))
    with pytest.raises(ValueError, match="not divisible by num_splits=2"):
        split.train()(torch.randn(3, 3, 4, 4))


def test_local_shuffle_is_undone():
    x = torch.arange(10.0).view(10, 1)
    shuffled, idx = batch_shuffle_local(x)
    assert sorted(shuffled.view(-1).tolist()) == list(range(10))
    assert torch.equal(batch_unshuffle_local(shuffled, idx), x)
