"""The commands users run, one sub-package per job: ``shards`` (``moco-shards``: build,
verify, inspect, merge, preview), ``bench`` (``moco-bench``: one module per mode, the
data generators, machine facts) and ``demo`` (``moco-demo``).

May import ``moco_dali.train``, ``moco_dali.pipeline`` and ``moco_dali.model``; holds
no training or model logic of its own. The tools do not import each other, except
that the benchmarks and the demo build shards with ``shards``.
"""
