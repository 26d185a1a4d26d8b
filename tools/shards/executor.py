"""Run every part of a multi-part build (or index) as a Ray task, then merge their manifests.

Ray is an optional dependency (``pip install 'moco-dali[ray]'``): the local process
pool stays the default executor. Each part is a deterministic function of (sources,
part, settings), so a Ray task is just ``build()`` for one part; the driver finds the
classes once and hands them to every part, so no part reads the whole source for
them. The output folder must be one that every node of the cluster sees (a shared
file system); each part holds its own lock there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

from ...pipeline import shards
from . import BuildError
from .build import build
from .classes import find_classes
from .index import IndexCommand, IndexReport, index
from .merge import merge
from .settings import BuildReport, BuildSettings

__all__ = ["build_on_ray", "index_on_ray", "on_ray"]


def _build_part(
    sources: list[str], out: str, settings: BuildSettings, workers: int, classes: list[str]
) -> BuildReport:
    return build(sources, out, settings, workers=workers, progress=False, classes=classes)


def build_on_ray(
    sources: Sequence[str],
    out: str | Path,
    settings: BuildSettings,
    *,
    address: Optional[str] = None,
    workers_per_part: int = 1,
    classes: Optional[Sequence[str]] = None,
    num_cpus: Optional[int] = None,
) -> tuple[Path, list[BuildReport]]:
    """Build parts 0..P-1 of ``settings.num_parts`` as Ray tasks into ``out`` and merge them.

    Args:
        address: a running cluster (``ray.init(address=...)``); None starts a local
            Ray instance with ``num_cpus`` CPUs (default: all).
        workers_per_part: CPUs each task asks for and worker processes it runs
            (1: the part is built inside the task's own process).

    Returns:
        The merged manifest's path and each part's report, in part order.

    Raises:
        BuildError: Ray is not installed, a part failed (its one-line reason), or the
            parts do not merge.
    """
    if workers_per_part < 1:
        raise BuildError(
            f"--workers must be at least 1 with --executor ray, got {workers_per_part}"
        )
    class_list = (
        list(classes)
        if classes is not None
        else find_classes(
            list(sources), settings.labels, [str(out)], settings.labels_file, settings.label_column
        )
    )
    workers = workers_per_part if workers_per_part > 1 else 0
    calls = [
        (list(sources), str(out), dataclasses.replace(settings, part=part), workers, class_list)
        for part in range(settings.num_parts)
    ]
    reports = on_ray(_build_part, calls, address, num_cpus, workers_per_part)
    if settings.num_parts == 1:  # one part writes manifest.json itself
        return Path(out) / shards.MANIFEST_NAME, reports
    return merge([str(out)]), reports


def on_ray(
    function: Callable,
    calls: list[tuple],
    address: Optional[str],
    num_cpus: Optional[int],
    cpus_per_task: int,
) -> list:
    """``function(*call)`` for every call as a Ray task (one per part); the results in call order.

    Raises:
        BuildError: Ray is not installed or its cluster cannot be joined, or a task failed (its
            one-line reason, named by its position).
    """
    try:
        import ray
    except ImportError:
        raise BuildError("--executor ray needs Ray: pip install 'moco-dali[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        try:
            ray.init(
                **kwargs, include_dashboard=False, logging_level="WARNING", log_to_driver=False
            )
        except (
            Exception
        ) as exc:  # ConnectionError and Ray's own errors for a cluster that is not there
            raise BuildError(f"--ray-address {address}: cannot join a Ray cluster: {exc}") from None
    try:
        task = ray.remote(num_cpus=cpus_per_task, max_retries=0)(function)
        pending = [task.remote(*call) for call in calls]
        results = []
        for part, ref in enumerate(pending):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc  # the task's own exception
                if isinstance(cause, BuildError):
                    raise BuildError(f"part {part}: {cause}") from None
                lines = str(cause).strip().splitlines() or [""]
                raise BuildError(
                    f"part {part} failed: {type(cause).__name__}: {lines[-1]}"
                ) from None
    finally:
        if started_here:
            ray.shutdown()
    return results


def index_on_ray(cmd: IndexCommand, *, num_cpus: Optional[int] = None) -> IndexReport:
    """Index parts 0..P-1 of ``cmd.num_parts`` as Ray tasks into ``cmd.out`` and merge them.

    Each task reads its tars in its own process (one CPU): indexing is a sequential read and a
    hash, with nothing to share between processes. Returns the parts' reports summed, with the
    merged manifest's path and the slowest part's time.
    """
    calls = [
        (dataclasses.replace(cmd, part=part, executor="local", ray_address=None),)
        for part in range(cmd.num_parts)
    ]
    reports = on_ray(index, calls, cmd.ray_address, num_cpus, 1)
    total = IndexReport(seconds=max(r.seconds for r in reports))
    for report in reports:
        for name in ("tars", "shards", "inputs", "samples", "rejected", "bytes"):
            setattr(total, name, getattr(total, name) + getattr(report, name))
    # One part writes manifest.json itself; more are merged into one.
    total.manifest_path = (
        Path(cmd.out) / shards.MANIFEST_NAME if cmd.num_parts == 1 else merge([cmd.out])
    )
    return total
