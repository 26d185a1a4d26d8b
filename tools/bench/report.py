"""The figures a ``moco-bench`` record is judged by, the declared schema of what they are read
from, two records side by side, and the chart.

A record read back (``--compare``) goes through the one bounded reader and this schema
(``Record``): each mode's figures are finite numbers of at most ``MAX_FIGURE`` (an extrapolation
may be negative), so ``headline`` never meets a missing key or a string where a number is meant;
``load`` refuses a headline figure of 0, which ``compare`` would divide by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional, Union

import msgspec
from msgspec import Meta, Struct

from ...common.files import check_schema, read_json

__all__ = ["Record", "MAX_RECORD_BYTES", "load", "headline", "compare", "chart"]

MAX_FIGURE = 1e15
MAX_RECORD_BYTES = 64 << 20
"""The largest record read: the largest committed one is about 60 KB."""

Figure = Annotated[float, Meta(ge=-MAX_FIGURE, le=MAX_FIGURE)]


class _Mode(Struct, tag_field="mode", kw_only=True):
    date: Optional[str] = None
    machine: Optional["_Machine"] = None


class _Machine(Struct):
    gpus: list[str] = []
    cores: Optional[int] = None


class _PairsPerS(Struct):
    pairs_per_s: Figure


class _ImagesPerS(Struct):
    images_per_s: Figure


class _PipelineResults(Struct):
    dali: _PairsPerS
    reference: _PairsPerS


class _Pipeline(_Mode, tag="pipeline"):
    results: _PipelineResults
    decode_ceiling: Optional[_ImagesPerS] = None


class _Views(_Mode, tag="views"):
    results: dict[str, _PairsPerS]

    def __post_init__(self) -> None:
        _having(self.results, "results", "whole recipe")


class _MedianMs(Struct):
    median_ms: Figure


class _Momentum(_Mode, tag="momentum"):
    momentum: dict[str, _MedianMs]
    best: str
    floor_ms: Figure

    def __post_init__(self) -> None:
        _having(self.momentum, "momentum", self.best, "loop")


class _StepResults(Struct):
    ours: _ImagesPerS
    reference: _ImagesPerS


class _Step(_Mode, tag="step"):
    results: _StepResults


class _E2eResults(Struct):
    e2e_ours: _ImagesPerS
    e2e_reference: _ImagesPerS
    step_ours: _ImagesPerS


class _E2e(_Mode, tag="e2e"):
    results: _E2eResults


class _ImgPerS(Struct):
    img_per_s: Figure


class _ShardsResults(Struct):
    reencode_w1: _ImgPerS
    passthrough_w1: _ImgPerS
    baseline: _ImgPerS


class _Shards(_Mode, tag="shards"):
    results: _ShardsResults


class _IndexRun(Struct):
    img_per_s: Figure
    peak_rss_mb: Figure


class _IndexResults(Struct):
    index: _IndexRun
    build: _IndexRun
    rebuild: Optional[_IndexRun] = None  # records from before the re-encoding contender


class _Index(_Mode, tag="index"):
    results: _IndexResults


class _Store(_Mode, tag="store"):
    local: _PairsPerS
    store: _PairsPerS


class _Predicted(Struct):
    first_batch_s: Figure
    peak_rss_GB: Figure


class _Goals(Struct):
    startup_s: Figure
    peak_rss_GB: Figure


class _Target(Struct):
    samples: Figure
    world: Annotated[int, Meta(ge=1, le=2**31)]


class _Extrapolation(Struct):
    predicted: _Predicted
    goals: _Goals
    target: _Target


class _Scale(_Mode, tag="scale"):
    extrapolation: _Extrapolation


class _At1e9(Struct):
    at_1e9: Figure


class _Fit(Struct):
    peak_rss_mb: _At1e9


class _ScaleBuild(_Mode, tag="scale-build"):
    fits: dict[str, _Fit]

    def __post_init__(self) -> None:
        for name in self.fits:
            if "/streaming/" in name:
                _having(self.fits, "fits", name.replace("/streaming/", "/whole-listing/"))


_ONE_MODE = Union[
    _Pipeline, _Views, _Momentum, _Step, _E2e, _Shards, _Index, _Store, _Scale, _ScaleBuild
]


class _All(_Mode, tag="all"):
    records: dict[str, dict[str, Any]]
    partial: bool = False

    def __post_init__(self) -> None:  # a mode that failed is kept with its error, not its figures
        for name, record in self.records.items():
            if not isinstance(record.get("error"), str):
                try:
                    msgspec.convert(record, _ONE_MODE)
                except msgspec.ValidationError as exc:
                    raise ValueError(f"records.{name}: {exc}") from None


Record = Union[_ONE_MODE, _All]
"""A ``moco-bench`` record, by its ``mode``: the figures ``headline`` reads, each with its bounds
(other fields are kept and not checked)."""


def _having(mapping: dict, field: str, *keys: str) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise ValueError(f"{field} has no {missing[0]!r}")


def load(path: Path) -> dict:
    """The record in ``path``, read with bounded cost and checked against ``Record``.

    Raises ``ValueError``: one line naming the file, and the limit or the field at fault.
    """
    record = read_json(path, "moco-bench record", max_bytes=MAX_RECORD_BYTES)
    check_schema(record, Record, path, "moco-bench record", ValueError, verdict="not a")
    for row in headline(record):
        for key in ("ours", "reference"):
            if row[key] == 0:
                raise ValueError(f"{path}: not a moco-bench record ({row['figure']}: {key} is 0)")
    return record


def headline(record: dict) -> list[dict]:
    """The figures a record is judged by: ours, the reference (or baseline) and, where one applies, the ceiling."""
    mode = record["mode"]
    if mode == "all":
        return [row for r in record["records"].values() if "error" not in r for row in headline(r)]
    if mode == "pipeline":
        r = record["results"]
        row = {
            "figure": "pipeline pairs/s",
            "ours": r["dali"]["pairs_per_s"],
            "reference": r["reference"]["pairs_per_s"],
            "higher_is_better": True,
            "labels": ["ours", "reference", "decode only (images/s)"],
        }
        if "decode_ceiling" in record:  # records before the ceiling was measured lack it
            row["ceiling"] = record["decode_ceiling"]["images_per_s"]
        return [row]
    if mode == "views":  # the whole recipe beside the crop alone (or the one operator it has)
        r = record["results"]
        other = (
            "crop only"
            if "crop only" in r
            else next((n for n in r if n != "whole recipe"), "whole recipe")
        )
        return [
            {
                "figure": "view recipe pairs/s",
                "ours": r["whole recipe"]["pairs_per_s"],
                "reference": r[other]["pairs_per_s"],
                "higher_is_better": True,
                "labels": ["whole recipe", other],
            }
        ]
    if mode == "momentum":
        m = record["momentum"]
        return [
            {
                "figure": "momentum update ms",
                "ours": m[record["best"]]["median_ms"],
                "reference": m["loop"]["median_ms"],
                "ceiling": record["floor_ms"],
                "higher_is_better": False,
                "labels": ["ours", "per-parameter loop", "bandwidth floor"],
            }
        ]
    if mode == "step":
        r = record["results"]
        return [
            {
                "figure": "step images/s",
                "ours": r["ours"]["images_per_s"],
                "reference": r["reference"]["images_per_s"],
                "higher_is_better": True,
            }
        ]
    if mode == "e2e":
        r = record["results"]
        return [
            {
                "figure": "e2e images/s",
                "ours": r["e2e_ours"]["images_per_s"],
                "reference": r["e2e_reference"]["images_per_s"],
                "ceiling": r["step_ours"]["images_per_s"],
                "higher_is_better": True,
                "labels": ["ours", "reference", "step (synthetic)"],
            }
        ]
    if mode == "shards":
        r = record["results"]
        return [
            {
                "figure": f"shard build {path} img/s (1 worker)",
                "ours": r[f"{path}_w1"]["img_per_s"],
                "reference": r["baseline"]["img_per_s"],
                "higher_is_better": True,
                "labels": ["ours", "PIL + ShardWriter"],
            }
            for path in ("reencode", "passthrough")
        ]
    if mode == "index":  # the same tars made trainable: indexed in place, or built anew
        r = record["results"]
        rows = [
            {
                "figure": "img2dataset tars made trainable, img/s (1 process)",
                "ours": r["index"]["img_per_s"],
                "reference": r["build"]["img_per_s"],
                "higher_is_better": True,
                "labels": ["index", "build"],
            },
            {
                "figure": "peak MB of that process",
                "ours": r["index"]["peak_rss_mb"],
                "reference": r["build"]["peak_rss_mb"],
                "higher_is_better": False,
                "labels": ["index", "build"],
            },
        ]
        if r.get("rebuild"):  # records from before the re-encoding contender have none
            rows.append(
                {
                    "figure": "the same tars, every image re-encoded, img/s (1 process)",
                    "ours": r["index"]["img_per_s"],
                    "reference": r["rebuild"]["img_per_s"],
                    "higher_is_better": True,
                    "labels": ["index", "rebuild"],
                }
            )
        return rows
    if mode == "store":  # the same windows read from the store and from local disk
        return [
            {
                "figure": "view pairs/s from the store through the cache",
                "ours": record["store"]["pairs_per_s"],
                "reference": record["local"]["pairs_per_s"],
                "higher_is_better": True,
                "labels": ["store", "local disk"],
            }
        ]
    if mode == "scale":  # the fitted extrapolation to the target, beside the goal
        ex = record["extrapolation"]
        predicted, goals, target = ex["predicted"], ex["goals"], ex["target"]
        at = f"at {target['samples']:.0e} samples, world {target['world']}"
        return [
            {
                "figure": f"rank start-up s {at}",
                "ours": predicted["first_batch_s"],
                "reference": goals["startup_s"],
                "higher_is_better": False,
                "labels": ["extrapolated", "goal"],
            },
            {
                "figure": f"rank peak GB {at}",
                "ours": predicted["peak_rss_GB"],
                "reference": goals["peak_rss_GB"],
                "higher_is_better": False,
                "labels": ["extrapolated", "goal"],
            },
        ]
    if mode == "scale-build":  # one part's memory at 1e9 inputs, beside the design it replaced
        fits = record["fits"]
        return [
            {
                "figure": f"build MB per part at 1e9 ({name.replace('/streaming/', ', ')})",
                "ours": fit["peak_rss_mb"]["at_1e9"],
                "reference": fits[name.replace("/streaming/", "/whole-listing/")]["peak_rss_mb"][
                    "at_1e9"
                ],
                "higher_is_better": False,
                "labels": ["streaming", "whole listing"],
            }
            for name, fit in fits.items()
            if "/streaming/" in name
        ]
    raise ValueError(f"unknown benchmark mode {mode!r}")


def _where(record: dict) -> str:
    m = record.get("machine", {})
    gpus = m.get("gpus") or []
    # A record written part-way (``all`` stopped before its last mode) dates its modes only.
    date = record.get("date") or next(
        (r.get("date") for r in record.get("records", {}).values() if r.get("date")), "?"
    )
    partial = ", partial: the run stopped before its last mode" if record.get("partial") else ""
    return f"{date}, {gpus[0] + ' x' + str(len(gpus)) if gpus else 'no GPU'}, {m.get('cores')} cores{partial}"


def compare(a_path: Path, b_path: Path) -> dict:
    """Headline figures of two records side by side, with B over A for ours."""
    a, b = load(a_path), load(b_path)
    rows_b = {row["figure"]: row for row in headline(b)}
    rows = []
    for row in headline(a):
        other = rows_b.get(row["figure"])
        if other:
            rows.append(
                {
                    "figure": row["figure"],
                    "a": row["ours"],
                    "b": other["ours"],
                    "b_over_a": other["ours"] / row["ours"],
                    "a_reference": row["reference"],
                    "b_reference": other["reference"],
                }
            )
    print(f"A: {a_path} ({_where(a)})\nB: {b_path} ({_where(b)})")
    print(
        f"{'figure':36s} {'A ours':>10s} {'B ours':>10s} {'B / A':>7s} {'A ref':>10s} {'B ref':>10s}"
    )
    for r in rows:
        print(
            f"{r['figure']:36s} {r['a']:10.2f} {r['b']:10.2f} {r['b_over_a']:7.2f} {r['a_reference']:10.2f} "
            f"{r['b_reference']:10.2f}"
        )
    if not rows:
        print("no figure in common")
    return {"a": str(a_path), "b": str(b_path), "rows": rows}


def chart(record: dict, out: Path) -> Path:
    """One panel per headline figure: ours, the reference and the ceiling where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = headline(record)
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.1 + 1.0 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        names = ["ours", "reference"] + (["ceiling"] if row.get("ceiling") else [])
        values = [row[n] for n in names]
        bars = ax.barh(
            row.get("labels", names)[: len(names)],
            values,
            color=["#2a7ab0", "#b0b0b0", "#e0a030"][: len(names)],
        )
        ax.bar_label(bars, fmt="%.3g", padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(
            row["figure"] + ("" if row["higher_is_better"] else " (lower is better)"),
            fontsize=9,
            loc="left",
        )
        ax.tick_params(labelsize=8)
        ax.set_xlim(0, max(values) * 1.2)
    fig.suptitle(f"moco-bench {record['mode']}: {_where(record)}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
