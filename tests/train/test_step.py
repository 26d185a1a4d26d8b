"""The training step of ``train.step`` (what moco-train and moco-bench run) under AMP, on every device present."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moco_dali.train.presets import preset
from moco_dali.train.step import (
    amp_dtype,
    backward_step,
    build_model,
    build_optimizer,
    forward_loss,
)


def _step(device: torch.device, amp: str, views: tuple[torch.Tensor, torch.Tensor]):
    """One step from the same initial state; the loss, the gradients, the dtype the encoder computed in."""
    config = preset("v2")
    # Sub-batches of 8: split BN over 2 samples at 1x1 (the last block at 32 px) is
    # so ill-conditioned that rounding alone turns the gradients around.
    config.model.arch, config.model.K, config.model.shuffle, config.model.num_splits = (
        "resnet18",
        256,
        "split",
        2,
    )
    config.data.batch_size = 16
    config.data.views = dataclasses.replace(config.data.views, size=32)
    config.run.amp, config.run.channels_last = amp, True
    torch.manual_seed(0)
    model = build_model(config, device)
    optimizer = build_optimizer(config, model, device)
    dtype = amp_dtype(amp, device)
    # A scale the first step does not overflow: at the default 65536 the scaler's first
    # step backs off (its normal start) and leaves non-finite gradients to compare, as
    # the first GPU run found. Gradients left multiplied by 256 still fail the norm check.
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8, enabled=dtype == torch.float16)
    computed_in = []
    model.encoder_q.fc.register_forward_hook(
        lambda module, inputs, output: computed_in.append(output.dtype)
    )
    torch.manual_seed(1)  # the same key shuffle for every contender
    view_q, view_k = (v.to(device).contiguous(memory_format=torch.channels_last) for v in views)
    loss, logits, _ = forward_loss(model, view_q, view_k, dtype)
    skipped = backward_step(loss, optimizer, scaler)
    assert not scaler.is_enabled() or scaler.get_scale() == 2.0**8, (
        "the scaler backed off: no gradients to compare"
    )
    grads = torch.cat([p.grad.flatten() for p in model.encoder_q.parameters()])
    return loss.detach(), logits, grads, bool(skipped), computed_in[0]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_an_amp_step_follows_the_float32_step(device, amp):
    if amp == "fp16" and device.type == "cpu":
        pytest.skip(
            "fp16 autocast with a gradient scaler is for GPUs (run.amp refuses it on a CPU)"
        )
    generator = torch.Generator().manual_seed(2)
    views = (
        torch.randn(16, 3, 32, 32, generator=generator),
        torch.randn(16, 3, 32, 32, generator=generator),
    )
    loss, logits, grads, skipped, computed_in = _step(device, amp, views)
    loss_fp32, _, grads_fp32, _, _ = _step(device, "none", views)
    assert computed_in == amp_dtype(amp, device) and logits.dtype == torch.float32 and not skipped
    # At initialisation the contrastive gradient is a small difference of large terms:
    # bf16 rounding moves the loss by under 0.4 % but turns the gradient of a ResNet-18
    # by a cosine of 0.86-0.89 (measured over seeds on a CPU) while keeping its norm
    # within 3 %. Gradients left multiplied by fp16's loss scale (256 here), or of another
    # step's views (cosine near 0), are far outside.
    assert abs(loss.item() - loss_fp32.item()) < 0.02 * abs(loss_fp32.item())
    cosine = torch.nn.functional.cosine_similarity(grads.double(), grads_fp32.double(), dim=0)
    assert cosine > 0.7 and 0.9 < float(grads.norm() / grads_fp32.norm()) < 1.1
