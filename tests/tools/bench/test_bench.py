"""moco-bench: every mode runs on a tiny configuration and writes the JSON it promises."""

import json

import numpy as np
import pytest
import simplejpeg

from moco_dali.tools.bench import cli as bench


def test_momentum_mode_writes_its_record(tmp_path, capsys):
    out = tmp_path / "momentum.json"
    assert (
        bench.main(
            [
                "momentum",
                "--model.arch",
                "resnet18",
                "--model.K",
                "1024",
                "--data.batch_size",
                "64",
                "--calls",
                "2",
                "--reps",
                "2",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert record["mode"] == "momentum" and record["config"]["arch"] == "resnet18"
    assert {"loop", "foreach", "foreach_lerp"} <= set(record["momentum"])
    for figures in record["momentum"].values():
        assert (
            figures["calls"] == 4
            and 0 < figures["min_ms"] <= figures["median_ms"] <= figures["max_ms"]
        )
    # The floor is one pass over buffers of the parameters' size that reads both encoders'
    # bytes and writes one: 3 x param_bytes at the bandwidth that pass reached.
    param_bytes, floor_pass = record["config"]["param_bytes"], record["floor_pass"]
    assert record["copy_bytes"] == param_bytes and floor_pass["calls"] == 4
    assert record["floor_ms"] == pytest.approx(floor_pass["median_ms"])
    assert record["copy_bandwidth_GBps"] == pytest.approx(
        3 * param_bytes / floor_pass["median_ms"] / 1e6
    )
    assert record["best"] in record["momentum"] and record["best"] != "loop"
    assert record["enqueue"]["median_ms"] > 0 and record["negative_logits"]["median_ms"] > 0
    assert {"cpu", "cores", "python", "torch", "gpus"} <= set(record["machine"])
    assert "x floor" in capsys.readouterr().out


def test_the_floor_pass_moves_what_the_update_must():
    import torch

    from moco_dali.tools.bench.momentum import FloorPass

    floor = FloorPass(1000, torch.device("cpu"))
    assert floor.x.nbytes == floor.y.nbytes == floor.buffer_bytes == 1000
    assert floor.bytes_moved == 3000  # reads theta_k and theta_q, writes theta_k
    before = floor.x.clone()
    floor()
    assert not torch.equal(floor.x, before)


def test_no_momentum_implementation_beats_the_floor():
    import torch

    from moco_dali.tools.bench.momentum import time_updates

    # 4.3 MB in a ResNet's mix of tensors: a second to run, and small enough to sit in cache,
    # where the old floor from a 256 MiB copy was 4x too high (the best read 0.24x it) and
    # fails this bound; the floor from buffers of the parameters' size reads 2.5x below the
    # best on the 2-core CPU machine, so the bound holds through a lot of noise.
    torch.manual_seed(0)
    shapes = (
        [(64,)] * 30 + [(128,)] * 20 + [(64, 64, 3, 3)] * 6 + [(128, 128, 3, 3)] * 4 + [(512, 512)]
    )
    from moco_dali.model.momentum import flatten_parameters_

    key, query = (
        torch.nn.ParameterList(torch.nn.Parameter(torch.rand(s)) for s in shapes) for _ in range(2)
    )
    flatten_parameters_(key), flatten_parameters_(query)  # the engine's flat_lerp among them
    results, floor, _ = time_updates(key, query, torch.device("cpu"), calls=20, reps=5)
    assert "flat_lerp" in results
    for name, figures in results.items():
        assert figures["median_ms"] >= 0.5 * floor["median_ms"], (name, figures, floor)


def test_pipeline_mode_runs_both_loaders_and_writes_its_record(tmp_path, labelled_dump):
    from moco_dali.tools.shards.build import build
    from moco_dali.tools.shards.settings import BuildSettings

    build(
        [str(labelled_dump)],
        tmp_path / "shards",
        BuildSettings(max_count=5),
        workers=0,
        progress=False,
    )
    out = tmp_path / "pipeline.json"
    assert (
        bench.main(
            [
                "pipeline",
                "--shards",
                str(tmp_path / "shards"),
                "--data.views.size",
                "32",
                "--data.batch_size",
                "4",
                "--batches",
                "2",
                "--warmup",
                "1",
                "--reps",
                "2",
                "--workers",
                "1",
                "--data.threads",
                "1",
                "--device",
                "cpu",
                "--data.views.hue_space",
                "yiq",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert record["mode"] == "pipeline" and record["config"]["augment"]["hue_space"] == "yiq"
    for name in ("dali", "reference"):
        figures = record["results"][name]
        assert (
            len(figures["seconds"]) == 2
            and figures["pairs_per_s_min"] <= figures["pairs_per_s"] > 0
        )
    assert record["dali_over_reference"] > 0 and record["memory"]["host_peak_rss_MB"] > 0
    assert (
        record["decode_ceiling"]["images_per_s"] > 0
        and len(record["decode_ceiling"]["seconds"]) == 2
    )
    assert record["machine"]["cores"] >= 1
    # 21 samples in 5 shards: 5 batches of 4 per epoch, fewer than the 12 the run draws. DALI
    # reads them as one epoch of 3 copies, so that no new epoch (a pipeline built, a shuffle
    # buffer filled) falls in a timed window; what one costs is measured apart.
    config = record["config"]
    assert (config["samples"], config["shard_files"]) == (21, 5)
    assert record["dali_pipelines_opened_while_timing"] == 0
    assert config["dali_data"]["copies"] == 3 and config["dali_data"]["epoch_batches"] == 15
    reopen = record["dali_epoch_reopen"]
    assert len(reopen["dali_epoch_first_batch_s"]) == 3 and reopen["dali_steady_batch_s"] > 0
    assert reopen["batches_per_epoch"] >= 7 and isinstance(record["dali_epoch_reopen_s"], float)


def test_views_mode_times_the_recipe_with_each_operator_left_out(tmp_path, labelled_dump, capsys):
    from moco_dali.pipeline.recipes import cifar, v2
    from moco_dali.tools.bench.views import variants
    from moco_dali.tools.shards.build import build
    from moco_dali.tools.shards.settings import BuildSettings

    # Only the operators a recipe applies get a variant: cifar has no blur.
    assert list(variants(v2(32))) == [
        "whole recipe",
        "without jitter",
        "without grayscale",
        "without blur",
        "without flip",
        "crop only",
    ]
    assert "without blur" not in variants(cifar(32))
    crop_only = variants(v2(32))["crop only"]
    assert (crop_only.jitter_p, crop_only.gray_p, crop_only.blur_p, crop_only.flip_p) == (
        0,
        0,
        0,
        0,
    )
    assert (
        crop_only.crop_scale == v2(32).crop_scale
        and variants(v2(32))["without blur"].jitter_p == 0.8
    )

    build(
        [str(labelled_dump)],
        tmp_path / "shards",
        BuildSettings(max_count=5),
        workers=0,
        progress=False,
    )
    out = tmp_path / "views.json"
    assert (
        bench.main(
            [
                "views",
                "--shards",
                str(tmp_path / "shards"),
                "--data.views.size",
                "32",
                "--data.batch_size",
                "4",
                "--batches",
                "2",
                "--warmup",
                "1",
                "--reps",
                "2",
                "--data.threads",
                "1",
                "--device",
                "cpu",
                "--data.views.hue_space",
                "yiq",
                "--out",
                str(out),
                "--chart",
                str(tmp_path / "views.png"),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert record["mode"] == "views"
    other = record["other_branches"]
    assert {record["view_branches"], other["name"]} == {"conditional", "blend"}
    assert set(record["results"]) == set(variants(v2(32))) | {f"whole recipe, {other['name']}"}
    assert other["over_whole"] == pytest.approx(
        record["results"][f"whole recipe, {other['name']}"]["pairs_per_s"]
        / record["results"]["whole recipe"]["pairs_per_s"]
    )
    for figures in record["results"].values():
        assert (
            len(figures["seconds"]) == 2
            and figures["pairs_per_s_min"] <= figures["pairs_per_s"] > 0
        )
    whole = 1e6 / record["results"]["whole recipe"]["pairs_per_s"]
    assert record["whole_us_per_pair"] == pytest.approx(whole)
    jitter = record["costs"]["jitter"]
    assert jitter["us_per_pair"] == pytest.approx(
        whole - 1e6 / record["results"]["without jitter"]["pairs_per_s"]
    )
    assert jitter["share"] == pytest.approx(jitter["us_per_pair"] / whole)
    assert set(record["costs"]) == {"jitter", "grayscale", "blur", "flip", "all but the crop"}
    assert record["dali_pipelines_opened_while_timing"] == 0
    assert record["config"]["variants"]["crop only"]["blur_p"] == 0
    assert "of which:" in capsys.readouterr().out


def test_all_runs_every_mode_and_compare_and_chart_read_the_record(tmp_path, capsys, monkeypatch):
    import torch.utils.data

    # Each mode builds its reference DataLoader once and keeps it for every window
    # (the windows below need several epochs of the 24 photos).
    loaders = []

    class CountedDataLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            loaders.append(kwargs.get("num_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountedDataLoader)
    out = tmp_path / "all.json"
    assert (
        bench.main(
            [
                "all",
                "--model.arch",
                "resnet18",
                "--data.views.size",
                "32",
                "--data.batch_size",
                "16",
                "--batches",
                "1",
                "--reps",
                "2",
                "--warmup",
                "1",
                "--model.K",
                "256",
                "--synthetic",
                "24",
                "--workers",
                "1",
                "--data.threads",
                "1",
                "--calls",
                "1",
                "--build-workers",
                "1",
                "--data.views.hue_space",
                "yiq",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--chart",
                str(tmp_path / "all.png"),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    records = record["records"]
    assert set(records) == {"pipeline", "momentum", "step", "e2e", "shards"}
    for sub in records.values():
        assert {"cpu", "cores", "torch", "dali", "gpus"} <= set(sub["machine"]) and sub["date"]
    step = records["step"]
    assert (
        step["config"]["ours"]["channels_last"] and not step["config"]["reference"]["channels_last"]
    )
    assert step["config"]["reference"]["momentum_impl"] == "loop"
    assert step["results"]["ours"]["images_per_s"] > 0 and step["ours_over_reference"] > 0
    e2e = records["e2e"]
    assert set(e2e["results"]) == {"step_ours", "step_reference", "e2e_ours", "e2e_reference"}
    assert e2e["verdict"] in ("input-bound", "compute-bound", "overhead-bound") and e2e["advice"]
    assert (
        all(0 <= r["data_wait"] <= 1 for r in e2e["results"].values())
        and e2e["config"]["samples"] == 24
    )
    assert (
        records["shards"]["photos"]["count"] == 24
        and records["shards"]["results"]["baseline"]["img_per_s"] > 0
    )
    assert loaders == [1, 1]  # one reference loader for pipeline, one for e2e
    assert (
        records["pipeline"]["config"]["reference_split"]
        == e2e["config"]["reference_split"]
        == "shards"
    )
    for sub in (
        records["pipeline"],
        e2e,
    ):  # 24 photos: one batch of 16 per epoch, read as one long epoch
        assert (
            sub["dali_pipelines_opened_while_timing"] == 0
            and sub["config"]["dali_data"]["copies"] > 1
        )
        assert (
            sub["config"]["shard_files"] == 1
            and len(sub["dali_epoch_reopen"]["dali_epoch_first_batch_s"]) == 3
        )
    assert (tmp_path / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "training step" in printed and "shard build" in printed

    assert bench.main(["--compare", str(out), str(out)]) == 0
    table = capsys.readouterr().out
    for figure in (
        "pipeline pairs/s",
        "momentum update ms",
        "step images/s",
        "e2e images/s",
        "shard build reencode img/s",
    ):
        assert figure in table
    assert " 1.00 " in table


def test_all_records_a_failing_mode_and_still_runs_the_others(tmp_path, capsys, monkeypatch):
    """A first run on new hardware must not lose every figure to one broken mode."""
    from benchmarks.gpu_session import headline as session_headline

    def broken(args):
        raise RuntimeError("CUDA error: no kernel image is available\nsecond line")

    monkeypatch.setattr(bench, "bench_momentum", broken)
    out = tmp_path / "all.json"
    assert (
        bench.main(
            [
                "all",
                "--modes",
                "step,momentum",
                "--model.arch",
                "resnet18",
                "--data.views.size",
                "32",
                "--data.batch_size",
                "16",
                "--batches",
                "1",
                "--reps",
                "1",
                "--warmup",
                "1",
                "--model.K",
                "256",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--chart",
                str(tmp_path / "all.png"),
            ]
        )
        == 1
    )
    records = json.loads(out.read_text())["records"]
    assert list(records) == ["step", "momentum"]  # the asked modes only, in the order asked
    assert records["momentum"]["error"] == "RuntimeError: CUDA error: no kernel image is available"
    assert records["step"]["results"]["ours"]["images_per_s"] > 0
    assert (tmp_path / "all.png").is_file()  # drawn from the modes that ran
    captured = capsys.readouterr()
    assert "momentum: FAILED: RuntimeError" in captured.out and "momentum failed" in captured.err
    figures = session_headline(json.loads(out.read_text()))
    assert figures["momentum_error"].startswith("RuntimeError") and figures["step_images_per_s"] > 0
    assert "pipeline_pairs_per_s" not in figures

    # Every asked mode failed: the record still says why, and no empty chart is drawn.
    assert (
        bench.main(
            [
                "all",
                "--modes",
                "momentum",
                "--model.arch",
                "resnet18",
                "--model.K",
                "256",
                "--data.batch_size",
                "16",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--chart",
                str(tmp_path / "none.png"),
            ]
        )
        == 1
    )
    assert json.loads(out.read_text())["records"]["momentum"]["error"].startswith("RuntimeError")
    assert not (tmp_path / "none.png").exists() and "no chart" in capsys.readouterr().err


def test_all_stopped_part_way_leaves_the_modes_that_finished(tmp_path, monkeypatch, capsys):
    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "bench_step", stopped)
    out = tmp_path / "all.json"
    with pytest.raises(KeyboardInterrupt):  # a ^C; a SIGTERM kills outright, after the same writes
        bench.main(
            [
                "all",
                "--modes",
                "momentum,step",
                "--model.arch",
                "resnet18",
                "--model.K",
                "256",
                "--data.batch_size",
                "16",
                "--calls",
                "1",
                "--reps",
                "1",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
    record = json.loads(out.read_text())
    assert record["partial"] and list(record["records"]) == [
        "momentum"
    ]  # momentum runs before step, as asked
    assert record["records"]["momentum"]["floor_ms"] > 0 and record["machine"]["cores"] >= 1
    assert (
        bench.main(["--compare", str(out), str(out)]) == 0
    )  # said to be partial wherever it is shown
    assert "partial: the run stopped before its last mode" in capsys.readouterr().out


def test_compare_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{}")
    assert bench.main(["--compare", str(tmp_path / "bad.json"), str(tmp_path / "none.json")]) == 2
    assert "bad.json: not a moco-bench record" in capsys.readouterr().err
    assert bench.main(["--compare", str(tmp_path / "bad.json")]) == 2


def test_synthetic_generator_makes_photo_sized_decodable_jpegs(tmp_path):
    from moco_dali.tools.bench.synthetic import generate

    info = generate(tmp_path, 6, seed=3)
    sizes = []
    for path in sorted(tmp_path.glob("*.jpg")):
        data = path.read_bytes()
        height, width, _, subsampling = simplejpeg.decode_jpeg_header(data)
        assert (width, height) in ((500, 375), (375, 500)) and subsampling == "420"
        assert simplejpeg.decode_jpeg(data).shape == (height, width, 3)
        sizes.append(len(data))
    assert (
        len(sizes) == 6
        and 95_000 < np.mean(sizes) < 125_000
        and info["mean_KB"] == pytest.approx(np.mean(sizes) / 1000)
    )
    # Not noise: a photograph's neighbouring pixels are strongly correlated.
    image = simplejpeg.decode_jpeg((tmp_path / "0000000.jpg").read_bytes()).astype(float)
    assert np.corrcoef(image[:, :-1].ravel(), image[:, 1:].ravel())[0, 1] > 0.8


def test_generated_shards_give_every_reference_worker_its_own(tmp_path, monkeypatch):
    from moco_dali.pipeline import shards
    from moco_dali.tools.bench.common import shards_for
    from moco_dali.tools.bench.options import BenchOptions, Measure
    from moco_dali.train.config import Config

    # Formerly one shard per 1,000 photos: 2,000 photos and 16 workers left 14 idle.
    monkeypatch.setattr("tempfile.mkdtemp", lambda prefix="": str(tmp_path))
    measure = Measure(BenchOptions(synthetic=10, workers=4), Config())
    folder, info = shards_for(measure)
    manifest, pairs = shards.discover(folder)
    assert len(pairs) >= 4 and manifest.samples == 10 and info["count"] == 10


def test_reference_workers_split_few_shards_by_sample(tmp_path, labelled_dump):
    from moco_dali.pipeline import shards
    from moco_dali.pipeline.reference import reference_samples, worker_split
    from moco_dali.tools.shards.build import build
    from moco_dali.tools.shards.settings import BuildSettings

    build([str(labelled_dump)], tmp_path / "shards", BuildSettings(), workers=0, progress=False)
    urls = [str(tar) for tar, _ in shards.discover(tmp_path / "shards")[1]]
    assert len(urls) == 1 and worker_split(1, 3) == "samples" and worker_split(4, 3) == "shards"
    shares = []
    for worker in range(
        3
    ):  # what each of 3 DataLoader workers reads (webdataset reads these variables)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("WORKER", str(worker))
            env.setenv("NUM_WORKERS", "3")
            shares.append(
                [sample["__key__"] for sample in reference_samples(urls, workers=3, seed=0)]
            )
    # Split by shard, workers 1 and 2 would read nothing; by sample, each reads a third.
    assert [len(share) for share in shares] == [7, 7, 7]
    assert len(set().union(*shares)) == 21


def test_settle_drains_this_feed_and_waits_for_the_others_to_refill(monkeypatch):
    from moco_dali.tools.bench import common

    slept = []
    monkeypatch.setattr(common.time, "sleep", slept.append)
    ours = common.Feed(iter(range(100)), backlog=3)
    theirs = common.Feed(iter(range(100)), backlog=8)
    theirs.consumed(
        batches=10, seconds=2.0
    )  # 5 batches/s: its 8 prefetched batches take 1.6 s to refill
    assert common.settle(ours, [ours, theirs]) == pytest.approx(1.6) and slept == [
        pytest.approx(1.6)
    ]
    # The window then starts after what this feed had prepared ahead: no free batches in it.
    assert next(ours) == 3
    assert common.settle(ours, [ours, theirs]) == 0.0  # the other feed is full and idle now
    synthetic = common.Feed(iter(range(100)))
    synthetic.consumed(batches=10, seconds=1.0)
    assert common.settle(theirs, [ours, theirs, synthetic]) == 0.0 and next(theirs) == 8
