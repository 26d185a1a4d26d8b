"""A build at scale: class-mixed shards from a class-sorted dump, parts that read only their share, Ray."""

from __future__ import annotations

import collections
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from moco_dali.pipeline import shards
from moco_dali.tools.shards import inputs
from moco_dali.tools.shards import order as packing
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.merge import merge
from moco_dali.tools.shards.settings import BuildSettings
from tests.tools.shards.test_build import folder_bytes, run_cli

CLASSES = [f"class{c}" for c in range(10)]


def write_fashion_like(root: Path) -> Path:
    """A Fashion-MNIST-like dump: 10 class folders of 200 tiny greyscale-looking JPEGs, listed class by class."""
    rng = np.random.default_rng(0)
    for _c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(200):
            pixels = np.repeat(rng.integers(0, 256, (16, 16, 1), dtype=np.uint8), 3, axis=2)
            (root / name / f"{i:05d}.jpg").write_bytes(
                simplejpeg.encode_jpeg(pixels, 90, "RGB", "420")
            )
    return root


@pytest.fixture(scope="module")
def fashion_like(tmp_path_factory) -> Path:
    return write_fashion_like(tmp_path_factory.mktemp("fashion") / "train")


def class_counts_per_shard(folder: Path) -> list[collections.Counter]:
    manifest = shards.load_manifest(folder)
    counts = []
    for entry in manifest.shards:
        with tarfile.open(manifest.path(entry.tar)) as tar:
            counts.append(
                collections.Counter(
                    int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")
                )
            )
    return counts


def assert_every_shard_holds_every_class_near_its_share(folder: Path, parts: int = 1) -> None:
    per_shard = class_counts_per_shard(folder)
    # A part's last shard holds what is left of its share: a few samples, or a few hundred,
    # whose classes a test cannot bound. Every other shard is a whole block.
    whole = [counts for counts in per_shard if sum(counts.values()) >= 100]
    assert len(whole) >= 4 and len(per_shard) - len(whole) <= parts
    for counts in whole:
        share = sum(counts.values()) / len(CLASSES)
        # A shard packed in listing order holds one or two classes (0 or 10x the share);
        # a uniform shuffle puts each class within a few samples of it.
        assert all(share / 3 <= counts[c] <= 3 * share for c in range(len(CLASSES))), counts


@pytest.mark.parametrize("root", ["train", "a/much/longer/path/to/the same dump, named otherwise"])
def test_every_shard_of_a_class_sorted_dump_holds_each_class_near_its_share(tmp_path, root):
    """Whatever the dump's folder is called and wherever it lies: the packing order is a function
    of the names within it (it hashed absolute paths once, and a part's last shard of this
    test held 2 samples in some temporary folders)."""
    fashion_like = write_fashion_like(tmp_path / root)
    # Shards of 250 and more: a class's count in one is then within +-5 standard deviations
    # of its share wherever the bounds below are, so a sound shuffle passes with room to spare.
    build(
        [str(fashion_like)],
        tmp_path / "one",
        BuildSettings(labels="folder", max_count=500),
        workers=2,
        progress=False,
    )
    assert_every_shard_holds_every_class_near_its_share(tmp_path / "one")

    # The same dump as a class-sorted list beside it (entries relative to the list), in 4 parts.
    listing = fashion_like.parent / "train.txt"
    listing.write_text(
        "".join(f"{p.relative_to(listing.parent)}\n" for p in sorted(fashion_like.rglob("*.jpg")))
    )
    for part in range(4):
        build(
            [str(listing)],
            tmp_path / "parts",
            BuildSettings(labels="folder", max_count=250, num_parts=4, part=part),
            workers=0,
            progress=False,
        )
    merge([str(tmp_path / "parts")])
    assert_every_shard_holds_every_class_near_its_share(tmp_path / "parts", parts=4)
    assert shards.load_manifest(tmp_path / "parts").data["class_counts"] == dict.fromkeys(
        CLASSES, 200
    )

    unshuffled = BuildSettings(labels="folder", max_count=200, shuffle_seed=None)
    build([str(fashion_like)], tmp_path / "listing", unshuffled, workers=0, progress=False)
    assert [len(c) for c in class_counts_per_shard(tmp_path / "listing")] == [1] * 10


def test_parts_split_every_kind_of_source_disjointly(tmp_path, fashion_like):
    files = sorted(fashion_like.rglob("*.jpg"))
    listing = tmp_path / "all.csv"
    listing.write_text("".join(f"{p},{p.parent.name}\n" for p in files[:700]))
    archives = []
    for a in range(3):
        archives.append(tmp_path / f"a{a}.tar")
        with tarfile.open(archives[-1], "w") as tar:
            for p in files[700 + 100 * a : 800 + 100 * a]:
                tar.add(p, arcname=f"{p.parent.name}/{p.name}")
    sources = [str(fashion_like / "class9"), str(listing), *map(str, archives)]
    whole = [r.source for r in inputs.iter_part(sources, "folder")]
    assert len(whole) == 200 + 700 + 300
    per_part = [
        [r.source for r in inputs.iter_part(sources, "folder", part, 5)] for part in range(5)
    ]
    assert sorted(s for part in per_part for s in part) == sorted(whole)
    assert all(100 <= len(part) <= 400 for part in per_part), [len(p) for p in per_part]
    labels = {r.source: r.label for r in inputs.iter_part([str(listing)], "folder", 1, 5)}
    assert all(label == Path(source).parent.name for source, label in labels.items())


