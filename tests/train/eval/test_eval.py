"""moco-eval: checkpoints in, the linear probe on a separable toy problem, kNN, the two export layouts, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
import torchvision
from torch import nn

from moco_dali.common.lock import FolderLock
from moco_dali.model.encoders import backbone
from moco_dali.tools.shards.build import build
from moco_dali.tools.shards.settings import BuildSettings
from moco_dali.train.config import to_dict
from moco_dali.train.eval.cli import main as moco_eval
from moco_dali.train.eval.linear import LOCK_NAME as LINEAR_LOCK
from moco_dali.train.eval.linear import linear_probe
from moco_dali.train.eval.pretrained import CheckpointError, detectron2_weights, load_encoder
from moco_dali.train.eval.protocol import EvalViews, LinearConfig
from moco_dali.train.presets import preset
from moco_dali.train.step import build_model
from tests.conftest import small_disk, write_files

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def colour_dump(root: Path, per_class: int, seed: int) -> Path:
    """Three classes told apart by colour alone: linearly separable for any sane features."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        files = {}
        for i in range(per_class):
            w, h = rng.integers(24, 48, 2)
            image = np.clip(np.array(rgb) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            files[f"{i:03d}.jpg"] = simplejpeg.encode_jpeg(image, 90, "RGB", "420")
        write_files(root / name, files)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for split, n, seed in (("train", 40, 0), ("val", 12, 1)):
        colour_dump(root / f"raw-{split}", n, seed)
        build(
            [str(root / f"raw-{split}")],
            root / split,
            BuildSettings(labels="folder"),
            workers=0,
            progress=False,
        )
        out[split] = root / split
    build([str(root / "raw-val")], root / "unlabelled", BuildSettings(), workers=0, progress=False)
    out["unlabelled"] = root / "unlabelled"
    return out


def tiny_config(mlp=True, small_stem=False):
    config = preset("v2")
    config.model.arch, config.model.mlp, config.model.small_stem, config.model.K = (
        "resnet18",
        mlp,
        small_stem,
        64,
    )
    config.data.views = dataclasses.replace(config.data.views, size=32)
    config.data.eval_resize = 32
    config.run.channels_last = False
    return config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A moco-train checkpoint whose query encoder differs from its step-0 encoder."""
    config = tiny_config()
    torch.manual_seed(config.run.seed)
    model = build_model(config, torch.device("cpu"))
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt-000000010.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(config), "step": 10}, path)
    return path


def test_load_encoder_gives_the_query_encoder_and_random_init_the_step_0_one(ckpt):
    encoder, info = load_encoder(ckpt)
    state = torch.load(ckpt, weights_only=False)["model"]
    assert (info.arch, info.mlp, info.dim, info.step, info.source) == (
        "resnet18",
        True,
        128,
        10,
        "moco-dali",
    )
    assert torch.equal(encoder.conv1.weight, state["encoder_q.conv1.weight"])
    assert torch.equal(encoder.fc[2].weight, state["encoder_q.fc.2.weight"])
    initial, _ = load_encoder(ckpt, random_init=True)
    # The fixture moved only encoder_q, so encoder_k still holds the step-0 weights.
    assert torch.equal(initial.conv1.weight, state["encoder_k.conv1.weight"])
    assert not torch.equal(initial.conv1.weight, encoder.conv1.weight)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip format", "legacy format"])
def test_reference_checkpoints_load(ckpt, tmp_path, zipped):
    """main_moco.py's layout: DataParallel/DDP names under state_dict, arch, epoch and the SGD state beside them.

    Read with weights_only=True, in the zip format and in the legacy one of the PyTorch the
    authors published with.
    """
    ours = torch.load(ckpt, weights_only=False)["model"]
    state_dict = OrderedDict((f"module.{k}", v) for k, v in ours.items())
    params = [v for k, v in ours.items() if k.startswith("encoder_q.") and v.is_floating_point()]
    sgd = torch.optim.SGD(
        [p.clone().requires_grad_() for p in params], lr=0.03, momentum=0.9, weight_decay=1e-4
    )
    for p in sgd.param_groups[0]["params"]:
        sgd.state[p]["momentum_buffer"] = torch.zeros_like(p)
    reference = {
        "epoch": 200,
        "arch": "resnet18",
        "state_dict": state_dict,
        "optimizer": sgd.state_dict(),
    }
    torch.save(
        reference, tmp_path / "checkpoint_0199.pth.tar", _use_new_zipfile_serialization=zipped
    )
    encoder, info = load_encoder(tmp_path / "checkpoint_0199.pth.tar")
    assert (info.source, info.arch, info.mlp, info.dim, info.small_stem) == (
        "reference",
        "resnet18",
        True,
        128,
        False,
    )
    assert info.step == 200
    assert torch.equal(encoder.layer4[1].conv2.weight, ours["encoder_q.layer4.1.conv2.weight"])


def test_export_torchvision_loads_strictly_and_gives_the_same_features(ckpt, tmp_path):
    assert (
        moco_eval(
            [
                "export",
                "--checkpoint",
                str(ckpt),
                "--format",
                "torchvision",
                "--out",
                str(tmp_path / "r18.pth"),
            ]
        )
        == 0
    )
    plain = torchvision.models.resnet18()
    plain.fc = nn.Identity()
    plain.load_state_dict(torch.load(tmp_path / "r18.pth"), strict=True)
    encoder, _ = load_encoder(ckpt)
    images = torch.randn(4, 3, 32, 32)
    plain.eval()
    assert torch.allclose(plain(images), backbone(encoder.eval(), images), atol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_detectron2_has_the_reference_names_and_shapes(ckpt, tmp_path):
    assert (
        moco_eval(
            [
                "export",
                "--checkpoint",
                str(ckpt),
                "--format",
                "detectron2",
                "--out",
                str(tmp_path / "r18.pkl"),
            ]
        )
        == 0
    )
    with open(tmp_path / "r18.pkl", "rb") as f:
        exported = pickle.load(f)
    assert exported["__author__"] == "MOCO" and exported["matching_heuristics"] is True
    weights = exported["model"]
    encoder, _ = load_encoder(ckpt)
    expected = {  # detectron2 name -> torchvision name, as convert-pretrain-to-detectron2.py maps them
        "stem.conv1.weight": "conv1.weight",
        "stem.conv1.norm.weight": "bn1.weight",
        "stem.conv1.norm.running_var": "bn1.running_var",
        "res2.0.conv1.weight": "layer1.0.conv1.weight",
        "res2.1.conv2.norm.bias": "layer1.1.bn2.bias",
        "res3.0.shortcut.weight": "layer2.0.downsample.0.weight",
        "res3.0.shortcut.norm.running_mean": "layer2.0.downsample.1.running_mean",
        "res5.1.conv2.weight": "layer4.1.conv2.weight",
    }
    state = encoder.state_dict()
    for name, source in expected.items():
        assert isinstance(weights[name], np.ndarray)
        assert np.array_equal(weights[name], state[source].numpy()), name
    assert not any("fc" in k or "layer" in k or "bn" in k or "downsample" in k for k in weights)
    assert len(weights) == len([k for k in state if not k.startswith("fc.")])


def test_detectron2_names_for_a_bottleneck_resnet():
    weights = detectron2_weights(torchvision.models.resnet50())["model"]
    assert weights["res2.0.conv3.norm.weight"].shape == (256,)
    assert weights["res5.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert weights["res4.0.shortcut.weight"].shape == (1024, 512, 1, 1)


def test_knn_cli_classifies_colours_and_writes_json(ckpt, shards, tmp_path, capsys):
    assert (
        moco_eval(
            [
                "knn",
                "--checkpoint",
                str(ckpt),
                "--train",
                str(shards["train"]),
                "--val",
                str(shards["val"]),
                "--k",
                "20",
                "--threads",
                "1",
                "--json",
                str(tmp_path / "knn.json"),
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "knn.json").read_text())
    # 100 for every data and model seed tried; unnormalised features give 33 to 67.
    assert record["top1"] >= 90 and record["train_samples"] == 120 and record["val_samples"] == 36
    assert "top-1" in capsys.readouterr().out


def test_linear_probe_learns_a_separable_problem_and_resumes_exactly(ckpt, shards, tmp_path):
    encoder, _ = load_encoder(ckpt)
    # A random ResNet-18's features have a norm of about 15: at lr 1 the probe overshoots (training
    # losses of 50 to 140, top-1 swinging between 33 and 100 from epoch to epoch); at 0.03 it
    # converges on every seed tried, to top-1 100 and a validation loss under 0.02.
    views = EvalViews(batch_size=16, size=32, resize=32, threads=1)
    cfg = LinearConfig(views=views, epochs=4, lr=0.03, progress=False)
    result = linear_probe(
        encoder, str(shards["train"]), str(shards["val"]), cfg, tmp_path / "a", torch.device("cpu")
    )
    assert result["top1"] >= 97 and result["backbone_unchanged"]
    # A classifier that never steps stays near ln 3 = 1.1; one trained at a thirtieth of the rate ends at 0.6 to 0.8.
    assert result["history"][-1]["val_loss"] < 0.3
    assert len(result["history"]) == 4 and all("val_top1" in r for r in result["history"])
    records = [
        json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]

    # Interrupted after epoch 3: the newest checkpoint gone, resume from epoch 3's.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "ckpt-000000004.pt").unlink()
    encoder, _ = load_encoder(ckpt)
    resumed = linear_probe(
        encoder, str(shards["train"]), str(shards["val"]), cfg, tmp_path / "b", torch.device("cpu")
    )
    assert resumed["history"] == result["history"]

    other = LinearConfig(views=views, epochs=5, lr=0.03, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        linear_probe(
            encoder,
            str(shards["train"]),
            str(shards["val"]),
            other,
            tmp_path / "a",
            torch.device("cpu"),
        )


def test_linear_cli_end_to_end(ckpt, shards, tmp_path, capsys):
    assert (
        moco_eval(
            [
                "linear",
                "--checkpoint",
                str(ckpt),
                "--train",
                str(shards["train"]),
                "--val",
                str(shards["val"]),
                "--epochs",
                "1",
                "--lr",
                "1",
                "--batch-size",
                "32",
                "--threads",
                "1",
                "--out",
                str(tmp_path / "lin"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "lin" / "linear.json").read_text())["epochs"] == 1
    assert "backbone unchanged" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                "export",
                "--checkpoint",
                "{tmp}/nothing.pt",
                "--format",
                "torchvision",
                "--out",
                "{tmp}/x.pth",
            ],
            "nothing.pt: no such checkpoint",
        ),
        (
            [
                "export",
                "--checkpoint",
                "{ckpt}",
                "--arch",
                "resnet50",
                "--format",
                "torchvision",
                "--out",
                "{tmp}/x.pth",
            ],
            "a resnet18 checkpoint, not resnet50",
        ),
        (
            [
                "export",
                "--checkpoint",
                "{tmp}/junk.pt",
                "--format",
                "torchvision",
                "--out",
                "{tmp}/x.pth",
            ],
            "junk.pt: not a readable checkpoint",
        ),
        (
            [
                "export",
                "--checkpoint",
                "{tmp}/other.pt",
                "--format",
                "torchvision",
                "--out",
                "{tmp}/x.pth",
            ],
            "neither a moco-train checkpoint nor a reference MoCo checkpoint",
        ),
        (
            [
                "export",
                "--checkpoint",
                "{tmp}/wrong.pt",
                "--format",
                "detectron2",
                "--out",
                "{tmp}/x.pkl",
            ],
            "weights do not fit resnet50",
        ),
        (
            [
                "knn",
                "--checkpoint",
                "{ckpt}",
                "--train",
                "{unlabelled}",
                "--val",
                "{val}",
                "--threads",
                "1",
            ],
            "needs labelled shards",
        ),
        (
            [
                "linear",
                "--checkpoint",
                "{ckpt}",
                "--train",
                "{unlabelled}",
                "--val",
                "{val}",
                "--threads",
                "1",
                "--out",
                "{tmp}/lin",
            ],
            "the shards have no labels",
        ),
        (["knn", "--checkpoint", "{ckpt}", "--train", "{tmp}", "--val", "{val}"], "no manifest"),
    ],
)
def test_errors_are_one_line_naming_the_culprit(argv, message, ckpt, shards, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    wrong = torch.load(ckpt, weights_only=False)
    wrong["config"]["model"]["arch"] = "resnet50"  # resnet18 weights claiming to be a resnet50
    torch.save(wrong, tmp_path / "wrong.pt")
    values = {"tmp": tmp_path, "ckpt": ckpt, **shards}
    assert moco_eval([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moco-eval: error: ") and message in err and "\n" not in err


def test_load_encoder_rejects_a_state_dict_without_encoder_q(tmp_path):
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(1)}}, tmp_path / "sup.pth")
    with pytest.raises(CheckpointError, match="no encoder_q weights"):
        load_encoder(tmp_path / "sup.pth")


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write in, whether or not it runs as root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return folder
    return Path("/sys/fs")  # root writes anywhere but here


@pytest.mark.parametrize("where", ["a folder", "a read-only place"])
def test_export_that_cannot_be_written_is_one_line_and_leaves_no_temporary_file(
    ckpt, tmp_path, capsys, where
):
    out = tmp_path / "exports" if where == "a folder" else _unwritable(tmp_path) / "r18.pth"
    (tmp_path / "exports").mkdir()
    assert (
        moco_eval(
            ["export", "--checkpoint", str(ckpt), "--format", "torchvision", "--out", str(out)]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moco-eval: error: --out {out}: ") and "\n" not in err, err
    assert not list(out.parent.glob(".*.tmp")) and not list((tmp_path / "exports").iterdir())


def test_export_on_a_full_disk_is_one_line_and_keeps_the_file_there(ckpt, tmp_path, capsys):
    """torch.save turns the full disk into a RuntimeError; it ends in one line all the same."""
    out = tmp_path / "r18.pth"
    out.write_bytes(b"the previous export")
    argv = ["export", "--checkpoint", str(ckpt), "--format", "torchvision", "--out", str(out)]
    with small_disk(1 << 20):  # a ResNet-18 backbone is 45 MB
        assert moco_eval(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"moco-eval: error: --out {out}: cannot write (File too large)"
    )
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["r18.pth"]  # no temporary or lock file


def test_an_export_or_probe_into_a_place_in_use_is_refused_in_one_line(
    ckpt, shards, tmp_path, capsys
):
    export = tmp_path / "r18.pth"
    with FolderLock(tmp_path / ".r18.pth.lock", "moco-eval export", "--out"):
        argv = ["export", "--checkpoint", str(ckpt), "--format", "torchvision"]
        assert moco_eval([*argv, "--out", str(export)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"moco-eval: error: {tmp_path}: in use by another moco-eval export")
        assert err.endswith("holds .r18.pth.lock); wait for it to end or use another --out")
        assert moco_eval([*argv, "--out", str(tmp_path / "other.pth")]) == 0  # its own lock
    assert not export.exists()

    out = tmp_path / "lin"
    with FolderLock(out / LINEAR_LOCK, "moco-eval linear", "--out", create=True):
        args = ["--train", str(shards["train"]), "--val", str(shards["val"]), "--epochs", "1"]
        assert moco_eval(["linear", "--checkpoint", str(ckpt), *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"moco-eval: error: {out}: in use by another moco-eval linear")
        assert [p.name for p in out.iterdir()] == [LINEAR_LOCK]


@pytest.mark.parametrize(
    "option, value",
    [
        ("--t", "0"),
        ("--t", "-0.1"),
        ("--t", "nan"),
        ("--k", "0"),
        ("--batch-size", "0"),
        ("--threads", "-1"),  # 0 is the default: all cores
        ("--size", "0"),
        ("--resize", "-1"),
    ],
)
def test_impossible_knn_options_are_refused_in_one_line(
    ckpt, shards, tmp_path, capsys, option, value
):
    argv = [
        "knn",
        "--checkpoint",
        str(ckpt),
        "--train",
        str(shards["train"]),
        "--val",
        str(shards["val"]),
        option,
        value,
    ]
    assert moco_eval(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moco-eval: error: {option} ") and "\n" not in err, err


@pytest.mark.parametrize(
    "option, value",
    [
        ("--lr", "0"),
        ("--momentum", "1"),
        ("--weight-decay", "-1"),
        ("--milestones", "2"),
        ("--val-every", "0"),
        ("--epochs", "0"),
    ],
)
def test_impossible_linear_options_are_refused_in_one_line(
    ckpt, shards, tmp_path, capsys, option, value
):
    argv = [
        "linear",
        "--checkpoint",
        str(ckpt),
        "--train",
        str(shards["train"]),
        "--val",
        str(shards["val"]),
        "--out",
        str(tmp_path / "lin"),
        option,
        value,
    ]
    assert moco_eval(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moco-eval: error: {option} ") and "\n" not in err, err
    assert not (tmp_path / "lin").exists()


def test_argparse_errors_are_one_line_too(capsys):
    assert moco_eval(["export", "--checkpoint", "x.pt", "--format", "onnx", "--out", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("moco-eval export: error: argument --format: invalid choice")
        and "\n" not in err
    )


def _stored(ckpt: Path, tmp_path: Path, edit) -> Path:
    state = torch.load(ckpt, weights_only=False)
    edit(state["config"])
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("random_init", [False, True], ids=["weights", "random-init"])
@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["model"].update(dim=10**11),
            "model.dim must be in 1..65536, got 100000000000",
        ),
        (lambda c: c["model"].update(dim="abc"), "model.dim: expected int, got 'abc'"),
        (lambda c: c["model"].update(K=2**40), "model.K must be in 1..16777216"),
        (lambda c: c.update(model=[1]), "'model' is a section of keys, not a value"),
    ],
    ids=["dim 10**11", "dim 'abc'", "K 2**40", "model a list"],
)
def test_a_stored_configuration_is_checked_before_anything_is_built(
    ckpt, tmp_path, edit, message, random_init
):
    """The old variants: dim 10**11 set out to allocate 800 TB of head, "abc" a TypeError."""
    path = _stored(ckpt, tmp_path, edit)
    with pytest.raises(CheckpointError) as refused:
        load_encoder(path, random_init=random_init)
    assert str(refused.value).startswith(f"{path}: its stored configuration: ")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_stored_size_given_as_a_string_is_read_as_the_number(ckpt, tmp_path):
    """The old variant: moco-eval's default crop from data.views.size "32" ended in a TypeError."""
    from moco_dali.train.eval.cli import _sizes

    for edit in (
        lambda c: c["data"]["views"].update(size="32"),
        lambda c: c["data"].update(size=c["data"]["views"].pop("size") and "32"),  # legacy key
    ):
        _, info = load_encoder(_stored(ckpt, tmp_path, edit))
        views = _sizes(EvalViews(), info)
        assert (views.size, views.resize) == (32, 32)


def test_knn_on_a_manifest_that_is_a_json_list_is_one_line(ckpt, shards, tmp_path, capsys):
    """The old variant: an AttributeError traceback from the manifest's reader."""
    folder = Path(shutil.copytree(shards["val"], tmp_path / "val"))
    (folder / "manifest.json").write_text("[1, 2]")
    argv = ["knn", "--checkpoint", str(ckpt), "--train", str(folder), "--val", str(shards["val"])]
    assert moco_eval([*argv, "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moco-eval: error: {folder / 'manifest.json'}: not a moco-dali-shards manifest"
