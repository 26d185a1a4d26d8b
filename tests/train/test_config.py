"""The configuration tree: every impossible value refused in one line naming its key, before any work; the views.

The rules are the classes' own (AugmentConfig, LoaderConfig, EvalConfig, MoCo and its
parts, the optimizers, the schedules); ``validate`` builds them from the tree (the model
on the meta device) and names the key. Property tests feed every key every kind of
value: it validates, or it ends in a ConfigError of one line that names the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moco_dali.common.options import leaves
from moco_dali.train.cli import main, parse
from moco_dali.train.config import Config, ConfigError, from_dict, to_dict
from moco_dali.train.distributed import Dist
from moco_dali.train.engine import prepare
from moco_dali.train.folders import steps_per_epoch
from moco_dali.train.presets import resolve
from moco_dali.train.resume import resume_changes

REPO = Path(__file__).resolve().parents[2]
META = Dist(rank=0, world=1, local_rank=0, device=torch.device("meta"))
"""One process whose model and optimizer are built on PyTorch's meta device: every rule is
checked, no memory is spent (the property tests build thousands)."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small labelled shard folder of 30 drawn images in 3 shards: a real data.train."""
    from moco_dali.tools.demo.data import generated_dump
    from moco_dali.tools.shards.build import build
    from moco_dali.tools.shards.settings import BuildSettings

    root = tmp_path_factory.mktemp("config")
    generated_dump(root / "raw", per_class=3, seed=0)
    build(
        [str(root / "raw")],
        root / "train",
        BuildSettings(max_count=10, labels="folder"),
        workers=0,
        progress=False,
    )
    return root / "train"


def base(tmp_path: Path, shards: Path) -> list[str]:
    """A valid command line that does no work unless run (resnet18, batch 16, K 4096)."""
    return [
        "--preset",
        "v2",
        "--model.arch",
        "resnet18",
        "--model.K",
        "4096",
        "--data.batch_size",
        "16",
        "--data.train",
        str(shards),
        "--run.out",
        str(tmp_path / "out"),
        "--run.device",
        "cpu",
    ]


def refusal(argv: list[str]) -> str:
    """The ConfigError ``moco-train`` would print for ``argv``: parsed, then prepared as the
    engine prepares a run (on the meta device)."""
    with pytest.raises(ConfigError) as caught:
        config, _ = parse(argv)
        prepare(config, META)
    return str(caught.value)


# Each of issue #14's impossible values, and the key its line must name.
IMPOSSIBLE = [
    (["--optim.lr_per_256", "-0.03"], "optim.lr_per_256"),
    (["--optim.lr_per_256", "0"], "optim.lr_per_256"),
    (["--data.views.size", "0"], "data.views.size"),
    (["--data.batch_size", "0"], "data.batch_size"),
    (["--model.m", "2"], "model.m"),
    (["--model.T", "0"], "model.T"),
    (["--data.threads", "-1"], "data.threads"),
    (["--data.shuffle_buffer", "0"], "data.shuffle_buffer"),
    (["--model.arch", "resnet5"], "model.arch"),
    (["--model.dim", "0"], "model.dim"),
    (["--data.preset", "v3"], "data.preset"),
    (["--data.views.hue_space", "lab"], "data.views.hue_space"),
    (["--model.shuffle", "shuffled"], "model.shuffle"),
    (["--data.batch_size", "12"], "model.num_splits"),  # 8 splits do not divide 12
    (["--data.batch_size", "8"], "model.num_splits"),  # one sample per split: BN cannot train on it
    (["--run.max_steps", "-5"], "run.max_steps"),
    (["--run.epochs", "1000000"], "run.epochs"),  # schedules of more steps than memory holds
    (["--run.seed", "-1"], "run.seed"),
    (
        ["--data.dtype", "float16", "--run.amp", "none"],
        "data.dtype",
    ),  # half views into a float32 model
    (["--model.momentum_schedule", "linear"], "model.momentum_schedule"),
    (["--optim.momentum", "-0.5"], "optim.momentum"),
    (["--optim.weight_decay", "-1"], "optim.weight_decay"),
    (["--optim.name", "lars", "--optim.trust_coefficient", "0"], "optim.trust_coefficient"),
    (["--model.K", "4611686018427387904"], "model.K"),  # too large even for the meta device
    (["--data.views.jitter_p", "1.5"], "data.views.jitter_p"),
    (["--data.views.crop_scale", "0.5,0.2"], "data.views.crop_scale"),
    (["--data.views.mean", "0.5,0.5"], "data.views.mean"),
    (["--data.views.blur_sigma", "[0, 2]"], "data.views.blur_sigma"),
    (["--data.views.jitter", "0.4,0.4,0.4,0.6"], "data.views.jitter"),
    (["--data.views.flip_p", "nan"], "data.views.flip_p"),
    (["--data.knn_train", "a", "--data.knn_val", "b", "--run.knn_t", "0"], "run.knn_t"),
    (
        [
            "--data.knn_train",
            "a",
            "--data.knn_val",
            "b",
            "--data.eval_resize",
            "16",
            "--data.views.size",
            "32",
        ],
        "data.eval_resize",
    ),
]


