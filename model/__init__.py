"""The MoCo algorithm: encoders and heads, the MoCo module, the key queue, the momentum
update and shuffle-BN.

Knows nothing of DALI, of the data path or of the training loop: imports nothing else
of moco_dali (``pipeline`` and ``model`` are independent of each other).
"""
