"""moco-shards preview: a grid of stored images beside their two views."""

from PIL import Image

from tests.tools.test_build import run_cli
from tools.build import BuildSettings, build


def test_preview_writes_a_grid_of_originals_and_views(tmp_path, labelled_dump):
    build([str(labelled_dump)], tmp_path / "shards", BuildSettings(), workers=0, progress=False)
    result = run_cli("preview", str(tmp_path / "shards"), "--out", str(tmp_path / "p.png"), "--count", "3",
                     "--size", "48", "--preset", "v1")
    assert result.returncode == 0, result.stderr
    image = Image.open(tmp_path / "p.png")
    assert image.size == (3 * 48 + 4 * 6, 18 + 3 * (48 + 6) + 6)
    # The view columns are not blank.
    view = image.crop((6 + 48 + 6, 18, 6 + 2 * 48 + 6, 18 + 48)).convert("L")
    assert max(view.getextrema()) - min(view.getextrema()) > 10
