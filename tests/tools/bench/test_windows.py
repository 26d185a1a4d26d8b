"""How moco-bench times its contenders: windows sized by time, and a slow feed's windows back to
back so that nothing waits for its refills and none starts pre-filled."""

from __future__ import annotations

import itertools

from moco_dali.tools.bench import common
from moco_dali.tools.bench.common import Feed, window_batches, windows
from moco_dali.tools.bench.options import BenchOptions


def test_windows_are_sized_by_time_within_the_batches_bound():
    fixed = BenchOptions(batches=50)
    assert window_batches(10, 1.0, fixed) == 50  # no --window-s: exactly --batches
    timed = BenchOptions(batches=50, window_s=4.0)
    assert window_batches(10, 1.0, timed) == 40  # 10 batches/s for 4 s
    assert window_batches(10, 20.0, timed) == 3  # a slow feed: at least 3
    assert window_batches(10, 0.01, timed) == 50  # a fast one: at most --batches


def test_a_group_of_one_runs_back_to_back_and_settles_only_when_the_feed_changes(monkeypatch):
    settled, order = [], []
    monkeypatch.setattr(common, "settle", lambda feed, feeds: settled.append(feed))
    fast, slow = Feed(itertools.count(), backlog=2), Feed(itertools.count(), backlog=32)

    def window(name):
        return lambda n: (order.append((name, n)) or 1.0, 0.0)

    runs = {"ours": (fast, window("ours")), "reference": (slow, window("reference"))}
    timed = windows(runs, [["ours"], ["reference"]], reps=3, batches={"ours": 5, "reference": 3})
    assert order == [("ours", 5)] * 3 + [("reference", 3)] * 3
    assert settled == [fast, slow]  # once per feed, when the windows move to it
    assert {name: len(t) for name, t in timed.items()} == {"ours": 3, "reference": 3}
    settled.clear()
    windows(runs, [["ours", "reference"]], reps=2, batches={"ours": 1, "reference": 1})
    assert settled == [fast, slow, fast, slow]  # alternating: every window settles
