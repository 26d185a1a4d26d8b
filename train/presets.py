"""The presets (named starting trees: v1, v2, small, cifar) and how a run's tree is resolved
from one of them, a command's defaults, a TOML or YAML file and the command line."""

from __future__ import annotations

from typing import Any, Optional

from ..common.options import OptionError, build, flatten, leaves, load_file, to_dict, unknown_key
from ..pipeline.recipes import preset as recipe
from ..pipeline.recipes import recipe_names
from .config import Config, ConfigError, config_error

__all__ = ["PRESETS", "preset", "resolve"]


def _recipe(config: Config, name: str, size: int) -> None:
    config.data.preset, config.data.views = name, recipe(name, size)


def _v1() -> Config:
    """MoCo v1: ResNet-50, fc head, T 0.07, step schedule at 120 and 160 of 200 epochs."""
    return Config()


def _v2() -> Config:
    """MoCo v2: as v1 with T 0.2, the MLP head, a cosine schedule and the v2 augmentations."""
    config = Config()
    config.model.T, config.model.mlp = 0.2, True
    config.optim.schedule = "cosine"
    _recipe(config, "v2", 224)
    return config


def _small() -> Config:
    """Small images (Fashion-MNIST, CIFAR): ResNet-18 with the small stem, 32 px v2 views, K 4096,
    m 0.99, T 0.1, symmetric loss, weight decay 5e-4, cosine schedule."""
    config = _v2()
    config.model.arch, config.model.small_stem, config.model.K = "resnet18", True, 4096
    config.model.m, config.model.T, config.model.symmetric = 0.99, 0.1, True
    _recipe(config, "v2", 32)
    config.data.eval_resize = 32
    config.optim.lr_per_256, config.optim.weight_decay = 0.03, 5e-4
    config.run.epochs, config.run.knn_every = 200, 10
    return config


def _cifar() -> Config:
    """MoCo's CIFAR-10 demonstration as its authors ran it (published kNN top-1: 82.6% at 200
    epochs, 85.3% symmetric): ResNet-18 with the small stem, fc head of dim 128, batch 512, lr
    0.06 cosine, weight decay 5e-4, K 4096, m 0.99, T 0.1, symmetric loss, split BN over 8, 32 px
    views without blur, the kNN monitor (k 200, T 0.1) every epoch."""
    config = _v2()
    m = config.model
    m.arch, m.small_stem, m.dim, m.mlp = "resnet18", True, 128, False
    m.K, m.m, m.T, m.symmetric, m.shuffle, m.num_splits = 4096, 0.99, 0.1, True, "auto", 8
    _recipe(config, "cifar", 32)
    config.data.eval_resize, config.data.batch_size = 32, 512
    o = config.optim
    o.lr_per_256, o.momentum, o.weight_decay, o.schedule = 0.03, 0.9, 5e-4, "cosine"
    config.run.epochs, config.run.knn_every, config.run.knn_k, config.run.knn_t = 200, 1, 200, 0.1
    return config


PRESETS = {"v1": _v1, "v2": _v2, "small": _small, "cifar": _cifar}


def preset(name: str) -> Config:
    """The filled tree of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------- resolving


def resolve(
    preset_name: str = "v2",
    file: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    *,
    source: str = "command line",
    defaults: Optional[dict[str, Any]] = None,
) -> Config:
    """The tree of ``preset_name``, then a command's ``defaults`` for it, then ``file`` (TOML or
    YAML sections), then ``overrides`` (``{"section.key": value}``); the keys given are checked by
    the classes that own them.

    ``data.preset``, wherever it is given, applies before the ``data.views`` keys: they refine
    the recipe it names, whatever their order.
    """
    values = flatten(to_dict(preset(preset_name)))
    values.update(defaults or {})
    given: dict[str, tuple[Any, str]] = {}
    if file:
        for key, value in flatten(load_file(file)).items():
            given[key] = (value, f"--config {file}")
    for key, value in (overrides or {}).items():
        given[key] = (value, source)
    known = leaves(Config)
    for key, (_, where) in given.items():
        if key not in known:
            raise config_error(unknown_key(key, Config, where))
    flat = values
    name = given.get("data.preset", (None,))[0]
    if name in recipe_names():  # any other value is refused by DataConfig's own rule below
        views = to_dict(recipe(name, flat["data.views.size"]))
        flat.update({f"data.views.{k}": v for k, v in views.items() if k != "size"})
    flat.update({key: value for key, (value, _) in given.items()})
    try:
        return build(Config, flat, source=source, given=list(given))
    except OptionError as error:
        raise config_error(error) from None
