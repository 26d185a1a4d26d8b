"""Typed option trees: dataclasses bound to the command line, to TOML/YAML files and to stored
dicts, one way for every command.

A command declares its options as (nested) dataclasses: a field's type, default and the
docstring under it are its declaration, ``__post_init__`` its rules. Here: the leaves of a
tree, converting any value to a leaf's type, building a tree with every class's rules applied
and a refusal named by its key (an ``OptionError``, one line), TOML and YAML files (bounded).
``commandline`` binds the same declarations to argparse.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from .files import read_config

__all__ = [
    "OptionError",
    "FLAT",
    "option",
    "Leaf",
    "leaves",
    "coerce",
    "to_dict",
    "flatten",
    "unknown_key",
    "name_fault",
    "build",
    "load_file",
    "MAX_CONFIG_BYTES",
    "sections",
    "type_name",
    "leaf_type",
    "is_section",
]


class OptionError(ValueError):
    """A value that cannot be used; the message names the key or option at fault."""


FLAT = {"flat": True}
"""Field metadata: the nested dataclass's fields are keys of the parent (``data.threads``, not
``data.read.threads``), in the tree and in stored dicts alike."""


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **meta: Any):
    """A dataclass field with binding metadata: ``choices``, ``metavar``, ``parse`` (a function
    from the command-line string), ``positional`` (argparse's ``nargs`` for a positional
    argument), ``required``, ``flag`` (the option's spelling when not the field's name).
    """
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is dataclasses.MISSING:  # a required option: its value comes from the command line
        default = None
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------- declarations


@functools.lru_cache(maxsize=None)
def _docs(cls: type) -> dict[str, str]:
    """The docstring under each field of ``cls`` (and its bases), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable value of a tree: its dotted key, where it lives, its type and its doc."""

    key: str
    path: tuple[str, ...]
    """Attribute names from the root (a flat section's own name included)."""
    kind: Any
    doc: str
    default: Any
    meta: typing.Mapping[str, Any]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def is_section(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def leaves(cls: type, prefix: str = "", path: tuple[str, ...] = ()) -> dict[str, Leaf]:
    """Every leaf of the dataclass tree ``cls`` by dotted key, sections included depth-first."""
    out: dict[str, Leaf] = {}
    hints = typing.get_type_hints(cls)
    docs = _docs(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if is_section(kind):
            flat = f.metadata.get("flat", False)
            out.update(leaves(kind, prefix if flat else f"{prefix}{f.name}.", (*path, f.name)))
        else:
            out[prefix + f.name] = Leaf(
                prefix + f.name,
                (*path, f.name),
                kind,
                docs.get(f.name, ""),
                _default(f),
                f.metadata,
            )
    return out


def sections(cls: type, prefix: str = "") -> set[str]:
    """The dotted names of the nested sections of ``cls`` that are not flat (``data.views``)."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_section(hints[f.name]):
            flat = f.metadata.get("flat", False)
            if not flat:
                out.add(prefix + f.name)
            out |= sections(hints[f.name], prefix if flat else f"{prefix}{f.name}.")
    return out


# ----------------------------------------------------------------------- values


def leaf_type(kind: Any) -> Any:
    """``Optional[X]`` -> X (None is always accepted for an optional leaf)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return kind


def type_name(kind: Any) -> str:
    """How a leaf's type reads in a message or ``--help``: int, float, str, bool, floats, numbers."""
    kind = leaf_type(kind)
    if typing.get_origin(kind) is tuple:
        return "floats"
    return "numbers" if kind is tuple else getattr(kind, "__name__", str(kind))


def _number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        number = int(value) if not isinstance(value, str) else int(value.strip())
        if abs(number) >= 2**63:  # what every consumer (torch, numpy, DALI) can hold
            raise OptionError(f"{key}: {value!r} does not fit in 64 bits")
        return number
    number = float(value)
    if not math.isfinite(number):
        raise OptionError(f"{key}: expected a finite number, got {value!r}")
    return number


def coerce(key: str, value: Any, kind: Any) -> Any:
    """``value`` (a command-line string, or a value from a file) as the leaf's type."""
    optional = leaf_type(kind) is not kind
    kind = leaf_type(kind)
    if value is None and optional:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            words = ("true", "1", "yes", "on", "false", "0", "no", "off")
            if isinstance(value, str) and value.lower() in words:
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if kind in (int, float):
            return _number(key, value, kind)
        if kind is tuple or typing.get_origin(kind) is tuple:
            if isinstance(value, str):
                text = value.strip()
                value = (
                    json.loads(text)
                    if text.startswith("[")
                    else [v for v in text.strip("()").split(",") if v.strip()]
                )
            if not isinstance(value, (list, tuple)):
                raise ValueError
            if kind is tuple:  # milestones: whole numbers stay ints
                return tuple(
                    _number(key, v, int if str(v).strip().lstrip("-").isdigit() else float)
                    for v in value
                )
            return tuple(_number(key, v, float) for v in value)
        if kind in (str, Path):
            if not isinstance(value, (str, int, float, Path)) or isinstance(value, bool):
                raise ValueError
            if "\0" in str(value):
                raise OptionError(f"{key}: a NUL character in {value!r}")
            return kind(value)
    except OptionError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError):
        pass
    raise OptionError(f"{key}: expected {type_name(kind)}, got {value!r}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass tree as nested plain values (flat sections merged into their parent)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            if f.metadata.get("flat"):
                out.update(to_dict(value))
            else:
                out[f.name] = to_dict(value)
        elif isinstance(value, Path):
            out[f.name] = str(value)
        else:
            out[f.name] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested ``{"data": {"views": {"flip_p": 0.5}}}`` as ``{"data.views.flip_p": 0.5}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unknown_key(key: str, cls: type, source: str) -> OptionError:
    """The error for a key the tree does not have, with the nearest real key as a hint."""
    known = list(leaves(cls))
    if key in sections(cls) or any(leaf.startswith(key + ".") for leaf in known):
        return OptionError(f"{source}: {key!r} is a section of keys, not a value")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return OptionError(f"{source}: unknown key {key!r}{hint}")


# ----------------------------------------------------------------------- naming a fault


_BUILD_ERRORS = (ValueError, OverflowError, RuntimeError, TypeError)
"""What a constructor raises for arguments it refuses (RuntimeError: an allocation that fails)."""


def _say(key: str, field: str, value: Any, error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if message.startswith(field + " "):  # "threads must be ..." -> "data.threads must be ..."
        return key + message[len(field) :]
    shown = repr(value) in message or str(value) in message
    return f"{key}: {message}" if shown else f"{key} {value!r}: {message}"


def name_fault(
    make: Callable[..., Any], given: dict[str, tuple[str, Any]], *, alone: bool = True
) -> Any:
    """``make(**values)`` for ``given = {argument: (key, value)}``; its refusal names the key.

    With ``alone``, each value is tried alone on ``make``'s defaults; the first one refused
    alone is named, with the refusal it gets beside the values that pass alone (so the message
    shows the user's values). Otherwise, or if only the combination is refused, all keys are
    named. Only a failure costs the extra calls.
    """
    values = {name: value for name, (_, value) in given.items()}
    try:
        return make(**values)
    except OptionError:
        raise
    except _BUILD_ERRORS as error:
        if alone:
            refused_alone = {}
            for name, value in values.items():
                try:
                    make(**{name: value})
                except _BUILD_ERRORS as refused:
                    refused_alone[name] = refused
            if refused_alone:
                name = next(iter(refused_alone))
                passing = {o: v for o, v in values.items() if o not in refused_alone}
                try:
                    make(**passing, **{name: values[name]})
                    reason = refused_alone[name]
                except _BUILD_ERRORS as refused:
                    reason = refused
                raise OptionError(_say(given[name][0], name, values[name], reason)) from None
        keys = " and ".join(f"{key} {value!r}" for key, value in given.values())
        raise OptionError(f"{keys}: {' '.join(str(error).split())}") from None


# ----------------------------------------------------------------------- building a tree


def build(cls: type, values: dict[str, Any], *, source: str, given: Sequence[str] = ()) -> Any:
    """The dataclass tree ``cls`` from nested plain ``values``; every leaf converted to its type
    and every class's rules applied as it is constructed.

    ``given`` are the keys the user set: a class that refuses its values is diagnosed among
    them (the key at fault named); keys in ``values`` that the tree lacks are refused with the
    nearest real key.
    """
    known = leaves(cls)
    flat = flatten(values)
    for key in flat:
        if key not in known:
            raise unknown_key(key, cls, source)
    return _construct(cls, flat, "", set(given), source)


def _construct(cls: type, flat: dict[str, Any], prefix: str, given: set[str], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if is_section(kind):
            inner = prefix if f.metadata.get("flat") else f"{prefix}{f.name}."
            kwargs[f.name] = _construct(kind, flat, inner, given, source)
        elif prefix + f.name in flat:
            key = prefix + f.name
            kwargs[f.name] = coerce(key, flat[key], kind)
            keys[f.name] = key
    user = {name: (keys[name], kwargs[name]) for name in keys if keys[name] in given}
    fixed = {name: value for name, value in kwargs.items() if name not in user}

    def make(**chosen: Any) -> Any:
        return cls(**{**fixed, **chosen})

    if not user:
        try:
            return make()
        except OptionError:
            raise
        except _BUILD_ERRORS as error:  # values the user did not give: a stored or preset tree
            message = " ".join(str(error).split())
            where = prefix.rstrip(".") or cls.__name__
            raise OptionError(f"{source}: {where}: {message}") from None
    return name_fault(make, user)


MAX_CONFIG_BYTES = 1 << 20
"""The largest configuration file read: a whole training tree in TOML is about 3 KB."""


def load_file(path: str | Path, option: str = "--config") -> dict[str, Any]:
    """A TOML or YAML file as a nested dict of sections, read with bounded cost (``read_config``:
    at most ``MAX_CONFIG_BYTES``, nesting and YAML aliases refused)."""
    path = Path(path)
    where = f"{option} {path}"
    if not path.is_file():
        raise OptionError(f"{where}: no such file")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise OptionError(f"{where}: use a .toml, .yaml or .yml file")
    data = read_config(
        path, max_bytes=MAX_CONFIG_BYTES, error=lambda message: OptionError(f"{option} {message}")
    )
    if not isinstance(data, dict):
        raise OptionError(f"{where}: expected sections of keys, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise OptionError(f"{where}: {section!r} must be a section of keys")
    return data
