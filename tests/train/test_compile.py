"""The compiled step (run.compile): the eager step's numbers, checkpoints that load both ways, one
compilation, and a steady step that never waits on the host.

On the CPU the encoders are compiled with the aot_eager backend: dynamo's capture and
AOTAutograd's functionalisation (where a compiled step goes wrong: BN statistics, views, in-place
updates) with eager kernels, in seconds. Inductor's generated kernels are checked the same way
on a GPU (the gpu-marked test), where a compile is quick and the kernels are the ones that run.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from moco_dali.train.presets import resolve
from moco_dali.train.step import (
    amp_dtype,
    backward_step,
    build_model,
    build_optimizer,
    compile_encoders,
    forward_loss,
)

VARIANTS = {
    "v1": ("v1", {}),
    "v2": ("v2", {}),
    "symmetric": ("v2", {"model.symmetric": True}),
    "split BN": ("v2", {"model.shuffle": "split", "model.num_splits": 2}),
}
TINY = {
    "model.arch": "resnet18",
    "model.K": 64,
    "data.batch_size": 8,
    "data.views.size": 32,
    "run.channels_last": False,
    "run.device": "cpu",
    "run.amp": "none",
}


def _config(variant: str, **keys):
    preset, extra = VARIANTS[variant]
    shuffle = {"model.shuffle": "none"} if variant != "split BN" else {}
    return resolve(preset, None, {**TINY, **shuffle, **extra, **keys})


def _one_step(config, device, views, compiled: bool):
    torch.manual_seed(0)
    model = build_model(config, device)
    if compiled:
        compile_encoders(model, config)
    optimizer = build_optimizer(config, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    torch.manual_seed(1)  # the same key shuffle in both
    loss, _, _ = forward_loss(model, *views, amp_dtype(config.run.amp, device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.encoder_q.parameters()])
    optimizer.step()
    scaler.update()
    return loss.detach(), grads, model


def _views(device):
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(8, 3, 32, 32, generator=g).to(device) for _ in range(2))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_compiled_step_gives_the_eager_steps_loss_and_gradients(variant):
    """Loss, query gradients, key encoder, queue and BN statistics after one step: the same
    within 1e-5 (relative; float32 on the CPU)."""
    device = torch.device("cpu")
    config = _config(variant, **{"run.compile": True, "run.compile_backend": "aot_eager"})
    views = _views(device)
    loss_e, grads_e, eager = _one_step(config, device, views, compiled=False)
    loss_c, grads_c, compiled = _one_step(config, device, views, compiled=True)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_c, grads_e, rtol=1e-5, atol=1e-6)
    state_e, state_c = eager.state_dict(), compiled.state_dict()
    assert list(state_c) == list(state_e)  # compiled in place: the eager names
    for name, value in state_e.items():
        torch.testing.assert_close(state_c[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoints_of_compiled_and_eager_runs_load_into_each_other():
    device = torch.device("cpu")
    config = _config("v2", **{"run.compile": True, "run.compile_backend": "aot_eager"})
    _, _, compiled = _one_step(config, device, _views(device), compiled=True)
    eager = build_model(config, device)
    eager.load_state_dict(compiled.state_dict())  # strict: every key and shape
    again = compile_encoders(build_model(config, device), config)
    again.load_state_dict(eager.state_dict())
    x = _views(device)[0]
    with torch.no_grad():
        torch.testing.assert_close(
            again.eval().encoder_q(x), eager.eval().encoder_q(x), rtol=1e-5, atol=1e-6
        )


def test_the_compiled_encoders_compile_once_then_are_reused():
    """Three more steps at other rates and momenta compile nothing new."""
    from torch._dynamo.utils import counters

    device = torch.device("cpu")
    config = _config("v2", **{"run.compile": True, "run.compile_backend": "aot_eager"})
    torch.manual_seed(0)
    model = compile_encoders(build_model(config, device), config)
    optimizer = build_optimizer(config, model, device)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step(lr: float, m: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.m = m
        loss, _, _ = forward_loss(model, *_views(device), None)
        optimizer.zero_grad(set_to_none=True)
        backward_step(loss, optimizer, scaler)

    step(0.1, 0.99)
    compiled = copy.deepcopy(dict(counters["stats"]))
    for lr, m in ((0.05, 0.995), (0.01, 0.999), (0.0, 1.0)):
        step(lr, m)
    assert compiled["unique_graphs"] >= 2  # both encoders were compiled
    assert dict(counters["stats"]) == compiled


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inductor_on_the_gpu_gives_the_eager_steps_loss(variant):
    """Inductor's generated kernels in bf16: the loss within 2% and the query gradients within a
    cosine similarity of 0.99 of the eager step's (kernels reorder sums; bf16 keeps 8 bits)."""
    device = torch.device("cuda")
    config = _config(variant, **{"run.compile": True, "run.device": "cuda"})
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, amp="bf16"))
    views = _views(device)
    loss_e, grads_e, _ = _one_step(config, device, views, compiled=False)
    loss_c, grads_c, _ = _one_step(config, device, views, compiled=True)
    assert abs(loss_c.item() - loss_e.item()) <= 0.02 * abs(loss_e.item())
    assert torch.nn.functional.cosine_similarity(grads_c, grads_e, dim=0) > 0.99
