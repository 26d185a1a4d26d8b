"""``moco-train``: pretrain MoCo on a shard folder, on one process or under torchrun.

    moco-train --preset v2 --data.train SHARDS [--config run.toml] [--SECTION.KEY VALUE ...]
    torchrun --nproc_per_node=8 -m moco_dali.train --preset v2 --data.train SHARDS

The only place that turns errors into one line and an exit code: 0 done (or stopped
by SIGTERM/SIGINT after a checkpoint), 1 stopped by non-finite losses, 2 a
configuration, data or checkpoint error, before any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from .config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    flat_fields,
    load_file,
    preset,
    to_dict,
    type_name,
    unknown_key,
)

__all__ = ["main", "parse"]


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a key without its value) as one line, like every other error."""

    def error(self, message: str):
        raise ConfigError(f"command line: {message}")


def parse(argv: Optional[Sequence[str]] = None) -> tuple[Config, bool]:
    """The resolved configuration: preset, then the file, then command-line keys; unset view keys from data.preset."""
    # No abbreviations: "--run.ep 5" must not quietly set run.epochs.
    parser = _Parser(
        prog="moco-train",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="v2", help=f"starting point: {', '.join(PRESETS)}")
    parser.add_argument(
        "--config", default=None, metavar="FILE", help="TOML or YAML file with [section] keys"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )
    for key, (_obj, kind) in flat_fields(Config()).items():
        parser.add_argument(f"--{key}", dest=key, default=None, metavar=type_name(kind).upper())
    args, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("--"):
            raise unknown_key(token[2:].split("=", 1)[0], "command line")
    if unknown:
        raise ConfigError(f"command line: unexpected argument {unknown[0]!r}")
    config = preset(args.preset)
    if args.config:
        apply_overrides(config, load_file(args.config), f"--config {args.config}")
    cli = {key: value for key, value in vars(args).items() if "." in key and value is not None}
    apply_overrides(config, cli)
    from .validation import resolve_views

    return resolve_views(config), args.print_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="moco-train: %(message)s")
    try:
        config, print_only = parse(argv)
        if print_only:
            print(json.dumps(to_dict(config), indent=1))
            return 0
        from ..pipeline.shards import ShardError
        from .checkpoint import CheckpointError
        from .engine import TrainingStopped, train

        try:
            train(config)
        except (ShardError, CheckpointError) as exc:
            raise ConfigError(str(exc)) from None
        except TrainingStopped as exc:
            print(f"moco-train: stopped: {exc}", file=sys.stderr)
            return 1
    except ConfigError as exc:
        print(f"moco-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
