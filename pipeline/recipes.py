"""MoCo's view recipes as data: every parameter of the random views, the presets, the evaluation view.

``AugmentConfig`` is one recipe in torchvision's units (hue in turns); ``v1()``, ``v2()`` and
``cifar()`` are the references' recipes operation for operation (docs/design.md says how each
step matches torchvision). No DALI here: the training configuration, the torchvision
reference and the commands read recipes without loading it; ``augment`` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "EvalConfig",
    "v1",
    "v2",
    "cifar",
    "custom",
    "preset",
    "recipe_names",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _range(name: str, value, low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(
            f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {tuple(value)}"
        )


def _probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class AugmentConfig:
    """One MoCo view recipe. Fields are in torchvision's units (hue as a fraction of a turn)."""

    size: int = 224
    """Output side in px (square)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area fraction range."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect ratio (w/h) range, drawn log-uniformly."""
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4)
    """ColorJitter strengths: brightness, contrast, saturation, hue (hue in turns, <= 0.5)."""
    jitter_p: float = 1.0
    """Probability that ColorJitter is applied."""
    gray_p: float = 0.2
    """RandomGrayscale probability."""
    gray_before_jitter: bool = True
    """v1 converts to grey before jittering; v2 jitters first."""
    hue_space: str = "hsv"
    """"hsv": shift hue in HSV exactly as torchvision; "yiq": DALI's hue rotation, cheaper on a CPU, not exact."""
    blur_p: float = 0.0
    """Probability of Gaussian blur."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range in px."""
    flip_p: float = 0.5
    """Horizontal flip probability."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Normalisation mean per RGB channel, in [0, 1] units."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Normalisation std per RGB channel, in [0, 1] units."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be a positive number of px, got {self.size}")
        _range("crop_scale", self.crop_scale, 1e-6, 1.0)
        _range("crop_ratio", self.crop_ratio, 1e-3, 1e3)
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(
                f"jitter is (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {self.jitter}"
            )
        if self.hue_space not in ("hsv", "yiq"):
            raise ValueError(f"hue_space must be 'hsv' or 'yiq', got {self.hue_space!r}")
        for name in ("jitter_p", "gray_p", "blur_p", "flip_p"):
            _probability(name, getattr(self, name))
        _range("blur_sigma", self.blur_sigma, 1e-6, 100.0)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std > 0")


@dataclass(frozen=True)
class EvalConfig:
    """The deterministic view of evaluation: shorter side to ``resize``, centre crop ``size``."""

    resize: int = 256
    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not 1 <= self.size <= self.resize:
            raise ValueError(f"eval crop {self.size} must be in 1..resize ({self.resize})")


def v1(size: int = 224) -> AugmentConfig:
    """MoCo v1: crop (0.2, 1) -> grayscale 0.2 -> jitter (0.4, 0.4, 0.4, 0.4) always -> flip."""
    return AugmentConfig(size=size)


def v2(size: int = 224) -> AugmentConfig:
    """MoCo v2: crop (0.2, 1) -> jitter (0.4, 0.4, 0.4, 0.1) p 0.8 -> grayscale 0.2 -> blur p 0.5 -> flip."""
    return AugmentConfig(
        size=size, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_before_jitter=False, blur_p=0.5
    )


def cifar(size: int = 32) -> AugmentConfig:
    """MoCo's CIFAR-10 demonstration: v2's views without the blur, which ImageNet's 0.1-2 px sigma would make a smear at 32 px."""
    return replace(v2(size), blur_p=0.0)


def custom(base: AugmentConfig | None = None, **fields: Any) -> AugmentConfig:
    """Any recipe: v2's fields (or ``base``'s) overridden by ``fields``."""
    unknown = set(fields) - set(AugmentConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown augmentation fields: {', '.join(sorted(unknown))}")
    return replace(
        base or v2(), **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    )


def recipe_names() -> tuple[str, ...]:
    """The names ``preset`` knows."""
    return tuple(_RECIPES)


def preset(name: str, size: int = 224) -> AugmentConfig:
    """The recipe called ``name`` (``"v1"``, ``"v2"`` or ``"cifar"``) at ``size`` px."""
    if name not in _RECIPES:
        raise ValueError(f"unknown augmentation preset {name!r}; choose v1, v2 or cifar")
    return _RECIPES[name](size)


_RECIPES = {"v1": v1, "v2": v2, "cifar": cifar}
