"""``moco-shards``: image dumps to DALI-ready shards, and the checks and views of a shard folder."""
