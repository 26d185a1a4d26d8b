"""Encoders from torchvision's ResNet family, with the heads MoCo v1 and v2 put on them.

``resnet(arch, small_stem=...)`` returns a constructor with the signature of
torchvision's (``num_classes``, ``norm_layer``), which is what the reference code
passes to ``MoCo`` as ``base_encoder``; the fc layer is the projection head.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torchvision
from torch import nn

__all__ = ["ARCHS", "resnet", "add_mlp_head", "feature_dim", "backbone"]

ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
)


def _build(
    arch: str, small_stem: bool, num_classes: int = 1000, norm_layer: Optional[Callable] = None
) -> nn.Module:
    kwargs = {"num_classes": num_classes}
    if norm_layer is not None:
        kwargs["norm_layer"] = norm_layer
    encoder = getattr(torchvision.models, arch)(weights=None, **kwargs)
    if small_stem:
        # For 32-64 px images (CIFAR, Fashion-MNIST): a 7x7/2 conv and a max-pool
        # would shrink a 32 px image to 8 px before the first block.
        encoder.conv1 = nn.Conv2d(
            3, encoder.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        encoder.maxpool = nn.Identity()
    return encoder


def resnet(arch: str = "resnet50", *, small_stem: bool = False) -> Callable[..., nn.Module]:
    """A ``base_encoder`` constructor: ``resnet("resnet18", small_stem=True)(num_classes=128)``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown encoder {arch!r}; choose from {', '.join(ARCHS)}")
    return partial(_build, arch, small_stem)


def add_mlp_head(encoder: nn.Module) -> None:
    """MoCo v2's projection: fc becomes Linear(d, d) -> ReLU -> fc (d = backbone width)."""
    width = encoder.fc.weight.shape[1]
    encoder.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), encoder.fc)


def feature_dim(encoder: nn.Module) -> int:
    """Width of the pooled backbone features (2048 for ResNet-50, 512 for ResNet-18)."""
    fc = encoder.fc
    first = fc[0] if isinstance(fc, nn.Sequential) else fc
    return first.in_features


@torch.no_grad()
def backbone(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features (the input of the head), as kNN and linear evaluation use."""
    fc, encoder.fc = encoder.fc, nn.Identity()
    try:
        return encoder(images)
    finally:
        encoder.fc = fc
