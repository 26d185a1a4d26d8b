"""moco-shards preview: a grid of stored images beside their two views. Run in this process
(``run_here``): as a command it loads torch first, 4 s a run; test_safety runs the command."""

import numpy as np
from PIL import Image

from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from tests.tools.shards.test_build import run_here


def test_preview_writes_a_grid_of_originals_and_views(tmp_path, labelled_dump, capfd, caplog):
    build([str(labelled_dump)], tmp_path / "shards", BuildSettings(), workers=0, progress=False)
    result = run_here(
        capfd,
        caplog,
        "preview",
        str(tmp_path / "shards"),
        "--out",
        str(tmp_path / "p.png"),
        "--count",
        "3",
        "--data.views.size",
        "48",
        "--preset",
        "v1",
    )
    assert result.returncode == 0, result.stderr
    image = Image.open(tmp_path / "p.png")
    assert image.size == (3 * 48 + 4 * 6, 18 + 3 * (48 + 6) + 6)
    # The views are not blank. View k's tiles: the key printed on the stored image runs into
    # view q's, which kept its range at 100 or more even with blank views. The widest of the
    # three tiles spans 47 to 183 grey levels over 30 seeds; views left normalised, or
    # denormalised without the 255, span 2 at most.
    ranges = []
    for row in range(3):
        top = 18 + row * (48 + 6)
        low, high = (
            image.crop((6 + 2 * (48 + 6), top, 6 + 2 * (48 + 6) + 48, top + 48))
            .convert("L")
            .getextrema()
        )
        ranges.append(high - low)
    assert max(ranges) > 10


def test_preview_draws_the_views_a_configuration_file_trains_on(
    tmp_path, labelled_dump, capfd, caplog
):
    """--config and --data.views.* resolve as moco-train resolves them: the file's size, the file's
    and the command line's view keys over the preset's; a bad view key is one line naming it."""
    build([str(labelled_dump)], tmp_path / "shards", BuildSettings(), workers=0, progress=False)
    config = tmp_path / "run.toml"
    config.write_text("[data.views]\nsize = 40\njitter_p = 0.0\ngray_p = 0.0\n")
    grey = run_here(
        capfd,
        caplog,
        "preview",
        str(tmp_path / "shards"),
        "--out",
        str(tmp_path / "grey.png"),
        "--count",
        "2",
        "--preset",
        "cifar",
        "--config",
        str(config),
        "--data.views.gray_p",
        "1.0",
    )
    assert grey.returncode == 0, grey.stderr
    image = Image.open(tmp_path / "grey.png").convert("RGB")
    assert image.size == (3 * 40 + 4 * 6, 18 + 2 * (40 + 6) + 6)  # data.views.size from the file
    view_k = np.asarray(
        image.crop((6 + 2 * (40 + 6), 18, 6 + 2 * (40 + 6) + 40, 18 + 40)), dtype=int
    )
    # gray_p 1 from the command line over the file's 0: every pixel of view k (view q's tile
    # has the key's yellow text running into it) has R = G = B;
    # the file's 0 alone leaves the labelled dump's colours (checked below).
    assert np.abs(view_k - view_k[..., :1]).max() == 0
    coloured = run_here(
        capfd,
        caplog,
        "preview",
        str(tmp_path / "shards"),
        "--out",
        str(tmp_path / "colour.png"),
        "--count",
        "2",
        "--preset",
        "cifar",
        "--config",
        str(config),
    )
    assert coloured.returncode == 0, coloured.stderr
    view_k = np.asarray(
        Image.open(tmp_path / "colour.png")
        .convert("RGB")
        .crop((6 + 2 * (40 + 6), 18, 6 + 2 * (40 + 6) + 40, 18 + 40)),
        dtype=int,
    )
    assert np.abs(view_k - view_k[..., :1]).max() > 20
    bad = run_here(
        capfd,
        caplog,
        "preview",
        str(tmp_path / "shards"),
        "--out",
        str(tmp_path / "bad.png"),
        "--data.views.flip_p",
        "1.5",
    )
    assert (
        bad.returncode == 2
        and "data.views.flip_p" in bad.stderr
        and len(bad.stderr.strip().splitlines()) == 1
    )
