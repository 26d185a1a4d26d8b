"""What the demo says: the table of measured figures, a verdict computed from them, the JSON and the picture.

Nothing here is pre-written about the outcome: every figure comes from the run, and
the verdict picks its words from them (learning or not, features better, mixed or
not yet better than at initialisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["pretext_window", "not_logged", "verdict", "table", "figure"]

# Below this many points of difference the demo calls two accuracies the same: a few
# images of 10,000, and the spread of a repeated run with another seed.
SAME_POINTS = 0.5
# A fall of the pretext loss this large (nats, a window's mean) is learning, whatever the top-1 does.
LOSS_DROP = 0.3


def pretext_window(curve: list[dict], K: int, batch: int) -> tuple[Optional[dict], Optional[dict]]:
    """Loss and pretext top-1 averaged over the first logged steps once real keys fill the queue (before it, the
    random start makes the task easy) and over the last ones: a quarter of the points each, at most 5.

    One logged step's top-1 is one batch's: 128 samples give steps of 0.8 points, so a
    single point at each end can say the opposite of the trend. ``(None, None)`` when
    no step was logged.
    """
    filled = [p for p in curve if p["step"] * batch >= K] or curve
    if not filled:
        return None, None
    n = max(1, min(5, len(filled) // 4))

    def mean(points: list[dict]) -> dict:
        return {
            "steps": [points[0]["step"], points[-1]["step"]],
            "loss": sum(p["loss"] for p in points) / len(points),
            "pretext_top1": sum(p["pretext_top1"] for p in points) / len(points),
        }

    return mean(filled[:n]), mean(filled[-n:])


def not_logged(result: dict) -> Optional[str]:
    """Why the pretext task and the rate were not measured (no step was logged), or None when they were."""
    if result["pretext"]["first"] is not None:
        return None
    return (
        f"no step was logged: pretraining stopped (--minutes) at step {result['steps']}, before its first log at "
        f"step {result['config']['run']['log_every']}, so the pretext task and images/s were not measured"
    )


def _compare(name: str, before: float, after: float) -> str:
    return f"{name} {before:.2f}% -> {after:.2f}%"


def verdict(result: dict) -> str:
    """One line from the figures: does the pretext task learn, and are the features better than at initialisation."""
    first, last = result["pretext"]["first"], result["pretext"]["last"]
    chance = result["pretext"]["chance_top1"]
    if first is None:
        head = not_logged(result)
    else:
        # Either sign is learning: the top-1 rises, or the loss falls while harder negatives fill the
        # queue and hold the top-1 (as in a run's later epochs).
        learning = (
            last["pretext_top1"] >= max(5 * chance, first["pretext_top1"] + 2.0)
            or last["loss"] <= first["loss"] - LOSS_DROP
        )
        figures_now = (
            f"pretext top-1 {first['pretext_top1']:.1f}% -> {last['pretext_top1']:.1f}% (chance "
            f"{chance:.2f}%), loss {first['loss']:.2f} -> {last['loss']:.2f}"
        )
        head = f"learning: {figures_now}" if learning else f"not learning yet: {figures_now}"
    init, after = result["features"]["init"], result["features"]["after"]
    knn_gain = after["knn_top1"] - init["knn_top1"]
    linear_gain = after["linear_top1"] - init["linear_top1"]
    figures = (
        f"{_compare('kNN', init['knn_top1'], after['knn_top1'])}, "
        f"{_compare('linear', init['linear_top1'], after['linear_top1'])}"
    )
    epochs = result["epochs_seen"]
    if knn_gain > SAME_POINTS and linear_gain > SAME_POINTS:
        tail = f"features better than a random ResNet-18 after {epochs:.2g} epochs ({figures})"
    elif knn_gain > SAME_POINTS or linear_gain > SAME_POINTS:
        tail = (
            f"features partly better than a random ResNet-18 after {epochs:.2g} epochs ({figures})"
        )
    else:
        tail = (
            f"features not yet better than a random ResNet-18 on this data after {epochs:.2g} epochs "
            f"({figures}); --epochs N runs longer with the kNN monitor after each epoch (docs/demo.md)"
        )
    return f"{head}; {tail}"


def table(result: dict) -> str:
    f = result["features"]
    rows = [
        ("raw pixels", f["pixels"]),
        ("ResNet-18 at initialisation", f["init"]),
        (f"after {result['steps']} steps ({result['epochs_seen']:.2g} epochs)", f["after"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {'':{width}s}  kNN top-1  linear top-1"]
    lines += [
        f"  {name:{width}s}  {r['knn_top1']:8.2f}%  {r['linear_top1']:11.2f}%" for name, r in rows
    ]
    return "\n".join(lines)


def figure(result: dict, views_png: Path, out: Path) -> Path:
    """Loss and pretext curves, kNN and linear at the measured points, and the views the run trained on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    curve = result["curve"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve])
    ax.set(title="loss", xlabel="step")
    ax = axes[0, 1]
    ax.plot([p["step"] for p in curve], [p["pretext_top1"] for p in curve], label="pretext top-1")
    ax.axhline(result["pretext"]["chance_top1"], color="grey", ls=":", label="chance")
    ax.axvline(
        result["config"]["model"]["K"] / result["config"]["data"]["batch_size"],
        color="grey",
        ls="--",
        lw=0.8,
        label="queue filled with real keys",
    )
    ax.set(title="pretext (instance discrimination) top-1 %", xlabel="step")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    f = result["features"]
    points = [
        (0, f["init"]),
        *[(p["epoch"], {"knn_top1": p["knn_top1"]}) for p in result["knn_by_epoch"]],
        (result["epochs_seen"], f["after"]),
    ]
    ax.plot([e for e, _ in points], [p["knn_top1"] for _, p in points], "o-", label="kNN top-1")
    ax.plot(
        [0, result["epochs_seen"]],
        [f["init"]["linear_top1"], f["after"]["linear_top1"]],
        "s--",
        label="linear probe top-1",
    )
    ax.axhline(f["pixels"]["knn_top1"], color="tab:blue", ls=":", lw=0.8, label="raw pixels, kNN")
    ax.axhline(
        f["pixels"]["linear_top1"], color="tab:orange", ls=":", lw=0.8, label="raw pixels, linear"
    )
    ax.set(title="frozen features on the test images", xlabel="epochs of pretraining", ylabel="%")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    ax.imshow(Image.open(views_png))
    ax.set_axis_off()
    ax.set_title("stored images and the two views of each", fontsize=9)
    fig.suptitle(result["verdict"], fontsize=7, wrap=True)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
