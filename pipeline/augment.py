"""MoCo's augmentation recipes: the presets and the pure DALI functions that apply them.

``AugmentConfig`` holds every parameter of a recipe; ``v1()`` and ``v2()`` return the
reference recipes of DESIGN.md operation for operation, ``custom(**fields)`` any
other. ``augment(image, cfg)`` is one random view of a decoded HWC uint8 image, a pure
function of DALI data nodes that runs wherever the image lives (CPU or GPU);
``eval_view`` is the deterministic resize plus centre crop of evaluation.

Probabilistic steps are DALI conditionals (the pipeline is built with
``enable_conditionals=True``), so an operation runs only on the samples that draw it
instead of on all of them followed by a blend.

Faithfulness to torchvision, by step:

* RandomResizedCrop: area fraction uniform in ``crop_scale``, aspect ratio
  log-uniform in ``crop_ratio``, 10 attempts then a centre crop, bilinear with
  antialiasing: DALI's ``random_resized_crop`` draws the same way.
* ColorJitter: brightness, contrast and saturation factors uniform in
  [max(0, 1 - s), 1 + s], hue uniform in [-h, h] of a turn. Contrast blends with the
  mean grey of the image, as
  torchvision does (not with mid-grey, DALI's default). Brightness and contrast
  commute in this form; saturation and hue follow in a fixed order where
  torchvision draws a random order: the distributions of the factors are the same.
  Saturation is DALI's ``hsv`` (a scaling of chroma about the luma, which is exactly
  torchvision's blend with the grey image); hue is shifted in HSV space with DALI
  arithmetic, exactly as torchvision does and in its unit (turns), because DALI's
  own hue operator takes degrees and rotates in YIQ space, which moves some colours'
  HSV hue a third further than asked (measured by the parity tests).
* Grayscale: ITU-R 601 luma (0.299, 0.587, 0.114) replicated to three channels, so
  a grey view has R = G = B exactly, as torchvision's.
* Gaussian blur: sigma uniform in ``blur_sigma``.
* Flip and normalisation are fused into ``crop_mirror_normalize``, which also casts
  to float16 or float32 and keeps the HWC layout that becomes channels-last.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from nvidia.dali import fn, types
from nvidia.dali import math as dmath

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
    "augment",
    "eval_view",
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def preset(name: str, size: int = 224, **fields: Any) -> AugmentConfig:
    """``"v1"``, ``"v2"``, ``"cifar"`` or ``"custom"`` (v2 overridden by ``fields``)."""
    if name == "v1":
        base = v1(size)
    elif name in ("v2", "custom"):
        base = v2(size)
    elif name == "cifar":
        base = cifar(size)
    else:
        raise ValueError(f"unknown augmentation preset {name!r}; choose v1, v2, cifar or custom")
    return custom(base, **fields) if fields else base


# ----------------------------------------------------------------------- DALI functions


def _uniform(low: float, high: float):
    return fn.random.uniform(range=[low, high]) if high > low else float(low)


def _grayscale(image):
    # ITU-R 601 luma in one channel, then repeated: R = G = B exactly, as torchvision's
    # grey image. fn.hsv with saturation 0 left channels a level apart in a third of
    # the pixels (its HSV round trip rounds each channel on its own).
    luma = fn.color_space_conversion(image, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(luma, luma, luma, axis=2)


def _hue_shift(image, shift):
    """Add ``shift`` (a DataNode, in turns) to the HSV hue of a uint8 RGB image, as torchvision does."""
    r, g, b = image[:, :, 0], image[:, :, 1], image[:, :, 2]
    v = dmath.max(dmath.max(r, g), b)
    delta = v - dmath.min(dmath.min(r, g), b)
    inverse = 1.0 / (delta + (delta == 0))  # no chroma, no hue: avoid 0 / 0
    # Hue in sixths of a turn (the channel holding the maximum decides the sector),
    # shifted, plus 6 so that the offsets below stay positive. DALI fuses each
    # channel's expression into one operator; materialising shared parts was slower.
    h6 = (
        (r == v) * ((g * inverse) - (b * inverse))
        + ((g == v) & (r != v)) * (2.0 + (b * inverse) - (r * inverse))
        + ((b == v) & (g != v) & (r != v)) * (4.0 + (r * inverse) - (g * inverse))
        + shift * 6.0
        + 6.0
    )
    channels = []
    for n in (
        5.0,
        3.0,
        1.0,
    ):  # HSV -> RGB: c = V - V S clamp(min(k, 4 - k), 0, 1), k = (n + H') mod 6
        k = h6 + n
        k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))
        channels.append(v - delta * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    # The cast rounds to nearest; slicing and arithmetic drop the layout, and the
    # conditional merge needs it back.
    return fn.reshape(fn.cast(fn.stack(*channels, axis=2), dtype=types.UINT8), layout="HWC")


def _on(node, like):
    """``node`` on the device of ``like``: arithmetic with GPU images takes GPU operands."""
    # A constant (a factor whose range is one point: max(0.0, 1 - 0) is the int 1) stays
    # a Python number: DALI broadcasts it on either device. Seen on the first GPU run.
    return (
        node.gpu()
        if getattr(like, "device", "cpu") == "gpu" and not isinstance(node, (int, float))
        else node
    )


def _jitter(image, cfg: AugmentConfig):
    b, c, s, h = cfg.jitter
    if b > 0 or c > 0:
        # Contrast blends with the mean grey of the image, as torchvision does, and
        # brightness scales: b * (m + c * (x - m)) is both in either order. The mean
        # of the luma is the luma of the channel means: one reduction.
        means = fn.reductions.mean(image, axes=[0, 1], dtype=types.FLOAT)
        grey = 0.299 * means[0] + 0.587 * means[1] + 0.114 * means[2]
        brightness, contrast = _uniform(max(0.0, 1 - b), 1 + b), _uniform(max(0.0, 1 - c), 1 + c)
        if getattr(image, "device", "cpu") == "gpu":
            # Argument inputs must live on the CPU and the mean grey is on the GPU:
            # the same formula as brightness_contrast, as one fused arithmetic kernel.
            mixed = _on(brightness, image) * (grey + _on(contrast, image) * (image - grey))
            # DALI's cast rounds to nearest and saturates, as the uint8 result needs.
            image = fn.reshape(fn.cast(mixed, dtype=types.UINT8), layout="HWC")
        else:
            image = fn.brightness_contrast(
                image, brightness=brightness, contrast=contrast, contrast_center=grey
            )
    saturation = _uniform(max(0.0, 1 - s), 1 + s)
    if cfg.hue_space == "yiq":
        # One pass for both; DALI's hue is in degrees, torchvision's in turns.
        return (
            fn.hsv(image, saturation=saturation, hue=_uniform(-h * 360.0, h * 360.0))
            if s > 0 or h > 0
            else image
        )
    if s > 0:
        image = fn.hsv(image, saturation=saturation)
    if h > 0:
        image = _hue_shift(image, _on(_uniform(-h, h), image))
    return image


def _maybe(p: float):
    return fn.random.coin_flip(probability=p)


def augment(image, cfg: AugmentConfig, dtype=types.FLOAT16):
    """One random MoCo view of a decoded HWC uint8 RGB image: HWC, normalised, ``dtype``."""
    image = fn.random_resized_crop(
        image,
        size=[cfg.size, cfg.size],
        random_area=list(cfg.crop_scale),
        random_aspect_ratio=list(cfg.crop_ratio),
        num_attempts=10,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    if cfg.gray_before_jitter and cfg.gray_p > 0:
        if _maybe(cfg.gray_p):
            image = _grayscale(image)
    if any(cfg.jitter) and cfg.jitter_p > 0:
        if _maybe(cfg.jitter_p):
            image = _jitter(image, cfg)
    if not cfg.gray_before_jitter and cfg.gray_p > 0:
        if _maybe(cfg.gray_p):
            image = _grayscale(image)
    if cfg.blur_p > 0:
        if _maybe(cfg.blur_p):
            image = fn.gaussian_blur(image, sigma=_uniform(*cfg.blur_sigma))
    return fn.crop_mirror_normalize(
        image,
        dtype=dtype,
        output_layout="HWC",
        mean=[255.0 * m for m in cfg.mean],
        std=[255.0 * s for s in cfg.std],
        mirror=_maybe(cfg.flip_p) if cfg.flip_p > 0 else 0,
    )


def eval_view(image, cfg: EvalConfig, dtype=types.FLOAT16):
    """Resize the shorter side to ``cfg.resize``, centre-crop ``cfg.size``, normalise."""
    image = fn.resize(
        image, resize_shorter=cfg.resize, interp_type=types.INTERP_LINEAR, antialias=True
    )
    return fn.crop_mirror_normalize(
        image,
        dtype=dtype,
        output_layout="HWC",
        crop=[cfg.size, cfg.size],
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        mean=[255.0 * m for m in cfg.mean],
        std=[255.0 * s for s in cfg.std],
    )
