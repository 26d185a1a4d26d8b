"""Shards in, MoCo view pairs out: the shard format and discovery, the DALI view pipeline,
the augmentation presets, the torchvision reference pipeline.

The only package that imports DALI. Imports nothing else of moco_dali: ``model``,
``train`` and ``tools`` build on it, never the other way round.
"""
