"""What pretrained features are worth, and taking them elsewhere: weighted kNN (also the
engine's monitor), the paper's linear probe, checkpoints read as encoders and exported
for torchvision or detectron2, and the ``moco-eval`` command.

May import ``moco_dali.pipeline``, ``moco_dali.model`` and train's pieces
(configuration, step, checkpoints); never ``train.engine`` or ``tools``.
"""
