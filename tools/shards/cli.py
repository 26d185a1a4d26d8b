"""``moco-shards``: build, index, verify, inspect, preview, merge, push and pull shard folders.

Each subcommand's options are a dataclass below (the build's own settings are
``BuildSettings``'s), bound by ``common.options``. The only place that turns the library's
errors into one-line messages and exit codes: 0 success; 1 a check failed (``verify`` found a
fault, or ``build`` rejected inputs under ``--strict``, or rejected every input); 2 bad arguments
or input (a missing or unreadable source, a folder in use or not ours, an output that cannot be
written, a folder that is not a shard folder for ``inspect``/``preview``/``merge``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ...common.commandline import Parser, add_flags, from_flags
from ...common.files import read_json
from ...common.options import FLAT, OptionError, option
from ...common.store import ObjectURL, is_url
from ...pipeline import shards
from ...pipeline.schema import MAX_MANIFEST_BYTES
from ...pipeline.shards import ShardError
from ...train.cli import add_tree_arguments, tree_from_arguments
from ...train.config import Config
from . import BuildError
from .build import build
from .classes import read_classes
from .index import IndexCommand, index
from .merge import merge
from .pull import PullCommand, pull
from .push import PushCommand, merge_in_store, publish, push
from .settings import BuildSettings

__all__ = ["main", "BuildCommand", "VerifyCommand", "InspectCommand", "PreviewCommand"]


@dataclass
class BuildCommand:
    sources: list[str] = option(factory=list, positional="+", metavar="SRC")
    """Folders (recursive), list files (.txt/.lst/.list: one path per line; .csv: PATH,LABEL),
    .tar archives, or tables: .parquet and .arrow files, folders of them, a Hugging Face datasets
    save_to_disk folder (one input per row)."""
    out: str = option(required=True, metavar="DIR")
    """Shard folder to write, or s3://bucket/prefix (with --stage)."""
    stage: Optional[str] = option(None, metavar="DIR")
    """With an s3:// --out: the local folder this part is built (and resumed) in before it is
    sent, the manifest last."""
    settings: BuildSettings = option(factory=BuildSettings, **FLAT)
    classes: Optional[str] = option(None, metavar="FILE")
    """Class names, one per line, in index order (default: found in the sources)."""
    no_shuffle: bool = False
    """Pack inputs in their listing order."""
    workers: Optional[int] = option(None, metavar="W")
    """Worker processes (default: all cores)."""
    executor: str = option("local", choices=["local", "ray"])
    """'local': this process and its worker pool build one part; 'ray': every part as a Ray task
    (--out on a shared file system), then merged."""
    ray_address: Optional[str] = option(None, metavar="ADDR")
    """With --executor ray: the cluster to join (default: start Ray on this machine)."""
    strict: bool = False
    """Exit 1 if any input was rejected."""
    progress: bool = option(True, flag="--no-progress")
    """A progress bar."""

    def __post_init__(self) -> None:
        if is_url(self.out):
            ObjectURL.parse(self.out)
            if not self.stage:
                raise BuildError(
                    f"--out {self.out}: give --stage DIR, a local folder to build the shards in "
                    "before they are sent"
                )
            if self.executor == "ray":
                raise BuildError(
                    "--executor ray writes to a shared folder: give one as --out, then "
                    "'moco-shards push' it"
                )
        elif self.stage:
            raise BuildError("--stage is for an s3:// --out")
        if self.executor == "ray" and self.settings.part:
            raise BuildError("--part: --executor ray builds every part; give --num-parts only")
        if self.executor == "local" and self.ray_address:
            raise BuildError("--ray-address needs --executor ray")
        if self.workers is not None and self.workers < 0:
            raise BuildError(f"--workers must be 0 or more, got {self.workers}")
        if self.classes is not None and self.settings.labels == "none":
            raise BuildError("--classes needs --labels folder, archive or column, or --labels-file")
        if self.no_shuffle:
            self.settings = dataclasses.replace(self.settings, shuffle_seed=None)


