"""moco-bench index: index against build on the same img2dataset-shaped tars, one record."""

import json

from moco_dali.tools.bench import cli as bench
from moco_dali.tools.bench.report import headline, load
from tests.conftest import baseline_jpeg, write_files


def test_index_mode_times_both_on_the_same_tars_and_writes_its_record(tmp_path, capsys):
    photos = tmp_path / "photos"
    write_files(photos, {f"{i:03d}.jpg": baseline_jpeg(64, 48, seed=i) for i in range(12)})
    out = tmp_path / "index.json"
    assert bench.main(["index", "--photos", str(photos), "--reps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "index / build:" in printed and "over idle" in printed
    record = json.loads(out.read_text())
    assert record["mode"] == "index" and record["tars"]["count"] == 1
    for kind in ("index", "build"):
        runs = record["results"][kind]["runs"]
        assert len(runs) == 2 and all(r["images"] == 12 for r in runs)  # every photo, both ways
        assert record["results"][kind]["peak_rss_mb"] >= record["idle_peak_rss_mb"] > 0
    # A fresh interpreter importing only the contenders: torch (~500 MB) is not counted.
    assert record["idle_peak_rss_mb"] < 300
    load(out)  # the declared schema, as --compare reads it
    assert [row["labels"] for row in headline(record)] == [["index", "build"]] * 2
