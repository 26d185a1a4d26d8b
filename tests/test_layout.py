"""The layout holds: the import arrows of docs/design.md, imports that name paths, modules and
docstrings a reader can take in, one binder for every command, ruff clean, one installed name."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "pipeline", "model", "train", "tools")


def _checkout_as_moco_dali(tmp_path: Path) -> dict:
    """An environment whose ``moco_dali`` is this checkout itself (a symlink), not the installed copy."""
    (tmp_path / "moco_dali").symlink_to(REPO, target_is_directory=True)
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def test_imports_follow_the_arrows(tmp_path):
    """``lint-imports`` on the checkout's files: tools -> train -> pipeline | model, DALI only in
    pipeline, no circles.

    Checked against a broken tree: ``from ..pipeline import shards`` added to
    ``model/queue.py`` breaks the layers contract, the old ``bench`` <-> ``bench_train``
    pair breaks the acyclic one.
    """
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"],
        cwd=REPO,
        env=_checkout_as_moco_dali(tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _imports_by_reading(path: Path) -> set[str]:
    """The project modules a file imports, resolved from its own place in the folders."""
    relative = path.relative_to(REPO).with_suffix("")
    package = (
        list(relative.parts[:-1]) if relative.name != "__init__" else list(relative.parts[:-1])
    )
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:
                candidate = [*target, alias.name]
                as_file = REPO.joinpath(*candidate).with_suffix(".py")
                is_module = (
                    as_file.is_file() or (REPO.joinpath(*candidate) / "__init__.py").is_file()
                )
                found.add("moco_dali." + ".".join(candidate if is_module else target))
    return found


def test_imports_name_paths_and_a_static_graph_of_the_checkout_finds_every_one(tmp_path):
    """Inside the packages the project is imported relatively, so ``from ..pipeline import shards``
    names ``pipeline/shards.py``; grimp, reading the checkout's files, finds exactly the imports
    each file spells (none lost, none made up)."""
    absolute = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                if any(n.split(".")[0] in ("moco_dali", *PACKAGES) for n in names):
                    absolute.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert absolute == []

    script = (
        "import json, sys, grimp; "
        "g = grimp.build_graph(*sys.argv[1:], cache_dir=None); "
        "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))"
    )
    roots = [f"moco_dali.{package}" for package in PACKAGES]
    result = subprocess.run(
        [sys.executable, "-c", script, *roots],
        cwd=tmp_path,
        env=_checkout_as_moco_dali(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    graph = {m: set(v) for m, v in json.loads(result.stdout).items()}
    by_reading = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            by_reading["moco_dali." + name] = _imports_by_reading(path)
    assert graph == by_reading
    assert sum(len(v) for v in graph.values()) > 100  # the arrows are there to be found


def test_ruff_finds_the_tree_formatted_and_clean():
    """``ruff format --check`` and ``ruff check`` (the rules of ruff.toml) over the whole tree."""
    ruff = Path(sys.executable).with_name("ruff")
    for args in (["format", "--check"], ["check"]):
        result = subprocess.run([str(ruff), *args, "."], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_no_module_is_longer_than_a_reader_takes_in():
    long = {
        str(p.relative_to(REPO)): n
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert long == {}


def _package_modules():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def test_every_module_says_what_it_owns_in_a_few_lines():
    """A module docstring says what the module owns and why; history and measurements live in
    docs/ and benchmarks/NOTES.md."""
    long, missing = {}, []
    for path in _package_modules():
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        if not doc:
            missing.append(str(path.relative_to(REPO)))
        elif len(doc.splitlines()) > 12:
            long[str(path.relative_to(REPO))] = len(doc.splitlines())
    assert (long, missing) == ({}, [])


def test_every_command_binds_its_options_through_one_binder():
    """Options are dataclass fields bound by common/commandline.py; no command builds its own
    argparse options (train/cli.py adds only --preset, --config and --print-config)."""
    hand_made = []
    for path in _package_modules():
        name = str(path.relative_to(REPO))
        if name in ("common/commandline.py", "train/cli.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ".add_argument(" in line or "argparse.ArgumentParser(" in line:
                hand_made.append(f"{name}:{number}: {line.strip()}")
    assert hand_made == []
    cli = (REPO / "train" / "cli.py").read_text()
    assert cli.count(".add_argument(") == 3


def test_moco_bench_measures_the_training_tree_and_restates_none_of_its_keys():
    """What moco-bench measures is set with moco-train's keys; its own options are how it measures."""
    import dataclasses

    from moco_dali.common.options import leaves
    from moco_dali.tools.bench.options import BenchOptions
    from moco_dali.train.config import Config

    tree = {key.rsplit(".", 1)[-1] for key in leaves(Config)}
    own = {f.name for f in dataclasses.fields(BenchOptions)}
    # --device is where to measure (cuda:N, finer than run.device); --out is the record's file,
    # not a run's folder. Nothing else of the bench's own is a key of the tree.
    assert own & tree == {"device", "out"}
    assert own.isdisjoint({"batch", "size", "arch", "K", "amp", "hue_space", "dtype", "mlp"})


def test_function_local_imports_of_the_project_are_deliberately_lazy():
    """An import inside a function hides an arrow of the graph; the few kept (torch or DALI
    before --help, Ray, a measured child process) say why, with 'lazily' beside them."""
    unexplained = []
    for path in _package_modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.level:
                    before = lines[max(0, inner.lineno - 8) : inner.lineno]
                    if not any("lazily" in line for line in before):
                        unexplained.append(f"{path.relative_to(REPO)}:{inner.lineno}")
    assert unexplained == []


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