def test_a_part_reads_only_its_blocks_of_a_list_file(tmp_path, monkeypatch):
    listing = tmp_path / "huge.txt"
    listing.write_text("".join(f"images/{i // 1000:04d}/{i:09d}.jpg\n" for i in range(100_000)))
    read = collections.Counter()
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readline(self, size=-1):  # the reader asks for at most a line's limit
            line = self.f.readline(size)
            read["bytes"] += len(line)
            return line

    monkeypatch.setattr(inputs, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    mine = list(inputs.iter_part([str(listing)], part=7, num_parts=100))
    size = listing.stat().st_size
    assert 800 <= len(mine) <= 1200
    assert read["bytes"] < 2 * size / 100  # its share and a line per block, never the whole list


def test_classes_from_a_file_fix_the_indices_and_reject_what_is_not_listed(tmp_path, fashion_like):
    classes = tmp_path / "classes.txt"
    classes.write_text("class3\nclass1\n")
    listing = tmp_path / "three.txt"
    listing.write_text(
        "".join(
            f"{fashion_like}/{c}/{i:05d}.jpg\n"
            for c in ("class1", "class3", "class5")
            for i in range(5)
        )
    )
    result = run_cli(
        "build",
        str(listing),
        "--out",
        str(tmp_path / "out"),
        "--labels",
        "folder",
        "--classes",
        str(classes),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == ["class3", "class1"]
    assert manifest["class_counts"] == {"class3": 5, "class1": 5}
    assert manifest["rejected_reasons"] == {"class not in --classes": 5}
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        stored = {
            json.loads(tar.extractfile(m).read())["source"].split("/")[-2]
            for m in tar
            if m.name.endswith("json")
        }
        assert stored == {"class1", "class3"}


def test_parts_on_ray_give_the_bytes_of_parts_built_one_by_one(tmp_path, fashion_like):
    pytest.importorskip("ray")
    sources = [str(fashion_like / "class0"), str(fashion_like / "class1")]
    assert (
        "--executor ray builds every part"
        in run_cli(
            "build",
            *sources,
            "--out",
            str(tmp_path / "x"),
            "--num-parts",
            "3",
            "--part",
            "1",
            "--executor",
            "ray",
        ).stderr
    )
    assert (
        "--ray-address needs --executor ray"
        in run_cli("build", *sources, "--out", str(tmp_path / "x"), "--ray-address", "auto").stderr
    )
    # A local Ray instance on this machine's cores, three parts as three tasks, then merged.
    result = run_cli(
        "build",
        *sources,
        "--out",
        str(tmp_path / "ray"),
        "--max-count",
        "64",
        "--num-parts",
        "3",
        "--executor",
        "ray",
    )
    assert result.returncode == 0, result.stderr
    assert "3 parts on Ray: 400 inputs -> 400 samples" in result.stdout
    assert (tmp_path / "ray" / "manifest.json").is_file()
    for part in range(3):
        build(
            sources,
            tmp_path / "local",
            BuildSettings(max_count=64, num_parts=3, part=part),
            workers=0,
            progress=False,
        )
    merge([str(tmp_path / "local")])
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "local")
    assert run_cli("verify", str(tmp_path / "ray"), "--no-progress").returncode == 0


@pytest.mark.parametrize("seed", [0, None])
def test_the_external_sort_gives_the_order_of_a_sort_in_memory(tmp_path, monkeypatch, seed):
    listing = tmp_path / "many.txt"
    names = [f"c{i % 7}/{i:06d}.jpg" for i in range(3000)]
    listing.write_text("".join(f"{n}\n" for n in names))

    def packing_order() -> list[str]:
        order = packing.PackingOrder(inputs.iter_part([str(listing)]), tmp_path / "scratch", seed)
        sources, split = [], False
        for ref in order:
            sources.append(ref.source)
            split = split or any(p.is_dir() for p in (tmp_path / "scratch").iterdir())
        order.close()
        return sources, split

    in_memory, _ = packing_order()
    # Spill every 50 inputs and sort at most 5 at once: every bucket is split again.
    monkeypatch.setattr(packing, "_FLUSH_ITEMS", 50)
    monkeypatch.setattr(packing, "_SORT_ITEMS", 5)
    spilled, split = packing_order()
    assert spilled == in_memory
    assert sorted(in_memory) == sorted(f"{tmp_path}/{n}" for n in names)
    assert split == (seed is not None)
    if seed is None:
        assert in_memory == [f"{tmp_path}/{n}" for n in names]
    else:
        assert in_memory[:7] != [f"{tmp_path}/{n}" for n in names[:7]]
    assert not (tmp_path / "scratch").exists()
