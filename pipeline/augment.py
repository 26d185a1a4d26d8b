"""One random MoCo view, or the evaluation view, of a decoded image: pure functions of DALI nodes.

``augment(image, cfg)`` applies an ``AugmentConfig`` to a decoded HWC uint8 image wherever it
lives (CPU or GPU); probabilistic steps are DALI conditionals (the pipeline is built with
``enable_conditionals=True``), so an operation runs only on the samples that draw it.
``eval_view`` is evaluation's resize and centre crop. Flip and normalisation are fused into
``crop_mirror_normalize``, which keeps the HWC layout that becomes channels-last.
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from .config import VIEW_BRANCHES
from .recipes import AugmentConfig, EvalConfig

__all__ = ["augment", "eval_view"]


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


def _blend(image, other, chosen):
    """``other`` for the samples where ``chosen`` is 1, ``image`` for the others: one arithmetic
    kernel over the whole batch instead of a split and a merge."""
    chosen = _on(chosen, image)
    mixed = image * (1 - chosen) + other * chosen
    return fn.reshape(fn.cast(mixed, dtype=types.UINT8), layout="HWC")


def augment(image, cfg: AugmentConfig, dtype=types.FLOAT16, branches: str = "conditional"):
    """One random MoCo view of a decoded HWC uint8 RGB image: HWC, normalised, ``dtype``.

    ``branches`` (``config.VIEW_BRANCHES``): ``conditional`` splits the batch at each random
    operation (DALI conditionals), ``blend`` runs every operation on every sample and keeps it
    per sample by a 0/1 blend (the blur by its sigma, near 0 where not drawn).
    """
    if branches not in VIEW_BRANCHES:
        raise ValueError(f"branches must be one of {VIEW_BRANCHES}, got {branches!r}")
    image = fn.random_resized_crop(
        image,
        size=[cfg.size, cfg.size],
        random_area=list(cfg.crop_scale),
        random_aspect_ratio=list(cfg.crop_ratio),
        num_attempts=10,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    if branches == "blend":
        image = _blended(image, cfg)
    else:
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


def _blended(image, cfg: AugmentConfig):
    """The recipe's grey, jitter and blur on every sample, each kept by a per-sample coin."""
    gray = cfg.gray_p > 0
    if gray and cfg.gray_before_jitter:
        image = _blend(image, _grayscale(image), _maybe(cfg.gray_p))
    if any(cfg.jitter) and cfg.jitter_p > 0:
        image = _blend(image, _jitter(image, cfg), _maybe(cfg.jitter_p))
    if gray and not cfg.gray_before_jitter:
        image = _blend(image, _grayscale(image), _maybe(cfg.gray_p))
    if cfg.blur_p > 0:
        # A sigma of 1e-3 gives a 3-tap kernel of [0, 1, 0]: the sample passes unchanged.
        drawn = _maybe(cfg.blur_p)
        sigma = drawn * _uniform(*cfg.blur_sigma) + (1 - drawn) * 1e-3
        image = fn.gaussian_blur(image, sigma=sigma)
    return image


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
