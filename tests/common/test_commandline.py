"""The command-line binder's own parsing: sizes."""

from __future__ import annotations

import argparse

import pytest

from moco_dali.common.commandline import MAX_BYTES, parse_bytes


def test_sizes_are_read_exactly_and_bounded():
    assert parse_bytes("500MB") == 500_000_000
    assert parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes("0.00013GB") == 130_000  # exactly: a float product gives 129999
    assert parse_bytes(str(MAX_BYTES)) == MAX_BYTES


@pytest.mark.parametrize("text", ["9" * 400, str(2**63), "10000000000GB", "1e5", "-5", "5 apples"])
def test_what_is_not_a_size_is_refused_in_one_line(text):
    """The old variant: 400 digits became float('inf') and ended in OverflowError."""
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size") as refused:
        parse_bytes(text)
    assert len(str(refused.value)) < 120
