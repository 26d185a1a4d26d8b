"""The commands users run, one sub-package per job: ``shards`` (``moco-shards``), ``bench``
(``moco-bench``) and ``demo`` (``moco-demo``)."""
