"""moco-bench index: index against build on the same img2dataset-shaped tars, one record."""

import json

from moco_dali.tools.bench import cli as bench
from moco_dali.tools.bench.report import headline, load
from tests.conftest import baseline_jpeg, write_files


def test_index_mode_times_both_on_the_same_tars_and_writes_its_record(tmp_path, capsys):
    photos = tmp_path / "photos"
    write_files(photos, {f"{i:03d}.jpg": baseline_jpeg(64, 48, seed=i) for i in range(12)})
    out = tmp_path / "index.json"
    argv = ["index", "--photos", str(photos), "--reps", "2", "--out", str(out)]
    assert bench.main([*argv, "--growth", "1500,2e3"]) == 0
    printed = capsys.readouterr().out
    assert "index / build:" in printed and "index / rebuild:" in printed and "over idle" in printed
    record = json.loads(out.read_text())
    assert record["mode"] == "index" and record["tars"]["count"] == 1
    for kind in ("index", "build", "rebuild"):
        runs = record["results"][kind]["runs"]
        assert len(runs) == 2 and all(r["images"] == 12 for r in runs)  # every photo, both ways
        assert record["results"][kind]["peak_rss_mb"] >= record["idle_peak_rss_mb"] > 0
    # A fresh interpreter importing only the contenders: torch (~500 MB) is not counted.
    assert record["idle_peak_rss_mb"] < 300
    load(out)  # the declared schema, as --compare reads it
    assert [row["labels"] for row in headline(record)] == [["index", "build"]] * 2 + [
        ["index", "rebuild"]
    ]
    # Every sample of each count indexed (a tar of 1,000 and one of the rest), each in its own
    # process; the growth figure is the difference of the two peaks.
    growth = record["growth"]
    assert record["growth_jpeg_bytes"] < 2000  # tiny JPEGs, whatever the photos (1e6 of them)
    assert [(g["samples"], g["tars"], g["images"]) for g in growth] == [
        (1500, 2, 1500),
        (2000, 2, 2000),
    ]
    assert record["figures"]["index_growth_rss_mb"] == (
        growth[1]["peak_rss_mb"] - growth[0]["peak_rss_mb"]
    )


def test_growth_counts_are_checked_before_any_work(tmp_path, capsys):
    for value, message in (
        ("1e4,abc", "--growth 1e4,abc: expected comma-separated whole numbers"),
        ("1.5", "--growth 1.5: expected comma-separated whole numbers"),
        ("0", "--growth 0: every value must be at least 1"),
        ("1e9", "--growth 1e9: at most 100,000,000 samples"),
    ):
        assert bench.main(["index", "--growth", value, "--out", str(tmp_path / "r.json")]) == 2
        assert capsys.readouterr().err.strip().endswith(message), value
    assert not (tmp_path / "r.json").exists()
