"""moco-eval on unlabelled shards: knn and linear refuse them in one line, before any heavy work."""

from __future__ import annotations

from pathlib import Path

import pytest

from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.train.eval import pretrained
from moco_dali.train.eval.cli import main as moco_eval
from tests.conftest import baseline_jpeg, write_files


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-unlabelled")
    for name in ("cat", "dog"):
        write_files(root / "raw" / name, {f"{i}.jpg": baseline_jpeg(seed=i) for i in range(3)})
    for labels in ("none", "folder"):
        build([str(root / "raw")], root / labels, BuildSettings(labels=labels), workers=0)
    return {"unlabelled": root / "none", "labelled": root / "folder"}


@pytest.mark.parametrize("mode", ["knn", "linear"])
@pytest.mark.parametrize("which", ["--train", "--val"])
def test_an_unlabelled_folder_is_refused_before_the_checkpoint_is_read(
    folders, tmp_path, capsys, monkeypatch, mode, which
):
    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the folders were checked")

    monkeypatch.setattr(pretrained, "load_encoder", never)
    (tmp_path / "ckpt.pt").write_bytes(b"not read")
    paths = {"--train": folders["labelled"], "--val": folders["labelled"]}
    paths[which] = folders["unlabelled"]
    argv = [mode, "--checkpoint", str(tmp_path / "ckpt.pt")]
    argv += ["--train", str(paths["--train"]), "--val", str(paths["--val"])]
    if mode == "linear":
        argv += ["--out", str(tmp_path / "linear")]
    assert moco_eval(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"moco-eval: error: {which} {folders['unlabelled']}: the shards have no labels (its "
        f"manifest names no class); moco-eval {mode} needs labelled shards (build with "
        "--labels folder or archive, or --labels-file)"
    )
    assert not (tmp_path / "linear").exists()
