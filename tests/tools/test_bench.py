"""moco-bench: every mode runs on a tiny configuration and writes the JSON it promises."""

import json

from tools import bench


def test_momentum_mode_writes_its_record(tmp_path, capsys):
    out = tmp_path / "momentum.json"
    assert bench.main(["momentum", "--arch", "resnet18", "--K", "1024", "--batch", "64", "--reps", "2",
                       "--rounds", "2", "--copy-mib", "8", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["mode"] == "momentum" and record["config"]["arch"] == "resnet18"
    assert {"loop", "foreach", "foreach_lerp"} <= set(record["momentum"])
    for figures in record["momentum"].values():
        assert figures["reps"] == 4 and 0 < figures["min_ms"] <= figures["median_ms"] <= figures["max_ms"]
    assert record["floor_ms"] > 0 and record["copy_bandwidth_GBps"] > 0
    assert record["best"] in record["momentum"] and record["best"] != "loop"
    assert record["enqueue"]["median_ms"] > 0 and record["negative_logits"]["median_ms"] > 0
    assert {"cpu", "cores", "python", "torch", "gpus"} <= set(record["machine"])
    assert "x floor" in capsys.readouterr().out


def test_pipeline_mode_runs_both_loaders_and_writes_its_record(tmp_path, labelled_dump):
    from tools.build import BuildSettings, build

    build([str(labelled_dump)], tmp_path / "shards", BuildSettings(), workers=0, progress=False)
    out = tmp_path / "pipeline.json"
    assert bench.main(["pipeline", "--shards", str(tmp_path / "shards"), "--size", "32", "--batch", "4",
                       "--batches", "2", "--warmup", "1", "--reps", "2", "--workers", "1", "--threads", "1",
                       "--device", "cpu", "--hue-space", "yiq", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["mode"] == "pipeline" and record["config"]["augment"]["hue_space"] == "yiq"
    for name in ("dali", "reference"):
        figures = record["results"][name]
        assert len(figures["seconds"]) == 2 and figures["pairs_per_s_min"] <= figures["pairs_per_s"] > 0
    assert record["dali_over_reference"] > 0 and record["memory"]["host_peak_rss_MB"] > 0
    assert record["machine"]["cores"] >= 1
