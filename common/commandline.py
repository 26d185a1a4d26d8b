"""The command line of every command, from the option dataclasses: argparse built from fields.

Two spellings: dotted keys that take any value, converted later with the tree's own rules
(``--data.batch_size 64``: the training tree, ``add_keys``), and a tool's flags with argparse's
types and choices (``--max-count 64``, ``--strict``: ``add_flags``, ``from_flags``). argparse's
own errors are one ``OptionError`` line too.
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import re
import typing
from typing import Any, Optional, Sequence

from .options import Leaf, OptionError, is_section, leaf_type, leaves, type_name, unknown_key

__all__ = [
    "Parser",
    "add_keys",
    "given_keys",
    "add_flags",
    "from_flags",
    "parse_known",
    "parse_bytes",
]


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3}
_UNITS.update({"gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3})


MAX_BYTES = 2**63 - 1
"""The largest size taken: what a file offset (and every consumer of one) can hold."""


def parse_bytes(text: str) -> int:
    """``"500MB"``, ``"1.5GiB"`` or ``"1000000"`` -> bytes (an argparse ``type``), at most
    ``MAX_BYTES``; the number is read exactly (a float would turn 400 digits into inf)."""
    shown = text if len(text) <= 40 else text[:20] + "..." + text[-8:]
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{shown!r} is not a size (examples: 500MB, 1GiB, 1000000)"
        )
    number = match.group(1)
    if len(number) > 40:  # more digits than any size has; not worth converting
        raise argparse.ArgumentTypeError(f"{shown!r} is not a size (at most {MAX_BYTES} bytes)")
    size = int(fractions.Fraction(number) * _UNITS[match.group(2).lower()])
    if size > MAX_BYTES:
        raise argparse.ArgumentTypeError(f"{shown!r} is not a size (at most {MAX_BYTES} bytes)")
    return size


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (a missing value, a bad choice) are one ``OptionError`` line,
    with the (sub)command's name in ``prog``; no abbreviations (``--run.ep 5`` must not quietly
    set run.epochs)."""

    def __init__(self, *args: Any, error_prefix: str = "", **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.error_prefix = error_prefix

    def error(self, message: str):
        error = OptionError(self.error_prefix + message)
        error.prog = self.prog
        raise error


def parse_known(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], cls: type):
    """``parser.parse_args`` where a ``--key`` the tree ``cls`` lacks is refused with the nearest
    real key (did you mean ...?)."""
    args, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("--"):
            raise unknown_key(token[2:].split("=", 1)[0], cls, "command line")
    if unknown:
        raise OptionError(f"command line: unexpected argument {unknown[0]!r}")
    return args


def add_keys(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--section.key VALUE`` for every leaf of ``cls`` (values converted later, by ``build``)."""
    for key, leaf in leaves(cls).items():
        parser.add_argument(
            f"--{key}",
            dest=key,
            default=None,
            metavar=type_name(leaf.kind).upper(),
            help=leaf.doc or None,
        )


def given_keys(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The ``--section.key`` values a command line set, by key."""
    known = leaves(cls)
    return {k: v for k, v in vars(namespace).items() if k in known and v is not None}


def _flag(leaf: Leaf) -> str:
    return leaf.meta.get("flag") or "--" + leaf.path[-1].replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser, cls: type, only: Optional[Sequence[str]] = None
) -> None:
    """One argparse option per leaf of ``cls`` (a tool's options): ``--max-count N``, positional
    arguments and ``--strict`` switches as the fields' metadata say; help from the fields' docs.

    A bool that defaults to False is a switch that sets it (``--strict``); one that defaults to
    True is a switch that clears it, spelled by its ``flag`` (``--no-progress``). A field with
    ``bind=False`` is not an option, nor one left out of ``only`` (the keys to add).
    """
    for key, leaf in leaves(cls).items():
        kind = leaf_type(leaf.kind)
        meta = leaf.meta
        if meta.get("bind") is False or (only is not None and key not in only):
            continue
        common: dict[str, Any] = {"help": leaf.doc or None}
        if "positional" in meta:
            parser.add_argument(
                key,
                nargs=meta["positional"],
                metavar=meta.get("metavar"),
                type=meta.get("parse", str),
                **common,
            )
            continue
        common.update(dest=key, default=leaf.default)
        if kind is bool:
            action = "store_false" if leaf.default else "store_true"
            parser.add_argument(_flag(leaf), action=action, **common)
            continue
        if "metavar" in meta:
            common["metavar"] = meta["metavar"]
        if meta.get("required"):
            common["required"] = True
            common.pop("default")
        if typing.get_origin(kind) is list:
            common["nargs"] = meta.get("nargs", "+")
            kind = typing.get_args(kind)[0]
        parser.add_argument(
            _flag(leaf), type=meta.get("parse", kind), choices=meta.get("choices"), **common
        )


def from_flags(cls: type, namespace: argparse.Namespace) -> Any:
    """The dataclass tree ``cls`` from a namespace ``add_flags`` filled; each class's rules apply."""
    return _from_namespace(cls, vars(namespace), "")


def _from_namespace(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if is_section(hints[f.name]):
            inner = prefix if f.metadata.get("flat") else f"{prefix}{f.name}."
            kwargs[f.name] = _from_namespace(hints[f.name], values, inner)
        elif prefix + f.name in values:
            kwargs[f.name] = values[prefix + f.name]
    return cls(**kwargs)