@dataclass
class VerifyCommand:
    folder: str = option(positional=None, metavar="DIR")
    """The shard folder."""
    batch_size: int = 64
    """Samples per DALI batch."""
    threads: int = 0
    """DALI CPU threads (0: all cores)."""
    device_id: Optional[int] = None
    """Decode on this GPU (default: CPU)."""
    progress: bool = option(True, flag="--no-progress")
    """A progress bar."""


@dataclass
class InspectCommand:
    folder: str = option(positional=None, metavar="DIR")
    """The shard folder."""
    json: bool = False
    """Print JSON instead of text."""


@dataclass
class PreviewCommand:
    """The views of the training tree's recipe (--preset, --config, --data.views.KEY), drawn."""

    folder: str = option(positional=None, metavar="DIR")
    """The shard folder."""
    out: str = option(required=True, metavar="FILE.png")
    """The picture to write."""
    count: int = 8
    """Samples (rows)."""
    seed: int = 0
    """Seed of the views drawn."""
    device_id: Optional[int] = None
    """Run the pipeline on this GPU (default: CPU)."""


@dataclass
class MergeCommand:
    folders: list[str] = option(factory=list, positional="+", metavar="DIR")
    """The folders holding the parts."""
    out: Optional[str] = option(None, metavar="DIR")
    """Folder for the merged manifest (default: the first DIR)."""


