"""The layout holds: the import arrows of DESIGN.md, modules a reader can take in, one installed name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "model", "train", "tools")


def test_imports_follow_the_arrows():
    """``lint-imports`` with ``.importlinter``: tools -> train -> pipeline | model, DALI only in pipeline, no circles.

    Checked against a broken tree: ``from moco_dali.pipeline import shards`` added to
    ``model/queue.py`` breaks the layers contract, the old ``bench`` <-> ``bench_train``
    pair breaks the acyclic one.
    """
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_module_is_longer_than_a_reader_takes_in():
    long = {
        str(p.relative_to(REPO)): n
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}


def test_code_imports_the_installed_name_only():
    """``import train`` would load a second copy of a module beside ``moco_dali.train``."""
    bare = []
    for package in (*PACKAGES, "tests", "benchmarks"):
        for path in (REPO / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                words = line.split()
                if (
                    len(words) > 1
                    and words[0] in ("import", "from")
                    and words[1].split(".")[0] in PACKAGES
                ):
                    bare.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert bare == []


@pytest.mark.slow
def test_a_plain_install_adds_moco_dali_and_the_commands_only(tmp_path):
    """``pip install .`` (not editable) into a fresh environment: one import name, five commands, and they run."""
    source = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    fresh = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    before = set(os.listdir(fresh))
    uv = Path(sys.executable).with_name("uv")
    # The dependencies come from this environment's site-packages (a path entry, whose
    # own .pth files, this checkout's editable hook among them, are not processed).
    (fresh / "_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            str(uv),
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            "--no-deps",
            "--no-build-isolation",
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    added = set(os.listdir(fresh)) - before - {"_deps.pth"}
    assert {name for name in added if not name.endswith(".dist-info")} == {"moco_dali"}
    commands = {"moco-shards", "moco-train", "moco-eval", "moco-bench", "moco-demo"}
    assert commands <= set(os.listdir(venv / "bin"))
    outside = tmp_path / "elsewhere"  # no checkout on the path
    outside.mkdir()
    result = subprocess.run(
        [str(venv / "bin" / "moco-shards"), "--help"], cwd=outside, capture_output=True, text=True
    )
    assert result.returncode == 0 and "build" in result.stdout, result.stderr[-2000:]
    where = subprocess.run(
        [str(python), "-c", "import moco_dali.train.eval.cli as m; print(m.__file__)"],
        cwd=outside,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(fresh)


def test_no_merge_conflict_markers_in_tracked_files():
    """A merge resolved by hand must not leave its markers in code or guides."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    marked = []
    for name in listed.stdout.splitlines():
        path = REPO / name
        if (
            path.suffix not in {".py", ".md", ".toml", ".cfg", ".sh", ".txt", ".yaml", ".json"}
            or not path.is_file()
        ):
            continue
        lines = path.read_text(errors="replace").splitlines()
        if any(line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in lines):
            marked.append(name)
    assert not marked, marked
