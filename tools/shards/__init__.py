"""``moco-shards``: image dumps to DALI-ready shards, and the checks and views of a shard folder.

Modules: ``inputs`` (what the inputs are and in what order), ``imageprep`` (one input
to one stored JPEG), ``build`` (packing, resume, the manifest), ``merge`` (the parts
of a multi-part build as one manifest), ``verify`` (verify and inspect), ``preview``
(a picture of a recipe's views), ``cli`` (the command). The on-disk format itself is
``moco_dali.pipeline.shards``'s, so writer and reader share one contract.

May import ``moco_dali.pipeline`` (the format, the DALI walk of verify, the view
pipeline of preview); never ``train``, ``model`` or the other tools.
"""


class BuildError(ValueError):
    """The build cannot start or continue: a bad source, option or output folder."""
