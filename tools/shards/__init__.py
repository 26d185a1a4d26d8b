"""``moco-shards``: image dumps to DALI-ready shards, and the checks and views of a shard folder.

The on-disk format is ``pipeline/shards.py``'s (the reader's contract), so writer and reader
share one. May import ``pipeline`` (the format, verify's DALI walk, preview's pipeline) and
``train``'s configuration (preview draws the training tree's views); never the other tools.
"""


class BuildError(ValueError):
    """A command cannot start or continue: a bad source, option or output (one line, exit 2)."""
