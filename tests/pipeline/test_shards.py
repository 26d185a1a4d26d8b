"""The shard folder contract as a reader holds it: index lines, names."""

from __future__ import annotations

import pytest

from moco_dali.pipeline import shards
from moco_dali.pipeline.shards import ShardError


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty index"),
        ("v1.1 1\njpg 512 3 a.jpg\n", "expected 'v1.2 N'"),
        ("v1.2 2\njpg 512 3 a.jpg\n", "header says 2 samples, index lists 1"),
        ("v1.2 1\njpg 512 a.jpg\n", "line 2: expected groups"),
        ("v1.2 1\njpg x 3 a.jpg\n", "line 2: offset and size must be integers"),
    ],
)
def test_malformed_indexes_are_named(tmp_path, text, message):
    (tmp_path / "bad.idx").write_text(text)
    with pytest.raises(ShardError, match=message):
        shards.read_index(tmp_path / "bad.idx")


def test_names():
    assert shards.shard_stem("imagenet", 7) == "imagenet-000007"
    assert shards.shard_stem("imagenet", 7, part=3) == "imagenet-part0003-000007"
    assert shards.part_manifest_name(3, 8) == "manifest.part-0003-of-0008.json"
    assert shards.PART_MANIFEST_RE.match(shards.part_manifest_name(3, 8))
