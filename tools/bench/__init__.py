"""``moco-bench``: throughput, this project's path beside the reference path."""
