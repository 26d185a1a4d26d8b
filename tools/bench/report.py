"""The figures a ``moco-bench`` record is judged by, two records side by side, and the chart."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["headline", "compare", "chart"]


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


def _load(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
        headline(record)
        return record
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a moco-bench record ({type(exc).__name__}: {exc})") from None


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
    a, b = _load(a_path), _load(b_path)
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
