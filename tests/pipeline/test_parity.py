"""Statistical parity of the DALI recipes with the torchvision reference, over thousands of draws.

Each test feeds both pipelines one probe image, many times, and recovers the random
parameter a step drew from the views (crop box, flip, grey, jitter factor, blur),
then compares the distributions. Each tolerance is at least five standard deviations
of its statistic from seed to seed (what another DALI or torch version's random stream
looks like), and the broken variant named next to it, measured with the same draws,
lands well outside: scale (0.08, 1) instead of (0.2, 1), hue in the wrong unit
(degrees for turns or turns for degrees), p 0.5 instead of 0.2.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from moco_dali.pipeline.loader import ViewLoader
from moco_dali.pipeline.recipes import AugmentConfig, custom, v1, v2
from moco_dali.pipeline.reference import reference_transform
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import loader_config, write_files

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255
W, H = 256, 192
COPIES = 1000  # two views each: 2000 draws per pipeline


def coordinates() -> np.ndarray:
    """R encodes x and G encodes y, so a view's corners tell where its crop came from."""
    y, x = np.mgrid[0:H, 0:W]
    return (
        np.stack([x * 255 / (W - 1), y * 255 / (H - 1), np.full_like(x, 40.0)], -1)
        .round()
        .astype(np.uint8)
    )


def uniform(rgb) -> np.ndarray:
    return np.tile(np.array(rgb, np.uint8), (H, W, 1))