@pytest.mark.parametrize("extra, key", IMPOSSIBLE, ids=[" ".join(extra) for extra, _ in IMPOSSIBLE])
def test_each_impossible_value_is_refused_naming_its_key(tmp_path, extra, key, shards):
    message = refusal([*base(tmp_path, shards), *extra])
    assert key in message and "\n" not in message, message


@pytest.mark.parametrize(
    "extra, key",
    [
        (["--model.T", "0"], "model.T"),
        (["--data.batch_size", "8"], "model.num_splits"),
        (["--run.max_steps", "-5"], "run.max_steps"),
        (["--data.views.gray_p", "2"], "data.views.gray_p"),
        (["--run.epochs"], "--run.epochs"),  # argparse's own error, one line too
    ],
)
def test_the_command_prints_one_line_and_exits_2(tmp_path, capsys, extra, key, shards):
    assert main([*base(tmp_path, shards), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moco-train: error: ") and key in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write in, whether or not it runs as root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return folder
    (folder / "probe").unlink()
    return Path("/sys/fs")  # root writes anywhere but here


def test_run_out_that_is_a_file_or_unwritable_is_refused(tmp_path, capsys, shards):
    (tmp_path / "file").write_text("")
    assert main([*base(tmp_path, shards), "--run.out", str(tmp_path / "file")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"moco-train: error: run.out {tmp_path / 'file'}: a file, not a folder"
    )
    # Under a read-only folder: found by writing a file there (root passes access()).
    out = _unwritable(tmp_path) / "run"
    message = refusal([*base(tmp_path, shards), "--run.out", str(out)])
    assert message.startswith(f"run.out {out}: cannot write there"), message


def test_a_subprocess_refusal_has_no_traceback(tmp_path, shards):
    """The command itself, as a user runs it: exit 2, one line on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "moco_dali.train", *base(tmp_path, shards), "--model.m", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "moco-train: error: model.m: need 0 <= m <= 1 and T > 0, got m=2.0, T=0.2"
    ]


# ----------------------------------------------------------------------- property tests


LEAVES = sorted(leaves(Config))
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2, max_value=2),
    st.text(max_size=12),
    st.sampled_from(
        [
            "auto",
            "v1",
            "v2",
            "hsv",
            "yiq",
            "sgd",
            "lars",
            "none",
            "split",
            "float16",
            "bf16",
            "resnet18",
            "cosine",
            "0.5,1",
            "[0.1, 2]",
            "1e-3",
        ]
    ),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5),
    st.lists(st.floats(min_value=0, max_value=1.5), min_size=2, max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _holds(config_or_error, keys: list[str]) -> None:
    """It validated, or it is one line naming one of ``keys``."""
    if isinstance(config_or_error, ConfigError):
        message = str(config_or_error)
        assert "\n" not in message
        assert any(key in message for key in keys), (keys, message)


def _try(tmp_path: Path, shards: Path, overrides: dict) -> object:
    fixed = {
        "model.arch": "resnet18",
        "model.K": 4096,
        "data.batch_size": 16,
        "data.train": str(shards),
        "run.out": str(tmp_path / "out"),
        "run.device": "cpu",
    }
    try:
        config = resolve("v2", None, {**fixed, **overrides})
        prepare(config, META)
        return config
    except ConfigError as error:
        return error


@settings(
    max_examples=400,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(key=st.sampled_from(LEAVES), value=ANY_VALUE)
def test_any_value_of_any_key_validates_or_names_the_key(tmp_path, shards, key, value):
    if key == "run.resume" and isinstance(value, str) and value not in ("", "auto"):
        value = str(tmp_path / "no-such-checkpoint")  # never a path that exists by chance
    _holds(_try(tmp_path, shards, {key: value}), [key])


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    values=st.dictionaries(
        st.sampled_from([k for k in LEAVES if k != "run.resume"]), ANY_VALUE, min_size=2, max_size=4
    )
)
def test_several_bad_values_name_one_of_them(tmp_path, shards, values):
    _holds(_try(tmp_path, shards, values), list(values))


def test_the_property_catches_a_rule_that_names_nothing(tmp_path, shards, monkeypatch):
    """A check that forgets its key fails ``_holds``: the property would catch it."""
    from moco_dali.common import options

    monkeypatch.setattr(options, "_say", lambda key, field, value, error: str(error))
    with pytest.raises(AssertionError):
        _holds(_try(tmp_path, shards, {"model.m": 2}), ["model.m"])


# ----------------------------------------------------------------------- the views


def test_the_tree_holds_the_owners_classes_and_declares_each_key_once():
    """data.views is the pipeline's AugmentConfig, the reading keys its ReadConfig: their fields
    are the tree's keys, with no copy of them anywhere in train/config.py."""
    from moco_dali.pipeline.config import ReadConfig
    from moco_dali.pipeline.recipes import AugmentConfig

    keys = set(leaves(Config))
    views = {f"data.views.{f.name}" for f in dataclasses.fields(AugmentConfig)}
    read = {f"data.{f.name}" for f in dataclasses.fields(ReadConfig)}
    assert views <= keys and read <= keys
    config = Config()
    assert type(config.data.views) is AugmentConfig and type(config.data.read) is ReadConfig
    source = (REPO / "train" / "config.py").read_text()
    for name in ("jitter_p", "crop_scale", "hue_space", "shuffle_buffer", "hw_decoder_load"):
        assert f"{name}:" not in source  # declared where it is owned, not restated


def test_preset_fills_the_views_and_keys_override_them(tmp_path, shards):
    from moco_dali.pipeline.recipes import v1, v2

    config, _ = parse(base(tmp_path, shards))
    assert config.data.views == v2(224)
    assert to_dict(config)["data"]["views"]["blur_p"] == 0.5  # resolved, as config.json shows it
    config, _ = parse(
        [
            *base(tmp_path, shards),
            "--data.preset",
            "v1",
            "--data.views.jitter_p",
            "0.8",
            "--data.views.crop_scale",
            "0.08,1",
            "--data.views.blur_p",
            "0",
        ]
    )
    expected = dataclasses.replace(v1(224), jitter_p=0.8, crop_scale=(0.08, 1.0), blur_p=0.0)
    assert config.data.views == expected
    assert config.data.views.gray_before_jitter is True  # v1's, not v2's


def test_views_from_toml_and_yaml_sections(tmp_path, shards):
    (tmp_path / "run.toml").write_text(
        '[data]\npreset = "v1"\n[data.views]\njitter_p = 0.8\nblur_sigma = [0.5, 1.5]\n'
    )
    (tmp_path / "run.yaml").write_text("data:\n  views:\n    flip_p: 0.0\n    hue_space: yiq\n")
    config, _ = parse(
        [
            *base(tmp_path, shards),
            "--config",
            str(tmp_path / "run.toml"),
            "--data.views.jitter_p",
            "0.6",
        ]
    )
    assert (config.data.views.jitter_p, config.data.views.blur_sigma, config.data.views.gray_p) == (
        0.6,
        (0.5, 1.5),
        0.2,
    )
    config, _ = parse([*base(tmp_path, shards), "--config", str(tmp_path / "run.yaml")])
    assert (config.data.views.flip_p, config.data.views.hue_space) == (0.0, "yiq")
    (tmp_path / "bad.toml").write_text("[data.views]\njitter_q = 0.8\n")
    assert "unknown key 'data.views.jitter_q' (did you mean data.views.jitter_p?)" in refusal(
        [*base(tmp_path, shards), "--config", str(tmp_path / "bad.toml")]
    )
    assert "'data.views' is a section" in refusal([*base(tmp_path, shards), "--data.views", "1"])


def test_the_resolved_views_survive_a_round_trip_through_config_json(tmp_path, shards):
    config, _ = parse([*base(tmp_path, shards), "--data.views.jitter", "0.2,0.2,0.2,0.05"])
    again = from_dict(json.loads(json.dumps(to_dict(config))))
    assert again.data.views == config.data.views
    assert resume_changes(to_dict(config), again) == ({}, {})


# ----------------------------------------------------------------------- resuming with other keys


def test_keys_that_change_the_state_or_meaning_are_refused_the_others_allowed(tmp_path, shards):
    stored, _ = parse(base(tmp_path, shards))
    stored = to_dict(stored)
    changed, _ = parse(
        [
            *base(tmp_path, shards),
            "--model.K",
            "8192",
            "--data.batch_size",
            "128",
            "--optim.lr_per_256",
            "0.06",
            "--data.views.blur_p",
            "0",
            "--run.epochs",
            "100",
            "--run.max_steps",
            "50",
            "--run.log_every",
            "5",
            "--data.threads",
            "2",
        ]
    )
    allowed, refused = resume_changes(stored, changed)
    assert set(refused) == {
        "model.K",
        "data.batch_size",
        "optim.lr_per_256",
        "data.views.blur_p",
        "run.epochs",
    }
    assert set(allowed) == {"run.max_steps", "run.log_every", "data.threads"}
    assert refused["model.K"] == (4096, 8192)
    # The same shard folder spelled another way is the same folder.
    relative, _ = parse([*base(tmp_path, shards), "--data.train", os.path.relpath(shards)])
    assert resume_changes(stored, relative) == ({}, {})


def test_stored_configurations_of_earlier_versions_are_read_with_their_keys_renamed(
    tmp_path, shards
):
    """A checkpoint of the version before data.views held the recipe stores data.size."""
    config, _ = parse(base(tmp_path, shards))
    stored = to_dict(config)
    stored["data"]["size"] = stored["data"]["views"].pop("size")
    assert from_dict(stored).data.views.size == config.data.views.size
    assert resume_changes(stored, config) == ({}, {})


def test_numbers_parse_as_their_types():
    config = resolve(
        "v2",
        None,
        {
            "run.epochs": "7",
            "optim.milestones": "[3, 4.5]",
            "data.views.mean": "0.5, 0.5, 0.5",
            "run.knn_t": "0.05",
        },
    )
    assert (config.run.epochs, config.optim.milestones, config.data.views.mean) == (
        7,
        (3, 4.5),
        (0.5, 0.5, 0.5),
    )
    for key, value in (
        ("run.epochs", "7.5"),
        ("run.epochs", True),
        ("run.knn_t", "inf"),
        ("data.views.mean", "a,b"),
        ("run.epochs", [1]),
        ("data.train", "a\0b"),
        ("run.epochs", 2**70),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            resolve("v2", None, {key: value})
    assert math.isclose(config.run.knn_t, 0.05)


def test_the_training_folder_is_checked_from_its_manifest_alone(tmp_path):
    """A whole batch for every rank, from the shard counts: what the loader would refuse, before
    any work."""
    from moco_dali.tools.demo.data import generated_dump
    from moco_dali.tools.shards.build import build
    from moco_dali.tools.shards.settings import BuildSettings

    generated_dump(tmp_path / "raw", per_class=3, seed=0)  # 30 images
    build(
        [str(tmp_path / "raw")],
        tmp_path / "train",
        BuildSettings(max_count=10),
        workers=0,
        progress=False,
    )
    config = Config()
    config.data.train = str(tmp_path / "train")
    config.data.batch_size = 30
    assert steps_per_epoch(config, world=1) == 1
    assert steps_per_epoch(config, world=3) == 1  # a shard of 10 for each rank
    with pytest.raises(
        ConfigError,
        match=r"^data.batch_size 30 leaves a rank of 2 no whole batch of 15 per epoch in "
        r"data.train .* \(30 samples in 3 shards dealt whole to the ranks\); use fewer",
    ):
        steps_per_epoch(config, world=2)  # shards are dealt whole: 20 and 10
    config.data.batch_size = 32
    with pytest.raises(
        ConfigError,
        match=r"^data.batch_size 32 is larger than the 30 samples of data.train .*: use a "
        "smaller batch or more samples$",
    ):
        steps_per_epoch(config, world=1)
    for shard in (tmp_path / "train").glob("*.tar"):
        shard.unlink()  # the shards are not opened: the loader's ranks open their own
    config.data.batch_size = 30
    steps_per_epoch(config, world=1)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"dim": 10**11}, "model.dim must be in 1..65536, got 100000000000"),
        ({"K": 2**30}, "model.K must be in 1..16777216, got 1073741824"),
        ({"K": 2**24, "dim": 2**10}, "K x dim = 17179869184 queue values, over the limit of"),
    ],
)
def test_model_sizes_from_a_stored_tree_are_bounded_before_any_allocation(model, message):
    """The old variant: a stored model.dim of 10**11 built a head of 800 TB (or tried to)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict({"model": model})


def test_a_stored_tree_that_is_not_sections_or_is_too_deep_is_one_line():
    with pytest.raises(ConfigError, match="^checkpoint: expected sections of keys, got list$"):
        from_dict([1])
    deep: dict = {}
    inner = deep
    for _ in range(100):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(ConfigError, match="^checkpoint: nested deeper than 32 levels$"):
        from_dict(deep)
