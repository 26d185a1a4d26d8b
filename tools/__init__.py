"""Command-line entry points: ``moco-shards`` (build, verify, inspect, merge)."""
