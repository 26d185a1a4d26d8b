"""What decides a build's bytes (``BuildSettings``, the flags of ``moco-shards build``) and what a
build reports. The settings are recorded in every manifest and compared on resume and merge."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ...common.commandline import parse_bytes
from ...common.options import FLAT, option
from . import BuildError
from .imageprep import PrepSettings

__all__ = [
    "BuildSettings",
    "BuildReport",
    "DEFAULT_MAX_INPUT_BYTES",
    "NO_CLASS",
    "NO_CLASS_ARCHIVE",
    "NO_LABEL",
]

NO_CLASS = "no class folder (--labels folder needs SRC/CLASS/...)"
NO_CLASS_ARCHIVE = (
    "not in a class archive (--labels archive reads SRC.tar holding CLASS.tar archives; "
    "a flat archive of class folders takes --labels folder)"
)
NO_LABEL = "no label in --labels-file"
DEFAULT_MAX_INPUT_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the bytes of a build (``workers`` does not)."""

    name: str = "shard"
    """Shard file prefix: NAME-000000.tar."""
    labels: str = option("none", choices=["none", "folder", "archive", "file", "column"])
    """'folder': first-level sub-folder names (or a .csv list's labels) are the classes (KEY.cls);
    'archive': each SRC.tar holds CLASS.tar archives (ImageNet's training archive), read in place;
    'file': --labels-file's (implied by it); 'column': a Parquet or Arrow table's --label-column
    (implied by it)."""
    labels_file: Optional[str] = option(None, metavar="FILE")
    """NAME,CLASS rows giving each image its class by its file name, with or without extension
    (a validation archive's labels; LOC_val_solution.csv reads as it is)."""
    image_column: str = option("image", metavar="NAME")
    """Parquet and Arrow sources: the column holding each image (the Hugging Face struct of bytes
    and path, binary, or a path relative to the table's folder)."""
    label_column: Optional[str] = option(None, metavar="NAME")
    """Parquet and Arrow sources: the column holding each class, an integer (named by the
    Hugging Face ClassLabel metadata when there is some) or a string (default with --labels
    column: label)."""
    max_count: int = option(10000, metavar="N")
    """Samples per shard at most."""
    max_bytes: Optional[int] = option(None, metavar="SIZE", parse=parse_bytes)
    """Bytes per shard at most (e.g. 1GB)."""
    num_parts: int = option(1, metavar="P")
    """Split the build into P disjoint parts."""
    part: int = option(0, metavar="I")
    """Build part I of P (0-based)."""
    shuffle_seed: Optional[int] = option(0, metavar="SEED")
    """Pack inputs in an order shuffled with SEED, so class-sorted dumps make mixed shards (None:
    in enumeration order, as --no-shuffle)."""
    max_input_bytes: int = option(DEFAULT_MAX_INPUT_BYTES, metavar="SIZE", parse=parse_bytes)
    """Reject larger input files unread (a symlink to /dev/zero never ends)."""
    prep: PrepSettings = option(factory=PrepSettings, **FLAT)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "./ \t"):
            raise BuildError(f"--name {self.name!r}: use a name without dots, slashes or spaces")
        if self.labels not in ("none", "folder", "archive", "file", "column"):
            raise BuildError(
                "--labels must be 'none', 'folder', 'archive', 'file' or 'column', "
                f"got {self.labels!r}"
            )
        if self.labels_file is not None and self.labels == "none":
            object.__setattr__(self, "labels", "file")  # the file says it: no second flag
        if self.label_column is not None and self.labels == "none":
            object.__setattr__(self, "labels", "column")  # as --labels-file: no second flag
        if self.labels == "column" and self.label_column is None:
            object.__setattr__(self, "label_column", "label")  # the Hugging Face layout's
        if self.label_column is not None and self.labels != "column":
            raise BuildError(f"--label-column names a table's classes: drop --labels {self.labels}")
        if not self.image_column or not (self.label_column is None or self.label_column):
            raise BuildError("--image-column and --label-column need a column name")
        if (self.labels == "file") != (self.labels_file is not None):
            raise BuildError(
                f"--labels-file gives the classes: drop --labels {self.labels}"
                if self.labels_file is not None
                else "--labels file needs --labels-file FILE"
            )
        if self.max_count < 1:
            raise BuildError(f"--max-count must be at least 1, got {self.max_count}")
        if self.max_bytes is not None and self.max_bytes < 4096:
            raise BuildError(f"--max-bytes must be at least 4096, got {self.max_bytes}")
        if not 1 <= self.num_parts <= 9999:
            raise BuildError(f"--num-parts must be in 1..9999, got {self.num_parts}")
        if not 0 <= self.part < self.num_parts:
            raise BuildError(
                f"--part must be in 0..{self.num_parts - 1} for --num-parts {self.num_parts}, got {self.part}"
            )
        if self.max_input_bytes < 1:
            raise BuildError(f"--max-input-bytes must be positive, got {self.max_input_bytes}")

    def fingerprint(self) -> dict:
        """The settings as recorded in manifests and compared on resume and merge."""
        d = asdict(self)
        d.update(d.pop("prep"))
        if self.labels_file is None:
            del d["labels_file"]  # recorded as before there was one, so older builds resume
        else:
            # Its name only, so the same build from another mount point merges; its labels are
            # in the input digest.
            d["labels_file"] = os.path.basename(self.labels_file)
        # Recorded only where they say something, so builds from before them resume and merge.
        if self.label_column is None:
            del d["label_column"]
        if self.image_column == "image":
            del d["image_column"]
        return d


@dataclass
class BuildReport:
    out: Path
    manifest_path: Path
    inputs: int
    samples: int
    rejected: int
    copied: int
    reencoded: int
    shards: int
    seconds: float
    resumed_shards: int = 0

    def summary(self) -> str:
        rate = self.inputs / self.seconds if self.seconds > 0 else 0.0
        resumed = (
            f", {self.resumed_shards} shards kept from an earlier run"
            if self.resumed_shards
            else ""
        )
        return (
            f"{self.inputs} inputs -> {self.samples} samples in {self.shards} shards "
            f"({self.copied} copied, {self.reencoded} re-encoded), {self.rejected} rejected{resumed}; "
            f"{self.seconds:.1f} s, {rate:.0f} img/s; {self.manifest_path}"
        )
