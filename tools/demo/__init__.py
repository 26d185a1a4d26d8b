"""``moco-demo``: the built-in default job on Fashion-MNIST, measured and explained.

``data`` (Fashion-MNIST or drawn shapes as a raw image dump), ``run`` (the pretraining
and its before/after measurements), ``report`` (the table, the verdict, the picture),
``cli`` (the command). Builds shards with ``tools.shards``; trains and measures with
``train``.
"""
