"""``moco-bench``: throughput, this project's path beside the reference path, one module per mode.

``cli`` (the command and the record), ``common`` (timing, memory, the data measured
on), ``pipeline``, ``momentum``, ``step`` (``step`` and ``e2e``), ``shards``, ``index`` (index
against build on the same tars),
``scale`` (a rank's start-up as the data grows),
``report`` (headline figures, ``--compare``, ``--chart``); the data generators
``synthetic`` and ``photoset``, and ``machine`` (what the record says it ran on).
"""