def squares() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return np.repeat(
        (np.where((x // 32 + y // 32) % 2, 192, 64)).astype(np.uint8)[..., None], 3, -1
    )


PROBES = {
    "coordinates": coordinates,
    "grey": lambda: uniform((128, 128, 128)),
    "orange": lambda: uniform((200, 100, 50)),
    "squares": squares,
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, tuple[Path, Image.Image]]:
    root = tmp_path_factory.mktemp("probes")
    made = {}
    for name, make in PROBES.items():
        data = simplejpeg.encode_jpeg(make(), 100, "RGB", "444")
        write_files(root / name, {f"{i:05d}.jpg": data for i in range(COPIES)})
        build(
            [str(root / name)], root / f"{name}-shards", BuildSettings(), workers=0, progress=False
        )
        made[name] = (root / f"{name}-shards", Image.open(io.BytesIO(data)).convert("RGB"))
    return made


def dali_views(
    folder: Path,
    cfg: AugmentConfig,
    device: torch.device,
    epochs: int = 1,
    branches: str = "conditional",
) -> np.ndarray:
    """Both views of every image as HWC pixel values, made on ``device`` (a GPU: mixed decoder,
    GPU operators), the random operations reaching their samples by ``branches``."""
    loader = ViewLoader(
        folder,
        cfg,
        loader_config(
            batch_size=250, dtype="float32", threads=2, shuffle_buffer=64, view_branches=branches
        ),
        device_id=device.index if device.type == "cuda" else None,
    )
    views = [v.cpu() for _ in range(epochs) for b in loader for v in (b.view_q, b.view_k)]
    return torch.cat(views).permute(0, 2, 3, 1).numpy() * STD + MEAN


def reference_views(image: Image.Image, cfg: AugmentConfig, n: int = 2 * COPIES) -> np.ndarray:
    torch.manual_seed(0)
    transform = reference_transform(cfg)
    return np.stack([transform(image).permute(1, 2, 0).numpy() for _ in range(n)]) * STD + MEAN


def crop_parameters(views: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Area fraction, log aspect ratio and flip of each view of the coordinate probe."""
    r_first, r_last = views[:, :, 0, 0].mean(1), views[:, :, -1, 0].mean(1)
    g_first, g_last = views[:, 0, :, 1].mean(1), views[:, -1, :, 1].mean(1)
    flipped = r_last < r_first
    # Output pixel centres span (size - 1) / size of the crop.
    width = np.abs(r_last - r_first) * (W - 1) / 255 * size / (size - 1)
    height = np.abs(g_last - g_first) * (H - 1) / 255 * size / (size - 1)
    return {
        "area": width * height / (W * H),
        "log_ratio": np.log(width / height),
        "flipped": flipped,
    }


def reference_crops(
    image: Image.Image, cfg: AugmentConfig, n: int = 20_000
) -> dict[str, np.ndarray]:
    """Area fraction and log aspect ratio of ``n`` boxes from the reference recipe's own crop sampler.

    Drawn without making views, so ten times the draws cost less than the views would,
    and the comparison's noise is DALI's alone.
    """
    torch.manual_seed(0)
    crop = reference_transform(cfg).transforms[0]
    boxes = np.array(
        [crop.get_params(image, crop.scale, crop.ratio) for _ in range(n)], dtype=np.float64
    )
    height, width = boxes[:, 2], boxes[:, 3]
    return {"area": width * height / (W * H), "log_ratio": np.log(width / height)}


CROP_ONLY = dict(jitter=(0, 0, 0, 0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, size=32)


@pytest.mark.parametrize("scale, ratio", [((0.2, 1.0), (3 / 4, 4 / 3)), ((0.08, 0.5), (0.5, 2.0))])
def test_crop_area_aspect_and_flip_match(probes, device, scale, ratio):
    folder, image = probes["coordinates"]
    cfg = custom(crop_scale=scale, crop_ratio=ratio, **CROP_ONLY)
    # 4000 DALI draws; at 32 px the boxes read back from the views agree with the sampled ones.
    ours, theirs = (
        crop_parameters(dali_views(folder, cfg, device, epochs=2), cfg.size),
        reference_crops(image, cfg),
    )
    # Scale (0.08, 1) instead of (0.2, 1) moves the mean by 0.06 and the 0.1 quantile by 0.1.
    assert abs(ours["area"].mean() - theirs["area"].mean()) < 0.02
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(ours["area"], q) - np.quantile(theirs["area"], q)) < 0.03
    # A ratio range off centre or narrowed (square roots of its ends) moves these by 0.08 or more.
    assert abs(ours["log_ratio"].mean() - theirs["log_ratio"].mean()) < 0.03
    assert abs(ours["log_ratio"].std() - theirs["log_ratio"].std()) < 0.03
    assert abs(ours["flipped"].mean() - 0.5) < 0.05  # flip p 0.4 or 0.6 would be 0.1 off


# The view graph without conditionals (every operation on every sample, kept by a 0/1 blend) must
# make the same views: the tests of the operations drawn with a probability run on both graphs.
BRANCHES = pytest.mark.parametrize("branches", ["conditional", "blend"])


@BRANCHES
@pytest.mark.parametrize("make", [v1, v2])
def test_grayscale_fraction_matches(probes, device, make, branches):
    folder, image = probes["coordinates"]
    cfg = make(size=32)

    def spread(views):
        return (views.max(-1) - views.min(-1)).max(axis=(1, 2))

    # DALI's grey views keep a channel spread of up to 3 from rounding, coloured ones have 20 or more.
    ours = (spread(dali_views(folder, cfg, device, branches=branches)) < 10).mean()
    theirs = (spread(reference_views(image, cfg)) < 10).mean()
    assert abs(ours - 0.2) < 0.06 and abs(theirs - 0.2) < 0.06  # p 0.5 would be 0.3 off


@BRANCHES
@pytest.mark.parametrize("make, p", [(v1, 1.0), (v2, 0.8)])
def test_brightness_factor_range_matches(probes, device, make, p, branches):
    # On a uniform grey image only brightness changes anything: value / stored value
    # is the factor (the stored JPEG decodes to about 128).
    folder, image = probes["grey"]
    stored = np.asarray(image, dtype=np.float64).mean()
    cfg = custom(make(size=16), gray_p=0.0, blur_p=0.0)
    ours = dali_views(folder, cfg, device, branches=branches).mean(axis=(1, 2, 3)) / stored
    theirs = reference_views(image, cfg).mean(axis=(1, 2, 3)) / stored
    for factors in (ours, theirs):
        # Within a few uint8 steps of 0.6 and 1.4 however the factor is rounded; 0.5 would not be.
        assert 0.57 < factors.min() < 0.63 and 1.37 < factors.max() < 1.43
        # Left alone with 1 - p (plus the 1 % that round to no change): jitter_p ignored would be 0.19 off.
        assert abs(np.mean(np.abs(factors - 1) < 0.003) - (1 - p)) < 0.07
    assert abs(ours.std() - theirs.std()) < 0.025


def test_contrast_factor_range_matches(probes, device):
    folder, image = probes["squares"]
    cfg = custom(
        jitter=(0, 0.4, 0, 0), jitter_p=1.0, gray_p=0.0, blur_p=0.0, crop_scale=(0.5, 1.0), size=64
    )

    def factor(views):
        return np.percentile(views[..., 0], 99, axis=(1, 2)) - np.percentile(
            views[..., 0], 1, axis=(1, 2)
        )

    views = dali_views(folder, cfg, device)
    ours, theirs = factor(views) / 128, factor(reference_views(image, cfg)) / 128
    for q in (0.05, 0.95):
        assert (
            abs(np.quantile(ours, q) - np.quantile(theirs, q)) < 0.05
        )  # strength 0.3 or 0.5 would be 0.08 off
    # The mean, not the median: the median moves in whole 1/128 steps and varies twice as much.
    assert abs(ours.mean() - theirs.mean()) < 0.05
    assert ours.min() > 0.55 and ours.max() < 1.45
    # Contrast keeps the mean grey (within 3 of it here); the brightness factor in its place moves it by 50.
    assert np.abs(views[..., 0].mean(axis=(1, 2)) - 128).max() < 15


def test_saturation_factor_range_matches(probes, device):
    folder, image = probes["orange"]
    cfg = custom(jitter=(0, 0, 0.4, 0), jitter_p=1.0, gray_p=0.0, blur_p=0.0, size=16)

    def factor(views):
        return (views[..., 0] - views[..., 2]).mean(axis=(1, 2)) / 150

    ours, theirs = (
        factor(dali_views(folder, cfg, device, epochs=2)),
        factor(reference_views(image, cfg)),
    )
    for q in (0.02, 0.98):
        assert (
            abs(np.quantile(ours, q) - np.quantile(theirs, q)) < 0.04
        )  # strength 0.3 or 0.5 would be 0.09 off
    # The factor is uniform in [0.6, 1.4]: mean 1. The mean varies half as much as the
    # median; a log-uniform factor would be 0.056 off.
    assert abs(ours.mean() - 1) < 0.03


def hue_shift(views: np.ndarray) -> np.ndarray:
    base = colorsys.rgb_to_hsv(200 / 255, 100 / 255, 50 / 255)[0]
    hues = np.array([colorsys.rgb_to_hsv(*(v.mean(axis=(0, 1)) / 255))[0] for v in views])
    return (hues - base + 0.5) % 1.0 - 0.5  # signed, in turns


@pytest.mark.parametrize("hue", [0.4, 0.1])
def test_hue_shift_range_matches(probes, device, hue):
    folder, image = probes["orange"]
    cfg = custom(jitter=(0, 0, 0, hue), jitter_p=1.0, gray_p=0.0, blur_p=0.0, size=16)
    ours, theirs = (
        hue_shift(dali_views(folder, cfg, device)),
        hue_shift(reference_views(image, cfg, n=600)),
    )
    # torchvision truncates the shift to whole 1/255 turns (up to 0.004 short), so the extents
    # agree to a relative 0.05; the tolerance is 0.2. Degrees read as turns spread the shifts
    # round the circle (0.45 at the 0.9 quantile), turns read as degrees leave them near 0, and
    # DALI's YIQ rotation overshoots the 0.99 quantile of 0.1 by 0.04.
    for q in (0.9, 0.99):
        theirs_q = np.quantile(np.abs(theirs), q)
        assert abs(np.quantile(np.abs(ours), q) - theirs_q) < 0.2 * theirs_q + 0.01
    assert abs(np.mean(ours > 0) - 0.5) < 0.1  # shifts of one sign only would be 0.5 off


@BRANCHES
def test_blur_probability_matches(probes, device, branches):
    folder, image = probes["squares"]
    # A wide sigma makes every blurred view unmistakable; v2's probability is kept.
    cfg = custom(
        v2(size=64), jitter_p=0.0, gray_p=0.0, blur_sigma=(4.0, 4.0), crop_scale=(0.9, 1.0)
    )

    def sharpness(views):
        return np.abs(np.diff(views[..., 0], axis=2)).max(axis=(1, 2))

    ours, theirs = (
        sharpness(dali_views(folder, cfg, device, branches=branches)),
        sharpness(reference_views(image, cfg)),
    )
    # Blurred views stay under 13, sharp ones reach 90; p 0.2 instead of 0.5 would be 0.3 off.
    assert abs((ours < 30).mean() - 0.5) < 0.1 and abs((theirs < 30).mean() - 0.5) < 0.1


def test_presets_are_the_reference_recipes():
    a, b = v1(), v2()
    assert (
        a.crop_scale,
        a.jitter,
        a.jitter_p,
        a.gray_p,
        a.gray_before_jitter,
        a.blur_p,
        a.flip_p,
    ) == ((0.2, 1.0), (0.4, 0.4, 0.4, 0.4), 1.0, 0.2, True, 0.0, 0.5)
    assert (
        b.crop_scale,
        b.jitter,
        b.jitter_p,
        b.gray_p,
        b.gray_before_jitter,
        b.blur_p,
        b.blur_sigma,
    ) == ((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, False, 0.5, (0.1, 2.0))
    names = [type(t).__name__ for t in reference_transform(b).transforms]
    assert names == [
        "RandomResizedCrop",
        "RandomApply",
        "RandomGrayscale",
        "RandomApply",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
    names = [type(t).__name__ for t in reference_transform(a).transforms]
    assert names == [
        "RandomResizedCrop",
        "RandomGrayscale",
        "RandomApply",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
