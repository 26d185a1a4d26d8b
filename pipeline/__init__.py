"""Shards in, MoCo view pairs out: the shard format and discovery, the DALI view pipeline,
the augmentation presets, the torchvision reference pipeline. Never imports model or train."""
