"""Single operations of the recipes, checked exactly where an exact answer exists."""

from __future__ import annotations

import numpy as np
import simplejpeg
from PIL import Image

from moco_dali.pipeline.loader import ViewLoader
from moco_dali.pipeline.recipes import cifar, custom, preset, v2
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import loader_config, photo_like, write_files


def test_grey_views_have_equal_channels_and_the_reference_luma(tmp_path):
    """R = G = B exactly, as torchvision's grey image, and the ITU-R 601 luma of the stored pixels.

    Checked against the old ``fn.hsv(saturation=0)``: a channel spread of 1 in about a
    third of the pixels. An unweighted channel mean instead of the luma is 20+ levels off here.
    """
    data = simplejpeg.encode_jpeg(photo_like(48, 48, seed=2), 95, "RGB", "444")
    write_files(tmp_path / "raw", {f"{i:02d}.jpg": data for i in range(16)})
    build([str(tmp_path / "raw")], tmp_path / "shards", BuildSettings(), workers=0, progress=False)
    # The whole image at its own size, grey always, nothing else: a deterministic view.
    cfg = custom(
        v2(48),
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        gray_p=1.0,
        jitter_p=0.0,
        blur_p=0.0,
        flip_p=0.0,
    )
    loader = ViewLoader(
        tmp_path / "shards", cfg, loader_config(batch_size=16, dtype="float32", threads=1)
    )
    views = (
        next(iter(loader)).view_q.permute(0, 2, 3, 1).numpy() * np.array(cfg.std) * 255
        + np.array(cfg.mean) * 255
    )
    views = views.round()
    assert (views.max(-1) - views.min(-1)).max() == 0
    stored = Image.fromarray(simplejpeg.decode_jpeg(data, "RGB"))
    luma = np.asarray(
        stored.convert("L"), dtype=np.float64
    )  # PIL: ITU-R 601-2, as torchvision's PIL path
    assert np.abs(views[0, :, :, 0] - luma).max() <= 1


def test_the_cifar_recipe_is_v2_without_blur():
    assert cifar() == custom(v2(32), blur_p=0.0) and preset("cifar", 32) == cifar()
    assert (cifar().jitter, cifar().jitter_p, cifar().gray_p, cifar().crop_scale) == (
        (0.4, 0.4, 0.4, 0.1),
        0.8,
        0.2,
        (0.2, 1.0),
    )


def test_constant_jitter_factors_stay_numbers_beside_gpu_images():
    """A factor with an empty range (brightness 0: the int 1 from max(0.0, 1 - 0)) is a
    constant, not a DALI node: moving it to the GPU broke every GPU view with only some
    jitter factors set (the first GPU run's parity test). The GPU branch needs a GPU;
    the rule it relies on is checked here."""
    from moco_dali.pipeline import augment

    class GpuNode:
        device = "gpu"

    class CpuNode:
        device = "cpu"

        def gpu(self):
            return "moved"

    for constant in (1, 1.0, augment._uniform(1, 1), augment._uniform(max(0.0, 1 - 0), 1 + 0)):
        assert augment._on(constant, GpuNode()) == constant
    assert isinstance(augment._uniform(max(0.0, 1 - 0), 1 + 0), float)
    assert augment._on(CpuNode(), GpuNode()) == "moved"
    node = CpuNode()
    assert augment._on(node, CpuNode()) is node
