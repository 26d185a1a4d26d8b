"""MoCo against a direct transcription of the paper's Algorithm 1, and its call contract."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moco_dali.model.encoders import resnet
from moco_dali.model.moco import MoCo
from tests.model.tiny import TinyEncoder


class Algorithm1:
    """He et al. 2019, Algorithm 1, transcribed: f_q, f_k, a FIFO queue (C x K), float32."""

    def __init__(self, f_q: nn.Module, queue: torch.Tensor, m: float, t: float, lr: float):
        self.f_q = f_q
        self.f_k = copy.deepcopy(f_q)  # f_k.params = f_q.params
        self.queue, self.m, self.t = queue.clone(), m, t
        self.optimizer = torch.optim.SGD(f_q.parameters(), lr=lr)

    def step(self, x_q: torch.Tensor, x_k: torch.Tensor):
        q = F.normalize(self.f_q(x_q), dim=1)  # queries: NxC
        k = F.normalize(self.f_k(x_k), dim=1).detach()  # keys: NxC, no gradient to keys
        n, c = q.shape
        l_pos = torch.bmm(q.view(n, 1, c), k.view(n, c, 1)).view(n, 1)  # positive logits: Nx1
        l_neg = torch.mm(q.view(n, c), self.queue.view(c, -1))  # negative logits: NxK
        logits = torch.cat([l_pos, l_neg], dim=1)
        labels = torch.zeros(n, dtype=torch.long, device=q.device)  # positives are the 0-th
        loss = F.cross_entropy(logits / self.t, labels)
        self.optimizer.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in self.f_q.parameters()]
        self.optimizer.step()  # SGD update: query network
        with torch.no_grad():  # momentum update: key network
            for pk, pq in zip(self.f_k.parameters(), self.f_q.parameters()):
                pk.copy_(self.m * pk + (1 - self.m) * pq)
        self.queue = torch.cat([self.queue, k.t()], dim=1)[:, n:]  # enqueue, dequeue the earliest
        return loss.detach(), grads


@pytest.mark.parametrize("K, batch", [(10, 4), (12, 4), (7, 3)])
def test_moco_equals_algorithm_1(K, batch, device):
    torch.manual_seed(0)
    model = MoCo(TinyEncoder, dim=16, K=K, m=0.9, T=0.07, shuffle="none").to(device)
    reference = Algorithm1(
        copy.deepcopy(model.encoder_q), model.queue.oldest_first().t(), m=0.9, t=0.07, lr=0.5
    )
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    for _step in range(5):
        x_q, x_k = (
            torch.randn(batch, 3, 8, 8, device=device),
            torch.randn(batch, 3, 8, 8, device=device),
        )
        # The reference code updates the key encoder at the start of forward; Algorithm 1
        # at the end of the previous iteration: the same sequence of key encoders.
        logits, labels = model(x_q, x_k)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in model.encoder_q.parameters()]
        optimizer.step()
        ref_loss, ref_grads = reference.step(x_q, x_k)
        # Float32 rounding lets the two trajectories drift apart, to about 1e-5 relative by
        # the fifth step (up to 1e-4 over 90 seeds and shapes), so single gradient elements
        # can differ by more than any tight rtol: each tensor is compared as a whole.
        # T 0.075 instead of 0.07 moves the loss by 10 % and the gradients by 36 % or more.
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-4, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            assert (g - r).norm() <= 1e-3 * r.norm()
        torch.testing.assert_close(model.queue.oldest_first(), reference.queue.t())
    # Algorithm 1 has already applied the momentum update the model applies next step.
    model._momentum_update_key_encoder()
    for pk, rk in zip(model.encoder_k.parameters(), reference.f_k.parameters()):
        torch.testing.assert_close(pk, rk)


def test_construction_matches_the_reference_contract():
    model = MoCo(resnet("resnet18"), dim=128, K=256, mlp=True, shuffle="none")
    head = model.encoder_q.fc
    assert [type(layer) for layer in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (512, 512, 128)
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk) and pq.requires_grad and not pk.requires_grad
    v1 = MoCo(resnet("resnet18"), K=256, shuffle="none")
    assert isinstance(v1.encoder_q.fc, nn.Linear) and v1.encoder_q.fc.out_features == 128
    assert (v1.K, v1.m, v1.T) == (256, 0.999, 0.07)
    assert set(v1.state_dict()) >= {
        "queue.queue",
        "queue.queue_ptr",
        "encoder_q.fc.weight",
        "encoder_k.fc.weight",
    }


@pytest.mark.parametrize("shuffle", ["none", "split"])
def test_key_encoder_gets_no_gradient_and_queue_advances(device, shuffle):
    model = MoCo(TinyEncoder, dim=16, K=20, shuffle=shuffle, num_splits=2).to(device)
    logits, labels = model(
        torch.randn(6, 3, 8, 8, device=device), torch.randn(6, 3, 8, 8, device=device)
    )
    assert logits.shape == (6, 21) and labels.tolist() == [0] * 6
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert int(model.queue.queue_ptr) == 6


def test_logits_are_float32_under_autocast_with_channels_last_inputs(device):
    model = MoCo(resnet("resnet18", small_stem=True), dim=32, K=64, shuffle="split", num_splits=2)
    model = model.to(device, memory_format=torch.channels_last)
    x_q = torch.randn(4, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    x_k = torch.randn(4, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits, labels = model(x_q, x_k)
    assert logits.dtype == torch.float32 and logits.shape == (4, 65)
    assert torch.isfinite(logits).all()
    # Unit vectors over T: every logit lies in [-1/T, 1/T].
    assert logits.abs().max() <= 1 / 0.07 + 1e-3


def test_small_stem():
    encoder = resnet("resnet18", small_stem=True)(num_classes=10)
    assert encoder.conv1.kernel_size == (3, 3) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.maxpool, nn.Identity)
    assert encoder(torch.randn(2, 3, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown encoder"):
        resnet("vgg16")


def test_symmetric_uses_both_views_as_queries(device):
    model = MoCo(TinyEncoder, dim=16, K=40, shuffle="none", symmetric=True).to(device)
    x1, x2 = torch.randn(4, 3, 8, 8, device=device), torch.randn(4, 3, 8, 8, device=device)
    logits, labels = model(x1, x2)
    assert logits.shape == (8, 41) and labels.shape == (8,)
    assert int(model.queue.queue_ptr) == 8
    # The first half is the (x1 query, x2 key) direction.
    q1 = F.normalize(model.encoder_q(x1), dim=1)
    k2 = F.normalize(model.encoder_k(x2), dim=1)
    torch.testing.assert_close(logits[:4, 0], (q1 * k2).sum(1) / 0.07, rtol=1e-5, atol=1e-5)


def test_split_shuffle_unshuffles_keys_back_to_their_queries(device):
    torch.manual_seed(1)
    model = MoCo(TinyEncoder, dim=16, K=32, shuffle="split", num_splits=4).to(device)
    model.encoder_k.eval()  # per-sample BN: shuffling must then change nothing
    x = torch.randn(8, 3, 8, 8, device=device)
    keys = model._keys(x)
    expected = F.normalize(model.encoder_k(x), dim=1)
    torch.testing.assert_close(keys, expected)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="needs torch.distributed"):
        MoCo(TinyEncoder, dim=16, K=32, shuffle="ddp")
    with pytest.raises(ValueError, match="shuffle must be one of"):
        MoCo(TinyEncoder, dim=16, K=32, shuffle="sometimes")
    model = MoCo(TinyEncoder, dim=16, K=4, shuffle="none")
    with pytest.raises(ValueError, match="cannot enqueue 8 keys into a queue of K=4"):
        model(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8))
