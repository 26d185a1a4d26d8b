"""moco-bench scale: folders in the project's format, written without a build; one rank per process; the fit."""

from __future__ import annotations

import json

from moco_dali.pipeline import shards
from moco_dali.tools.bench import cli as bench
from moco_dali.tools.bench.report import compare
from moco_dali.tools.bench.scale import _extrapolate, write_folder
from moco_dali.tools.shards.verify import verify


def test_a_written_folder_is_a_shard_folder_verify_passes(tmp_path):
    folder = write_folder(tmp_path / "f", samples=103, num_shards=10, classes=4)
    report = verify(folder, batch_size=16, num_threads=1, progress=False)
    assert (report.shards, report.samples) == (10, 103)
    manifest = shards.load_manifest(folder)
    assert manifest.counts.tolist() == [11, 11, 11] + [10] * 7
    assert manifest.data["class_counts"] == {"class0": 30, "class1": 30, "class2": 23, "class3": 20}


def test_a_written_folder_has_a_built_folders_manifest_and_moco_shards_reads_it(
    tmp_path, labelled_dump, capsys
):
    from moco_dali.tools.shards import cli as shards_cli
    from moco_dali.tools.shards.build import build
    from moco_dali.tools.shards.settings import BuildSettings

    build(
        [str(labelled_dump)],
        tmp_path / "built",
        BuildSettings(labels="folder"),
        workers=0,
        progress=False,
    )
    built = shards.load_manifest(tmp_path / "built").data
    written = shards.load_manifest(
        write_folder(tmp_path / "f", samples=40, num_shards=4, classes=4)
    ).data
    assert set(written) == set(built)
    assert {k: type(v) for k, v in written.items()} == {k: type(v) for k, v in built.items()}
    assert (
        written["version"] == 2 and written["rejected"] == 0 and written["rejected_reasons"] == {}
    )
    assert (tmp_path / "f" / written["rejected_file"]).read_text() == ""
    assert shards_cli.main(["inspect", str(tmp_path / "f"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["samples"], info["shards"], info["rejected"], info["rejected_reasons"]) == (
        40,
        4,
        0,
        {},
    )
    assert shards_cli.main(["verify", str(tmp_path / "f")]) == 0


def test_scale_mode_measures_each_rank_in_its_own_process_and_extrapolates(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert (
        bench.main(
            [
                "scale",
                "--root",
                str(tmp_path / "folders"),
                "--folders",
                "640:16",
                "--worlds",
                "1,4",
                "--reps",
                "1",
                "--data.batch_size",
                "8",
                "--data.threads",
                "1",
                "--out",
                str(out),
                "--chart",
                str(tmp_path / "scale.png"),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    runs = {(r["world"], r["rank"]): r for r in record["runs"]}
    assert set(runs) == {(1, 0), (4, 0), (4, 3)}
    assert runs[(1, 0)]["reader_samples"] == 640 and runs[(1, 0)]["opened_shards"] == 16
    assert (
        runs[(4, 3)]["reader_samples"] == 160 and runs[(4, 3)]["opened_shards"] == 4
    )  # its share only
    for run in runs.values():
        assert (
            0 < run["construct_s"] <= run["first_batch_s"]
            and run["peak_rss_MB"] >= run["baseline_rss_MB"] > 0
        )
    ex = record["extrapolation"]
    assert ex["target"] == {
        "samples": 10**9,
        "shards": 100_000,
        "world": 64,
        "reader_samples": 1_000_000,
    }
    assert (
        set(ex["predicted"]) == {"first_batch_s", "construct_s", "peak_rss_GB"}
        and ex["assumptions"]
    )
    assert "extrapolated to 1e+09 samples" in capsys.readouterr().out
    # Its headline figures are the extrapolations beside the goals: drawn, and compared.
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = compare(out, out)["rows"]
    assert [r["figure"] for r in rows] == [
        "rank start-up s at 1e+09 samples, world 64",
        "rank peak GB at 1e+09 samples, world 64",
    ]
    assert (
        rows[0]["a"] == ex["predicted"]["first_batch_s"]
        and rows[1]["a_reference"] == ex["goals"]["peak_rss_GB"]
    )


def test_scale_build_mode_draws_and_compares_its_headline_figures(tmp_path):
    out, png = tmp_path / "scale-build.json", tmp_path / "scale-build.png"
    assert (
        bench.main(
            [
                "scale-build",
                "--sizes",
                "100,200",
                "--parts",
                "1",
                "--reps",
                "1",
                "--out",
                str(out),
                "--chart",
                str(png),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (row,) = compare(out, out)["rows"]
    assert row["figure"] == "build MB per part at 1e9 (list, parts1)"
    assert row["a"] == record["fits"]["list/streaming/parts1"]["peak_rss_mb"]["at_1e9"]
    assert (
        row["a_reference"] == record["fits"]["list/whole-listing/parts1"]["peak_rss_mb"]["at_1e9"]
    )


def _measure_here(folder, world: int, rank: int, args) -> dict:
    """``scale._measure``'s figures, measured by its child's code in this process."""
    from moco_dali.tools.bench import scale

    data = args.tree.data
    spec = {"folder": str(folder), "world": world, "rank": rank, "batch": data.batch_size}
    return scale._child({**spec, "threads": data.read.threads})


def test_a_chart_of_a_record_without_headline_figures_is_one_line_and_exit_2(
    tmp_path, capsys, monkeypatch
):
    from moco_dali.tools.bench import report, scale

    monkeypatch.setattr(
        report, "headline", lambda record: (_ for _ in ()).throw(ValueError("unknown mode 'x'"))
    )
    # The chart is under test, not the measurement (the test above runs each rank as a process):
    # the rank is measured in this process, without the 10 s a process spends loading torch.
    monkeypatch.setattr(scale, "_measure", _measure_here)
    out = tmp_path / "scale.json"
    assert (
        bench.main(
            [
                "scale",
                "--root",
                str(tmp_path / "folders"),
                "--folders",
                "64:4",
                "--worlds",
                "1",
                "--reps",
                "1",
                "--data.batch_size",
                "8",
                "--data.threads",
                "1",
                "--out",
                str(out),
                "--chart",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("moco-bench: error: --chart")
    assert json.loads(out.read_text())["mode"] == "scale"  # the measurements are kept


def test_the_fit_extrapolates_what_grows_and_nothing_else():
    # start-up of 2 s + 1 ms per shard + 2 us per sample given to the reader; memory 600 MB + 300 B per sample
    runs = [
        {
            "shards": s,
            "reader_samples": r,
            "first_batch_s": 2 + 1e-3 * s + 2e-6 * r,
            "construct_s": 1.5 + 1e-3 * s + 2e-6 * r,
            "peak_rss_MB": 600 + 3e-4 * r,
            "window_cap": 10**6,
        }
        for s, r in (
            (100, 10_000),
            (1000, 100_000),
            (1000, 1_000_000),
            (100_000, 15_625),
            (100_000, 1000),
        )
    ]
    ex = _extrapolate(runs)
    assert abs(ex["predicted"]["first_batch_s"] - (2 + 100 + 2)) < 1e-6
    assert abs(ex["predicted"]["peak_rss_GB"] - (600 + 300) / 1024) < 1e-9
    assert ex["met"] == {"startup_s": False, "peak_rss_GB": True}
    before = _extrapolate([{**r, "window_cap": None} for r in runs])  # a reader given everything
    assert before["target"]["reader_samples"] == 10**9
    assert abs(before["predicted"]["peak_rss_GB"] - (600 + 3e5) / 1024) < 1e-6
