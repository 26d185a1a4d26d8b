"""``moco-shards merge``: the part manifests of one multi-part build as one ``manifest.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from moco_dali.pipeline import shards
from moco_dali.tools.shards import BuildError

__all__ = ["merge"]


def merge(folders: list[str], out: Optional[str] = None) -> Path:
    """Merge the part manifests of one multi-part build into one ``manifest.json``.

    Args:
        folders: folders holding ``manifest.part-*.json`` files (and their shards).
        out: where to write the merged manifest (default: the first folder); shard
            paths in it are relative to this folder.

    Raises:
        BuildError: parts of different builds, a part twice, or a missing part.
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
            data = json.loads(path.read_text())
            part = data["settings"]["part"]
            if part in parts:
                raise BuildError(f"{path}: part {part} also in {parts[part][0]}")
            parts[part] = (path, data)
    if not parts:
        raise BuildError(f"no part manifests (manifest.part-*.json) in {', '.join(folders)}")
    first_path, first = parts[min(parts)]

    def identity(data: dict) -> tuple:
        settings = dict(data["settings"], part=None)
        return data["name"], json.dumps(settings, sort_keys=True), data["input_digest"], data["classes"]

    for path, data in parts.values():
        if identity(data) != identity(first):
            raise BuildError(f"{path}: a part of another build than {first_path} (inputs or settings differ)")
    num_parts = first["settings"]["num_parts"]
    missing = sorted(set(range(num_parts)) - set(parts))
    if missing:
        raise BuildError(f"parts {', '.join(map(str, missing))} of {num_parts} are missing; build them first")

    out_dir = Path(out) if out else Path(folders[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    merged_shards, rejected, part_list = [], [], []
    class_counts = dict.fromkeys(first["classes"], 0)
    for part in range(num_parts):
        path, data = parts[part]
        for entry in data["shards"]:
            entry = dict(entry)
            for key in ("tar", "index"):
                entry[key] = os.path.relpath(path.parent / entry[key], out_dir)
            merged_shards.append(entry)
        rejected.extend(data["rejected"])
        part_list.extend(data["parts"])
        for name, count in data["class_counts"].items():
            class_counts[name] += count
    manifest = dict(first)
    manifest.update(
        inputs=sum(parts[p][1]["inputs"] for p in parts),
        samples=sum(parts[p][1]["samples"] for p in parts),
        copied=sum(parts[p][1]["copied"] for p in parts),
        reencoded=sum(parts[p][1]["reencoded"] for p in parts),
        class_counts=class_counts, shards=merged_shards, rejected=rejected, parts=part_list,
        settings=dict(first["settings"], part=None),
    )
    path = out_dir / shards.MANIFEST_NAME
    shards.write_json_atomic(path, manifest)
    return path
