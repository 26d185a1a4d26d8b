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
