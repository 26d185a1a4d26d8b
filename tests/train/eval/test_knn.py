"""The kNN monitor: its classifier against a brute-force transcription, sharded over ranks, on damaged data;
the learning-rate schedules."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from moco_dali.pipeline.recipes import EvalConfig
from moco_dali.train.eval.knn import knn_classify
from moco_dali.train.schedule import learning_rates
from tests.conftest import forked_ranks


def brute_force(train_f, train_y, val_f, classes, k, t):
    predictions = []
    for v in val_f:
        similarity = [(float(v @ f), int(y)) for f, y in zip(train_f, train_y)]
        similarity.sort(key=lambda pair: -pair[0])
        votes = [0.0] * classes
        for s, y in similarity[:k]:
            votes[y] += math.exp(s / t)
        predictions.append(sorted(range(classes), key=lambda c: -votes[c]))
    return predictions


@pytest.mark.parametrize("k, max_elements", [(5, 2**27), (20, 300)])  # the second forces chunking
def test_knn_matches_brute_force(k, max_elements):
    g = torch.Generator().manual_seed(0)
    train_f = F.normalize(torch.randn(120, 8, generator=g), dim=1)
    train_y = torch.randint(0, 6, (120,), generator=g)
    val_f = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    val_y = torch.randint(0, 6, (40,), generator=g)
    result = knn_classify(
        train_f, train_y, val_f, val_y, classes=6, k=k, t=0.1, max_elements=max_elements
    )
    ranked = brute_force(train_f, train_y, val_f, 6, k, 0.1)
    top1 = 100 * np.mean([r[0] == int(y) for r, y in zip(ranked, val_y)])
    top5 = 100 * np.mean([int(y) in r[:5] for r, y in zip(ranked, val_y)])
    assert result["top1"] == pytest.approx(top1)
    if (
        k >= 20
    ):  # with fewer neighbours, classes without votes tie and top-5 is arbitrary among them
        assert result["top5"] == pytest.approx(top5)


def test_knn_finds_separable_classes():
    centres = F.normalize(torch.eye(4, 16), dim=1)
    labels = torch.arange(4).repeat_interleave(30)
    features = F.normalize(centres[labels] + 0.05 * torch.randn(120, 16), dim=1)
    assert knn_classify(features, labels, features, labels, classes=4, k=10)["top1"] == 100.0


def test_schedules():
    step = learning_rates(0.1, 10, 200, "step", (120, 160))
    assert (
        step[0] == pytest.approx(0.1)
        and step[1200] == pytest.approx(0.01)
        and step[1600] == pytest.approx(0.001)
    )
    assert step[1199] == pytest.approx(0.1)
    cosine = learning_rates(0.1, 10, 100, "cosine")
    assert (
        cosine[0] == pytest.approx(0.1) and cosine[500] == pytest.approx(0.05) and cosine[-1] < 1e-4
    )
    warm = learning_rates(0.1, 10, 100, "cosine", warmup_epochs=2)
    assert warm[0] == pytest.approx(0.1 / 20) and warm[19] == pytest.approx(0.1) and warm[20] < 0.1


# ---------------------------------------------------------------- sharded kNN, reading shares, errors


def dyadic(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Features whose dot products float32 computes exactly in any order: k-nearest sets cannot depend on BLAS."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1024, 1025, (rows, dim), generator=g).float() / 1024


def _sharded_worker(rank: int, world: int, store: str, root: str, out: str) -> None:
    import torch.distributed as dist

    from moco_dali.train.eval.knn import config_knn, extract_features

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    train_f, train_y = (
        dyadic(120, 16, 0),
        torch.randint(0, 6, (120,), generator=torch.Generator().manual_seed(1)),
    )
    val_f, val_y = (
        dyadic(40, 16, 2),
        torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(3)),
    )
    results = {}
    for name, cut in (
        ("uneven", 50),
        ("one rank empty", 0),
    ):  # rank 0 holds rows [0, cut), rank 1 the rest
        rows = slice(0, cut) if rank == 0 else slice(cut, 120)
        for k in (5, 60):  # 60 > 50: rank 0's share is smaller than k
            results[f"{name} k={k}"] = knn_classify(
                train_f[rows],
                train_y[rows],
                val_f,
                val_y,
                6,
                k=k,
                t=0.1,
                max_elements=300,
                sharded=True,
            )
    config, encoder = _tiny(Path(root))
    results["monitor"] = config_knn(
        encoder, config, torch.device("cpu"), None, rank=rank, world=world
    )
    share, _, _ = extract_features(
        encoder,
        config.data.knn_train,
        EvalConfig(resize=32, size=32),
        batch_size=8,
        device=torch.device("cpu"),
        threads=1,
        rank=rank,
        world=world,
    )
    results["share"] = share.shape[0]
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _tiny(root: Path):
    from moco_dali.train.presets import preset
    from moco_dali.train.step import build_model

    config = preset("small")
    config.model.K, config.model.small_stem, config.data.batch_size = 64, False, 16
    config.data.read = dataclasses.replace(config.data.read, threads=1)
    config.run.knn_k = 20
    config.data.knn_train, config.data.knn_val = str(root / "train"), str(root / "val")
    torch.manual_seed(0)
    return config, build_model(config, torch.device("cpu")).encoder_q


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory) -> Path:
    from moco_dali.tools.shards.build import build
    from moco_dali.tools.shards.settings import BuildSettings
    from tests.train.eval.test_eval import colour_dump

    root = tmp_path_factory.mktemp("knn")
    for split, n, seed in (("train", 40, 0), ("val", 12, 1)):
        colour_dump(root / f"raw-{split}", n, seed)
        build(
            [str(root / f"raw-{split}")],
            root / split,
            BuildSettings(labels="folder", max_count=16),
            workers=0,
            progress=False,
        )
    return root


def test_two_ranks_each_read_their_share_and_get_the_single_process_result(colour_shards, tmp_path):
    from moco_dali.train.eval.knn import config_knn

    forked_ranks(
        _sharded_worker, (2, str(tmp_path / "store"), str(colour_shards), str(tmp_path)), 2
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    train_f, train_y = (
        dyadic(120, 16, 0),
        torch.randint(0, 6, (120,), generator=torch.Generator().manual_seed(1)),
    )
    val_f, val_y = (
        dyadic(40, 16, 2),
        torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(3)),
    )
    for name in ("uneven", "one rank empty"):
        for k in (5, 60):
            alone = knn_classify(train_f, train_y, val_f, val_y, 6, k=k, t=0.1)
            assert ranks[0][f"{name} k={k}"] == ranks[1][f"{name} k={k}"] == alone, (name, k)
    config, encoder = _tiny(colour_shards)
    alone = config_knn(encoder, config, torch.device("cpu"), None)
    assert ranks[0]["monitor"] == ranks[1]["monitor"] == alone
    # 120 training images in shards of 16: each rank extracted its own share, not the folder
    assert sorted(r["share"] for r in ranks) == [56, 64]


def test_evaluation_decodes_on_the_gpu_torch_means(monkeypatch):
    """``torch.device("cuda")`` has no index: DALI must get the current device, not None (its CPU path)."""
    from moco_dali.train import distributed
    from moco_dali.train.eval import knn

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.dali_device_id(torch.device("cuda")) == 3
    assert distributed.dali_device_id(torch.device("cuda", 1)) == 1
    assert distributed.dali_device_id(torch.device("cpu")) is None
    asked = []

    class Stop(Exception):
        pass

    def loader(*args, device_id=None, **kwargs):
        asked.append(device_id)
        raise Stop

    monkeypatch.setattr(knn, "ViewLoader", loader)
    with pytest.raises(Stop):
        knn.extract_features(
            torch.nn.Identity(),
            "x",
            EvalConfig(resize=32, size=32),
            batch_size=1,
            device=torch.device("cuda"),
        )
    assert asked == [3]


def damaged(root: Path, ext: str, data: bytes) -> tuple[Path, str]:
    from tests.pipeline.test_loader import damage

    return damage(root, 1, 2, ext, data)


@pytest.mark.parametrize(
    "ext, data, message",
    [("jpg", b"JUNK", "does not decode"), ("cls", b"x", "class b'x' is not a class index in 0..2")],
)
def test_moco_eval_knn_names_a_damaged_sample_and_exits_2(
    colour_shards, tmp_path, ext, data, message
):
    """At the default batch (256) DALI 2.4 crashed moco-eval knn (exit -11) on a JPEG header it cannot parse."""
    import shutil
    import subprocess
    import sys

    from moco_dali.train.config import to_dict
    from moco_dali.train.step import build_model

    train = tmp_path / "train"
    shutil.copytree(colour_shards / "train", train)
    tar, key = damaged(train, ext, data)
    config, _ = _tiny(colour_shards)
    torch.save(
        {
            "model": build_model(config, torch.device("cpu")).state_dict(),
            "config": to_dict(config),
            "step": 1,
        },
        tmp_path / "ckpt.pt",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moco_dali.train.eval.cli",
            "knn",
            "--checkpoint",
            str(tmp_path / "ckpt.pt"),
            "--train",
            str(train),
            "--val",
            str(colour_shards / "val"),
            "--threads",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"moco-eval: error: {tar}: key {key}: {message}"
    ), lines


def test_the_knn_monitor_reads_folders_in_the_store_as_local_ones(colour_shards, s3):
    from moco_dali.tools.shards.cli import main as shards_main
    from moco_dali.train.eval.knn import config_knn

    bucket, faults = s3
    for split in ("train", "val"):
        assert shards_main(["push", str(colour_shards / split), f"s3://{bucket}/{split}"]) == 0
    config, encoder = _tiny(colour_shards)
    local = config_knn(encoder, config, torch.device("cpu"), None)
    config.data.knn_train, config.data.knn_val = f"s3://{bucket}/train", f"s3://{bucket}/val"
    faults.log.clear()
    assert config_knn(encoder, config, torch.device("cpu"), None) == local
    assert {p for m, p in faults.log if m == "GET" and p.endswith(".tar")}  # read from the store
