"""The MoCo algorithm: encoders and heads, the MoCo module, the key queue, the momentum
update and shuffle-BN. Knows nothing of DALI or of the training loop."""