COMMANDS = {
    "build": (BuildCommand, "pack images into shards"),
    "index": (IndexCommand, "index WebDataset tars where they lie: index files and a manifest"),
    "verify": (VerifyCommand, "read and decode every sample through DALI; check hashes and counts"),
    "inspect": (InspectCommand, "print samples, shards, bytes, classes and resolutions"),
    "preview": (PreviewCommand, "write a PNG of stored images beside their two augmented views"),
    "merge": (MergeCommand, "merge the part manifests of a multi-part build into one manifest"),
    "push": (PushCommand, "send a shard folder to s3://bucket/prefix, verified, the manifest last"),
    "pull": (
        PullCommand,
        "fetch a shard folder from s3://bucket/prefix, verified, the manifest last",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moco-shards", description="Turn image dumps into DALI-ready WebDataset shards."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (options, summary) in COMMANDS.items():
        p = sub.add_parser(
            name, help=summary, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        add_flags(p, options)
        if name == "preview":  # the same keys as moco-train's: a recipe is seen before it runs
            add_tree_arguments(p)
    return parser


def _build(cmd: BuildCommand) -> int:
    classes = read_classes(cmd.classes) if cmd.classes else None
    if cmd.executor == "ray":
        # Imported lazily: Ray loads only for a build that asks for it (seconds, hundreds of MB).
        from .executor import build_on_ray

        manifest, reports = build_on_ray(
            cmd.sources,
            cmd.out,
            cmd.settings,
            address=cmd.ray_address,
            workers_per_part=cmd.workers or 1,
            classes=classes,
        )
        inputs, samples, rejected = (
            sum(getattr(r, k) for r in reports) for k in ("inputs", "samples", "rejected")
        )
        print(
            f"moco-shards build: {len(reports)} parts on Ray: {inputs} inputs -> {samples} samples "
            f"in {sum(r.shards for r in reports)} shards, {rejected} rejected; {manifest}"
        )
    else:
        report = build(
            cmd.sources,
            cmd.stage if cmd.stage else cmd.out,
            cmd.settings,
            workers=cmd.workers,
            progress=cmd.progress,
            classes=classes,
        )
        inputs, samples, rejected = report.inputs, report.samples, report.rejected
        manifest = report.manifest_path
        print(f"moco-shards build: {report.summary()}")
        if cmd.stage:
            sent = publish(
                Path(cmd.stage), ObjectURL.parse(cmd.out), 8, manifest_name=Path(manifest).name
            )
            print(f"moco-shards build: sent {sent.summary()}")
    written = read_json(manifest, "manifest", max_bytes=MAX_MANIFEST_BYTES, error=BuildError)
    log_name = Path(manifest).parent / (written.get("rejected_file") or "")
    if inputs and not samples:
        print(
            f"moco-shards build: every input was rejected ({rejected}); the reasons are in "
            f"{log_name}",
            file=sys.stderr,
        )
        return 1
    if cmd.strict and rejected:
        print(
            f"moco-shards build: --strict: {rejected} inputs rejected (see {log_name})",
            file=sys.stderr,
        )
        return 1
    return 0


def _index(cmd: IndexCommand) -> int:
    if cmd.executor == "ray":
        from .executor import index_on_ray  # lazily, as for build

        report = index_on_ray(cmd)
        log_name = report.manifest_path.parent / shards.REJECTED_NAME
        print(f"moco-shards index: {cmd.num_parts} parts on Ray: {report.summary()}")
    else:
        report = index(cmd)
        print(f"moco-shards index: {report.summary()}")
        log_name = report.manifest_path.parent / shards.rejected_name(
            *((cmd.part, cmd.num_parts) if cmd.is_part else ())
        )
    if report.inputs and not report.samples:
        print(f"moco-shards index: every sample was rejected; see {log_name}", file=sys.stderr)
        return 1
    if cmd.strict and report.rejected:
        print(
            f"moco-shards index: --strict: {report.rejected} samples rejected (see {log_name})",
            file=sys.stderr,
        )
        return 1
    return 0


def _run(command: str, cmd, args: argparse.Namespace) -> int:
    if command == "build":
        return _build(cmd)
    if command == "index":
        return _index(cmd)
    if command == "merge":
        if any(is_url(folder) for folder in [*cmd.folders, cmd.out or ""]):
            if len(cmd.folders) != 1 or cmd.out not in (None, cmd.folders[0]):
                raise BuildError("merge in the store: give one s3:// prefix holding every part")
            print(f"moco-shards merge: wrote {merge_in_store(cmd.folders[0])}")
            return 0
        print(f"moco-shards merge: wrote {merge(cmd.folders, cmd.out)}")
        return 0
    if command == "pull":
        print(f"moco-shards pull: {pull(cmd).summary()}")
        return 0
    if is_url(cmd.folder) and command == "push":
        raise BuildError(f"{cmd.folder}: moco-shards push sends a local folder")
    if not is_url(cmd.folder) and not Path(cmd.folder).is_dir():
        raise BuildError(f"{cmd.folder}: no such folder")
    if command == "push":
        print(f"moco-shards push: {push(cmd).summary()}")
        return 0
    # Imported lazily: verify and preview load DALI, preview torch, only when they run.
    if command == "verify":
        from .verify import verify

        report = verify(
            cmd.folder,
            batch_size=cmd.batch_size,
            num_threads=cmd.threads or None,
            device_id=cmd.device_id,
            progress=cmd.progress,
        )
        print(f"moco-shards verify: {report.summary()}")
        return 0
    if command == "inspect":
        from .verify import format_inspection, inspect  # lazily, as above

        info = inspect(cmd.folder)
        print(json.dumps(info, indent=1) if cmd.json else format_inspection(info))
        return 0
    from .preview import preview  # lazily, as above

    tree: Config = tree_from_arguments(args)
    path = preview(
        cmd.folder,
        cmd.out,
        recipe=tree.data.views,
        count=cmd.count,
        seed=cmd.seed,
        device_id=cmd.device_id,
    )
    print(f"moco-shards preview: wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="moco-shards: %(message)s")
    try:
        args = _parser().parse_args(argv)
    except OptionError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    command = args.command
    try:
        cmd = from_flags(COMMANDS[command][0], args)
        return _run(command, cmd, args)
    except ShardError as exc:
        if command == "verify":  # a fault found in the data: the check failed
            print(f"moco-shards {command}: FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"moco-shards {command}: error: {exc}", file=sys.stderr)
        return 2
    except (BuildError, OptionError, ValueError) as exc:
        print(f"moco-shards {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"moco-shards {command}: interrupted; run the same command again to finish",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
