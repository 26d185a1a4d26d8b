"""``moco-train``: pretrain MoCo on a shard folder, on one process or under torchrun.

    moco-train --preset v2 --data.train SHARDS [--config run.toml] [--SECTION.KEY VALUE ...]
    torchrun --nproc_per_node=8 -m moco_dali.train --preset v2 --data.train SHARDS

The only place that turns errors into one line and an exit code: 0 done (or stopped by
SIGTERM/SIGINT after a checkpoint), 1 stopped by non-finite losses, 2 a configuration, data or
checkpoint error, before any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from ..common.commandline import Parser, add_keys, given_keys, parse_known
from ..common.options import OptionError
from ..pipeline.shards import ShardError
from .config import Config, ConfigError, to_dict
from .presets import PRESETS, resolve

__all__ = ["main", "parse", "add_tree_arguments", "tree_from_arguments"]


def add_tree_arguments(parser: argparse.ArgumentParser, default_preset: str = "v2") -> None:
    """``--preset``, ``--config FILE`` and every key of the training tree, on ``parser``: the
    same options wherever a command takes a training configuration."""
    parser.add_argument(
        "--preset", default=default_preset, help=f"starting point: {', '.join(PRESETS)}"
    )
    parser.add_argument(
        "--config", default=None, metavar="FILE", help="TOML or YAML file with [section] keys"
    )
    add_keys(parser, Config)


def tree_from_arguments(args: argparse.Namespace, defaults: Optional[dict] = None) -> Config:
    """The tree the parsed ``args`` describe: the preset, the command's ``defaults`` for it, then
    the file, then the keys given."""
    return resolve(args.preset, args.config, given_keys(args, Config), defaults=defaults)


def parse(argv: Optional[Sequence[str]] = None) -> tuple[Config, bool]:
    """The resolved configuration and whether only to print it."""
    parser = Parser(
        prog="moco-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        error_prefix="command line: ",
    )
    add_tree_arguments(parser)
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )
    try:
        args = parse_known(parser, argv, Config)
    except OptionError as error:
        raise ConfigError(str(error)) from None
    return tree_from_arguments(args), args.print_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="moco-train: %(message)s")
    try:
        config, print_only = parse(argv)
        if print_only:
            print(json.dumps(to_dict(config), indent=1))
            return 0
        # Imported lazily: torch and DALI load once the command line is known to be good, so
        # --help and a refused key answer in a fraction of a second.
        from .checkpoint import CheckpointError
        from .engine import TrainingStopped, train

        try:
            train(config)
        except CheckpointError as exc:
            raise OptionError(str(exc)) from None
        except TrainingStopped as exc:
            print(f"moco-train: stopped: {exc}", file=sys.stderr)
            return 1
    except (OptionError, ShardError) as exc:
        print(f"moco-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
