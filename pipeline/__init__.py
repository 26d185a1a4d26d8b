"""Shards in, MoCo view pairs out: the shard format, DALI reading and decoding."""
