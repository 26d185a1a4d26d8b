"""The declared schema of a shard folder's JSON files: ``manifest.json`` and the part manifests.

One declaration, with bounds, that every reader decodes against (``common.files.read_json``, by
msgspec) before a value is used: a count is a whole number in ``0..MAX_COUNT``, a name a string
without NUL, a digest 64 hex digits. What the builder writes is ``build._manifest``; what a
reader may rely on is here. Unknown fields are kept and ignored, so a newer writer's additions
do not break an older reader.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

import msgspec
from msgspec import Meta

__all__ = [
    "Count",
    "Label",
    "MAX_COUNT",
    "MAX_MANIFEST_BYTES",
    "ShardEntry",
    "ManifestSchema",
    "PartManifestSchema",
]

MAX_COUNT = 2**40
"""The largest count (samples, inputs, bytes of a shard): 1,000 times the billion samples the
design aims at, and far inside int64, where numpy holds the counts."""
MAX_MANIFEST_BYTES = 1 << 30
"""The largest manifest read: a billion samples in 100,000 shards is about 30 MB of JSON."""

Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Label = Annotated[str, Meta(max_length=4096, pattern="^[^\x00]*$")]
"""A class name, source or reason: a string without NUL, at most PATH_MAX long."""
Name = Annotated[str, Meta(min_length=1, max_length=4096, pattern="^[^\x00]*$")]
# The shard list is the manifest's bulk (100,000 entries at a billion samples), so its strings
# are bounded by length, which msgspec checks at C speed (a pattern costs a Python regex call
# per value); NUL in a shard's paths is looked for once over all of them (ManifestSchema).
Path = Annotated[str, Meta(min_length=1, max_length=4096)]
Digest = Annotated[str, Meta(min_length=64, max_length=64)]
"""A sha256 as 64 hex digits (verify compares it with the digest it computes)."""


class ShardEntry(msgspec.Struct, frozen=True):
    """One shard as the manifest records it; paths are relative to the manifest's folder."""

    tar: Path
    index: Path
    samples: Count
    bytes: Count
    sha256: Digest
    index_sha256: Digest

    @classmethod
    def from_json(cls, obj: Any) -> "ShardEntry":
        """``obj`` (a decoded shard entry) checked against the schema; ``msgspec.ValidationError``
        names the field at fault."""
        return msgspec.convert(obj, cls)

    def to_json(self) -> dict[str, Any]:
        """The entry as the manifest stores it."""
        return msgspec.structs.asdict(self)


class RejectedInput(msgspec.Struct):
    """A version 1 manifest listed every rejected input with its reason."""

    input: Label
    reason: Label


class ManifestSchema(msgspec.Struct):
    """``manifest.json``: what ``load_manifest`` checks before any reader uses it."""

    format: str
    version: int
    samples: Count
    shards: list[ShardEntry]
    name: Label = ""
    inputs: Count = 0
    copied: Count = 0
    reencoded: Count = 0
    classes: Optional[list[Label]] = None
    class_counts: dict[Label, Count] = {}
    rejected: Union[Count, list[RejectedInput]] = 0
    rejected_reasons: dict[Label, Count] = {}
    rejected_file: Optional[Name] = None
    settings: dict[str, Any] = {}
    sources: list[Label] = []
    input_digest: str = ""
    parts: list[dict[str, Any]] = []
    indexed: bool = False
    """Shards are tars written elsewhere, indexed in place (``moco-shards index``, version 3)."""
    label_key: Optional[Name] = None
    """Set by ``moco-shards index --label-key``: every sample's ``cls`` component is a label
    pointer into its ``KEY.json`` (``shards.label_digits``), the class its field of this name."""
    order: Annotated[int, Meta(ge=1, le=1 << 16)] = 1
    """The naming rule the build packed by (``tools/shards/inputs.ORDER``); 1 when not written."""

    def __post_init__(self) -> None:
        if any("\0" in entry.tar or "\0" in entry.index for entry in self.shards):
            index = next(i for i, e in enumerate(self.shards) if "\0" in e.tar + e.index)
            raise ValueError(f"shards[{index}]: a NUL character in its tar or index path")


class PartSettings(msgspec.Struct):
    """Of a part's settings, what ``merge`` reads; the rest is compared whole between parts."""

    part: Count
    num_parts: Annotated[int, Meta(ge=1, le=1_000_000)]

    def __post_init__(self) -> None:
        if self.part >= self.num_parts:
            raise ValueError(f"settings.part {self.part} is not below num_parts {self.num_parts}")


class PartManifestSchema(ManifestSchema, kw_only=True):
    """A part manifest (``manifest.part-NNNN-of-MMMM.json``): a manifest whose every field
    ``merge`` adds up or compares is present, with its class counts among its classes."""

    name: Label
    settings: PartSettings
    classes: list[Label]
    class_counts: dict[Label, Count]
    inputs: Count
    copied: Count
    reencoded: Count
    rejected: Count
    rejected_reasons: dict[Label, Count]
    rejected_file: Name
    input_digest: str
    sources: list[Label]
    parts: list[dict[str, Any]]

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.class_counts) - set(self.classes))
        if unknown:
            raise ValueError(f"class_counts names {unknown[0]!r}, which is not in classes")
