"""``moco-shards merge``: the part manifests of one multi-part build as one ``manifest.json``.

Also joins the parts' rejected-input logs into one ``rejected.jsonl``, streamed, so
merging holds the parts' shard lists and counts, never their inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ...common.files import check_schema, read_json, write_atomic, write_json_atomic
from ...pipeline import shards
from ...pipeline.schema import MAX_MANIFEST_BYTES, PartManifestSchema
from . import BuildError

__all__ = ["merge"]


def _read_part(path: Path) -> dict:
    """A part manifest, read by the one bounded reader and checked against its declared schema."""
    again = "; build that part again"
    try:
        data = read_json(path, "part manifest", max_bytes=MAX_MANIFEST_BYTES, error=BuildError)
        if not isinstance(data, dict) or data.get("format") != shards.FORMAT:
            raise BuildError(f"{path}: not a {shards.FORMAT} part manifest")
        if data.get("version") not in (shards.FORMAT_VERSION, shards.INDEXED_VERSION):
            raise BuildError(
                f"{path}: part manifest version {data.get('version')}, this tool merges "
                f"{shards.FORMAT_VERSION} (built) and {shards.INDEXED_VERSION} (indexed)"
            )
        check_schema(data, PartManifestSchema, path, "part manifest", BuildError)
    except BuildError as exc:
        raise BuildError(f"{exc}{again}") from None
    if data["samples"] + data["rejected"] != data["inputs"]:
        raise BuildError(
            f"{path}: {data['samples']} samples + {data['rejected']} rejected != {data['inputs']} inputs"
            + again
        )
    return data


def merge(folders: list[str], out: Optional[str] = None) -> Path:
    """Merge the part manifests of one multi-part build into one ``manifest.json``.

    Args:
        folders: folders holding ``manifest.part-*.json`` files (and their shards).
        out: where to write the merged manifest and ``rejected.jsonl`` (default: the
            first folder); shard paths in it are relative to this folder.

    Raises:
        BuildError: an unreadable part manifest, parts of different builds, a part
            twice, or a missing part.
    """
    if not folders:
        raise BuildError("give at least one folder with part manifests")
    parts: dict[int, tuple[Path, dict]] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise BuildError(f"{folder}: not a folder")
        for path in sorted(folder.iterdir()):
            if not shards.PART_MANIFEST_RE.match(path.name):
                continue
            data = _read_part(path)
            part = data["settings"]["part"]
            if part in parts:
                raise BuildError(f"{path}: part {part} also in {parts[part][0]}")
            parts[part] = (path, data)
    if not parts:
        raise BuildError(f"no part manifests (manifest.part-*.json) in {', '.join(folders)}")
    first_path, first = parts[min(parts)]

    def identity(data: dict) -> tuple:
        settings = dict(data["settings"], part=None)
        # An indexed part's classes are the .cls indices it met (0..its largest): parts differ.
        classes = None if data.get("indexed") else data["classes"]
        return (
            data["name"],
            data["version"],
            json.dumps(settings, sort_keys=True),
            classes,
            data["sources"],
        )

    for path, data in parts.values():
        if identity(data) != identity(first):
            raise BuildError(
                f"{path}: a part of another build than {first_path} (sources or settings differ)"
            )
        # Parts named by different rules deal the inputs differently: some would be lost.
        if data.get("order", 1) != first.get("order", 1):
            raise BuildError(
                f"{path}: built under naming rule {data.get('order', 1)}, {first_path} under "
                f"{first.get('order', 1)} (a moco-shards from before and one from after the "
                "change); build the parts again with one moco-shards"
            )
    num_parts = first["settings"]["num_parts"]
    missing = sorted(set(range(num_parts)) - set(parts))
    if missing:
        raise BuildError(
            f"parts {', '.join(map(str, missing))} of {num_parts} are missing; build them first"
        )

    out_dir = Path(out) if out else Path(folders[0])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return _write(out_dir, parts, first, num_parts)
    except OSError as exc:
        raise BuildError(
            f"{exc.filename or out_dir}: cannot write: {exc.strerror or exc}"
        ) from None


def _write(out_dir: Path, parts: dict, first: dict, num_parts: int) -> Path:
    merged_shards, part_list = [], []
    classes = max((data["classes"] for _, data in parts.values()), key=len)
    class_counts = dict.fromkeys(classes, 0)
    reasons: dict[str, int] = {}
    rejected_path = out_dir / shards.REJECTED_NAME
    digest = hashlib.sha256()

    def gather(sink) -> None:  # the parts' shards, counts and rejected logs, the logs into one
        for part in range(num_parts):
            path, data = parts[part]
            for entry in data["shards"]:
                entry = dict(entry)
                for key in ("tar", "index"):
                    entry[key] = os.path.relpath(path.parent / entry[key], out_dir)
                merged_shards.append(entry)
            part_list.extend(data["parts"])
            digest.update(data["input_digest"].encode())
            for name, count in data["class_counts"].items():
                class_counts[name] += count
            for kind, count in data["rejected_reasons"].items():
                reasons[kind] = reasons.get(kind, 0) + count
            log = path.parent / data["rejected_file"]
            try:
                with open(log, "rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 20)
            except FileNotFoundError:
                raise BuildError(
                    f"{log}: the rejected inputs of part {part} are missing; build that part again"
                ) from None

    write_atomic(rejected_path, gather)
    manifest = dict(first)
    manifest.update(
        inputs=sum(parts[p][1]["inputs"] for p in parts),
        samples=sum(parts[p][1]["samples"] for p in parts),
        copied=sum(parts[p][1]["copied"] for p in parts),
        reencoded=sum(parts[p][1]["reencoded"] for p in parts),
        rejected=sum(parts[p][1]["rejected"] for p in parts),
        rejected_reasons=dict(sorted(reasons.items())),
        rejected_file=shards.REJECTED_NAME,
        classes=classes,
        class_counts=class_counts,
        shards=merged_shards,
        parts=part_list,
        input_digest=digest.hexdigest(),
        settings=dict(first["settings"], part=None),
    )
    path = out_dir / shards.MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path
