"""The training engine: configuration, distributed set-up, the step, the loop, schedules,
checkpoints, metrics and ``moco-train``; evaluation (kNN, the linear probe, export,
``moco-eval``) in the ``eval`` sub-package.

Wires ``moco_dali.pipeline`` and ``moco_dali.model`` together and re-implements
neither; never imports ``tools``. Inside it, ``eval`` uses the pieces (configuration,
step, checkpoints) and never the engine; the engine uses ``eval`` for its kNN monitor.
"""
