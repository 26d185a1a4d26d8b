"""moco-shards preview: a grid of stored images beside their two views."""

from PIL import Image

from tests.tools.shards.test_build import run_cli
from moco_dali.tools.shards.build import BuildSettings, build


def test_preview_writes_a_grid_of_originals_and_views(tmp_path, labelled_dump):
    build([str(labelled_dump)], tmp_path / "shards", BuildSettings(), workers=0, progress=False)
    result = run_cli("preview", str(tmp_path / "shards"), "--out", str(tmp_path / "p.png"), "--count", "3",
                     "--size", "48", "--preset", "v1")
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
        low, high = image.crop((6 + 2 * (48 + 6), top, 6 + 2 * (48 + 6) + 48, top + 48)).convert("L").getextrema()
        ranges.append(high - low)
    assert max(ranges) > 10
