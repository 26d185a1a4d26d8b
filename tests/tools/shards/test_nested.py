"""Archives of per-class archives (``--labels archive``), shaped like ImageNet's training archive."""

from __future__ import annotations

import collections
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from moco_dali.pipeline import shards
from moco_dali.pipeline.scan import scan_shards
from moco_dali.tools.shards import BuildError
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.classes import find_classes
from moco_dali.tools.shards.merge import merge
from moco_dali.tools.shards.nested import nested_members
from moco_dali.tools.shards.settings import BuildSettings
from tests.conftest import baseline_jpeg
from tests.tools.shards.test_build import rejected_lines, run_cli, shard_bytes

CLASSES = ["n01440764", "n01443537", "n01484850"]
PER_CLASS = 4


def tar_bytes(members: list[tuple[str, bytes]], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def class_archive(wnid: str, seed: int) -> bytes:
    """One class's archive, as ImageNet's: ``WNID_N.JPEG`` members, each a distinct image."""
    return tar_bytes(
        [
            (f"{wnid}_{i}.JPEG", baseline_jpeg(40 + 8 * i, 32, seed=seed * 10 + i))
            for i in range(PER_CLASS)
        ]
    )


def write_imagenet_like(path: Path) -> dict[str, str]:
    """An archive of three class archives, a damaged one, one that is no archive, an image beside
    them and links.

    Returns what a ``--labels archive`` build must reject, by input name within the archive:
    the damaged archive's tail (its first member is whole), the archive that is none (one input,
    from its start), the image that is in no class archive, the links (in an inner archive and
    in the outer one).
    """
    jpeg = baseline_jpeg(24, 24, seed=90)
    first = tar_bytes([("n09999999_0.JPEG", jpeg)])[: 512 + -(-len(jpeg) // 512) * 512]
    # A whole first member, then a block of garbage where the second header should be: the
    # members after it (a whole class archive's) cannot be found.
    damaged = first + b"\xff" * 512 + class_archive("n09999999", seed=9)
    members = [(f"{wnid}.tar", class_archive(wnid, seed)) for seed, wnid in enumerate(CLASSES)]
    members[1] = (
        members[1][0],
        tar_bytes(
            [(f"{CLASSES[1]}_{i}.JPEG", baseline_jpeg(40, 32, seed=10 + i)) for i in range(4)],
            links=("n01443537_link.JPEG",),
        ),
    )
    members += [
        ("n09999999.tar", damaged),
        ("n08888888.tar", b"\x01" * 1536),  # named as a class archive, no tar at all
        ("README.JPEG", baseline_jpeg(16, 16, seed=99)),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members, links=("n00000000.tar",)))
    return {
        "n01443537.tar/n01443537_link.JPEG": "archive symlink",
        "n09999999.tar/@": "damaged archive: no valid header at byte",
        "n08888888.tar/@": "damaged archive: no valid header at byte",
        "README.JPEG": "not in a class archive",
        "n00000000.tar": "archive symlink",
    }


def stored(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Each sample's name within its source -> (class index, stored JPEG), through DALI's reader."""
    manifest, pairs = shards.discover(folder)
    out = {}
    for sample in scan_shards([p[0] for p in pairs], [p[1] for p in pairs], batch_size=8):
        out[json.loads(sample.metadata)["source"]] = int(sample.label)
    return out


def member_bytes(archive: Path, name: str) -> bytes:
    outer, _, inner = name.partition("/")
    with tarfile.open(archive) as tar:
        with tarfile.open(fileobj=tar.extractfile(outer)) as class_tar:
            return class_tar.extractfile(inner).read()


@pytest.fixture
def imagenet_like(tmp_path) -> tuple[Path, dict[str, str]]:
    archive = tmp_path / "a" / "ILSVRC2012_img_train.tar"
    return archive, write_imagenet_like(archive)


def test_an_archive_of_class_archives_is_read_in_place_with_every_input_accounted_for(
    tmp_path, imagenet_like
):
    archive, expected_rejections = imagenet_like
    report = build(
        [str(archive)],
        tmp_path / "out",
        BuildSettings(labels="archive", max_count=5),
        workers=0,
        progress=False,
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # The damaged archives' classes are in the outer headers, so they are classes.
    assert manifest["classes"] == [*CLASSES, "n08888888", "n09999999"]
    assert manifest["class_counts"] == {
        **dict.fromkeys(CLASSES, PER_CLASS),
        "n08888888": 0,
        "n09999999": 1,
    }
    samples = stored(tmp_path / "out")
    assert len(samples) == report.samples == 3 * PER_CLASS + 1
    for name, label in samples.items():
        wnid = name.partition(".tar/")[0]
        assert manifest["classes"][label] == wnid and name.startswith(f"{wnid}.tar/{wnid}_")
    assert report.inputs == report.samples + report.rejected == 3 * PER_CLASS + 1 + 5
    rejected = rejected_lines(tmp_path / "out")
    assert len(rejected) == len(expected_rejections) == report.rejected
    for name, reason in expected_rejections.items():
        (line,) = [r for r in rejected if r["input"].startswith(f"{archive}:{name}")]
        assert reason in line["reason"], line
    assert not list(tmp_path.glob("out/*.JPEG")) and not list(tmp_path.glob("out/*/*.tar"))


def test_stored_bytes_are_the_inner_members_bytes(tmp_path, imagenet_like):
    archive, _ = imagenet_like
    build(
        [str(archive)],
        tmp_path / "out",
        BuildSettings(labels="archive"),
        workers=0,
        progress=False,
    )
    manifest, pairs = shards.discover(tmp_path / "out")
    checked = 0
    for tar_path, _index in pairs:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    jpeg = tar.extractfile(member.name.replace(".json", ".jpg")).read()
                    assert jpeg == member_bytes(archive, meta["source"])  # stored byte for byte
                    checked += 1
    assert checked == 3 * PER_CLASS + 1


def test_classes_come_from_the_outer_headers_only(tmp_path, imagenet_like, monkeypatch):
    archive, _ = imagenet_like
    opened = []
    original = tarfile.TarFile.__init__

    def counting(self, *args, fileobj=None, **kwargs):
        opened.append(fileobj.tell() if fileobj is not None else 0)
        original(self, *args, fileobj=fileobj, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "__init__", counting)
    assert find_classes([str(archive)], "archive") == [*CLASSES, "n08888888", "n09999999"]
    assert opened == [0]  # the outer archive, never an inner one


def test_the_same_archive_under_two_parents_gives_byte_identical_shards(tmp_path):
    outputs = []
    for parent in ("one", "two/much deeper"):
        archive = tmp_path / parent / "train.tar"
        write_imagenet_like(archive)
        out = tmp_path / f"out-{len(outputs)}"
        build([str(archive)], out, BuildSettings(labels="archive", max_count=4), workers=0)
        outputs.append(shard_bytes(out))
    assert outputs[0] == outputs[1] and len(outputs[0]) >= 8


def test_parts_merge_to_the_single_builds_samples_a_class_spread_over_parts(
    tmp_path, imagenet_like
):
    archive, _ = imagenet_like
    settings = BuildSettings(labels="archive", max_count=4)
    build([str(archive)], tmp_path / "one", settings, workers=0, progress=False)
    reports = [
        build(
            [str(archive)],
            tmp_path / "parts",
            BuildSettings(labels="archive", max_count=4, num_parts=3, part=part),
            workers=0,
            progress=False,
        )
        for part in range(3)
    ]
    assert all(r.inputs < 18 for r in reports) and sum(r.inputs for r in reports) == 18
    merged = merge([tmp_path / "parts"])
    manifest = json.loads(merged.read_text())
    single = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert (manifest["samples"], manifest["rejected"]) == (single["samples"], single["rejected"])
    assert manifest["class_counts"] == single["class_counts"]
    assert stored(tmp_path / "parts") == stored(tmp_path / "one")
    # Dealt by a hash of the member's name, not an inner archive (one class) to a part.
    parts_of_class = collections.defaultdict(set)
    for part in range(3):
        for name in _part_sources(tmp_path / "parts", part):
            parts_of_class[name.partition(".tar/")[0]].add(part)
    assert max(len(parts) for parts in parts_of_class.values()) >= 2, parts_of_class


def _part_sources(folder: Path, part: int) -> set[str]:
    names = set()
    for tar_path in folder.glob(f"shard-part{part:04d}-*.tar"):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    names.add(json.loads(tar.extractfile(member).read())["source"])
    return names


@pytest.mark.parametrize(
    "kind, message",
    [
        ("folder", "--labels archive reads .tar archives of CLASS.tar archives, not a folder"),
        ("flat", "holds no CLASS.tar archive for --labels archive"),
        ("garbage", "cannot read tar archive"),
    ],
)
def test_sources_that_are_no_archive_of_archives_are_one_line_exit_2(tmp_path, kind, message):
    if kind == "folder":
        source = tmp_path / "dump"
        source.mkdir()
    elif kind == "flat":  # class folders in one archive: --labels folder's job
        source = tmp_path / "flat.tar"
        source.write_bytes(tar_bytes([("cat/1.jpg", baseline_jpeg())]))
    else:
        source = tmp_path / "garbage.tar"
        source.write_bytes(b"\x01" * 2048)
    result = run_cli("build", str(source), "--out", str(tmp_path / "out"), "--labels", "archive")
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert err.startswith("moco-shards build: error: ") and "\n" not in err
    assert message in err and str(source) in err


def test_classes_file_fixes_the_indices_of_an_archive_build(tmp_path, imagenet_like):
    archive, _ = imagenet_like
    (tmp_path / "classes.txt").write_text("\n".join(reversed(CLASSES)) + "\n")
    result = run_cli(
        "build",
        str(archive),
        "--out",
        str(tmp_path / "out"),
        "--labels",
        "archive",
        "--classes",
        str(tmp_path / "classes.txt"),
        "--workers",
        "0",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == list(reversed(CLASSES))
    for name, label in stored(tmp_path / "out").items():
        assert manifest["classes"][label] == name.partition(".tar/")[0]
    reasons = [r["reason"] for r in rejected_lines(tmp_path / "out")]
    assert sum("class not in --classes: n09999999" in r for r in reasons) == 1


def test_build_error_names_the_archive(tmp_path):
    with pytest.raises(BuildError, match="no such file"):
        find_classes([str(tmp_path / "missing.tar")], "archive")


def test_reading_holds_one_header_at_a_time(tmp_path):
    """The walk's memory is the same for 2,000 members as for 20,000: no listing is held (tarfile
    keeps every header it reads unless told not to, about 1 KB each)."""
    peaks = []
    for per_class in (200, 2000):
        archive = tmp_path / f"{per_class}.tar"
        tiny = [(f"{i}.JPEG", b"x") for i in range(per_class)]
        archive.write_bytes(tar_bytes([(f"c{c}.tar", tar_bytes(tiny)) for c in range(10)]))
        tracemalloc.start()
        try:
            count = sum(1 for _ in nested_members(str(archive), src=0))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert count == 10 * per_class
    assert peaks[1] < 2 * peaks[0] + 100_000, peaks


def test_a_cut_download_keeps_every_whole_member_before_the_cut(tmp_path, imagenet_like):
    archive, _ = imagenet_like
    with tarfile.open(archive) as tar:  # cut inside the third class archive's second member
        third = tar.getmember(f"{CLASSES[2]}.tar")
        with tarfile.open(fileobj=tar.extractfile(third)) as inner:
            second = inner.getmembers()[1]
    data = archive.read_bytes()
    archive.write_bytes(data[: third.offset_data + second.offset_data + 100])
    report = build([str(archive)], tmp_path / "out", BuildSettings(labels="archive"), workers=0)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["class_counts"] == {CLASSES[0]: 4, CLASSES[1]: 4, CLASSES[2]: 1}
    reasons = {r["input"].partition(":")[2]: r["reason"] for r in rejected_lines(tmp_path / "out")}
    at = third.offset_data + second.offset
    assert reasons[f"{CLASSES[2]}.tar/@{at}"] == (
        f"damaged archive: member {second.name} runs past the archive's end"
    )
    assert any(n.startswith("@") and "unexpected end of data" in r for n, r in reasons.items())
    assert report.inputs == report.samples + report.rejected == 9 + 1 + 2  # and the link


def test_without_labels_archive_a_class_archive_is_rejected_naming_it(tmp_path, imagenet_like):
    """A flat build's .tar member is no image; its reason says which build reads it."""
    archive, _ = imagenet_like
    report = build([str(archive)], tmp_path / "out", BuildSettings(), workers=0, progress=False)
    reasons = {r["input"].partition(":")[2]: r["reason"] for r in rejected_lines(tmp_path / "out")}
    for wnid in [*CLASSES, "n08888888", "n09999999"]:
        assert reasons[f"{wnid}.tar"] == (
            "an archive in an archive: --labels archive reads SRC.tar holding CLASS.tar archives"
        )
    assert report.samples == 1 and "README.JPEG" not in reasons  # the image beside them
