"""``moco-shards``: image dumps to DALI-ready shards, and the checks and views of a shard folder.

Modules: ``inputs`` (what the inputs are, which part owns each), ``order`` (the
packing order, an external sort), ``imageprep`` (one input to one stored JPEG),
``writer`` (a worker's block of inputs to crash-safe shards), ``folder`` (the lock
on the output folder and what may be in it), ``build`` (one part: blocks, resume,
the manifest), ``executor`` (every part as a Ray task), ``merge`` (the parts of a
multi-part build as one manifest), ``verify`` (verify and inspect), ``preview`` (a
picture of a recipe's views), ``cli`` (the command). The on-disk format itself is
``moco_dali.pipeline.shards``'s, so writer and reader share one contract.

May import ``moco_dali.pipeline`` (the format, the DALI walk of verify, the view
pipeline of preview); never ``train``, ``model`` or the other tools.
"""


class BuildError(ValueError):
    """A command cannot start or continue: a bad source, option or output (one line, exit 2)."""
