"""The paper's figures, redrawn from our runs with matplotlib."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from frem.seg.predict import PALETTE  # noqa: E402


def bx_scatter(trials: list[dict], path: Path, title: str) -> Path:
    """Fig. 7/8: the TPE search over B and X, coloured by validation mIoU."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    done = [t for t in trials if t["value"] is not None and "B" in t and "X" in t]
    complete = [t for t in done if t["state"] == "COMPLETE"]
    pruned = [t for t in trials if t["state"] == "PRUNED" and "B" in t]
    if complete:
        values = [t["value"] for t in complete]
        points = ax.scatter([t["B"] for t in complete], [t["X"] for t in complete], c=values,
                            cmap="viridis", s=50, edgecolors="k", linewidths=0.5, label="complete")
        fig.colorbar(points, ax=ax, label="validation mIoU")
        best = max(complete, key=lambda t: t["value"])
        ax.scatter([best["B"]], [best["X"]], marker="*", s=250, c="red", edgecolors="k", label="best")
    if pruned:
        ax.scatter([t["B"] for t in pruned], [t["X"] for t in pruned], marker="x", c="grey", label="pruned")
    ax.set_xlabel("B (enhanced channels)")
    ax.set_ylabel("X (enhancement factor)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def feature_magnitudes(histories: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Fig. 2: mean activation of the bottleneck and of the skip feature over epochs."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, history), color in zip(histories.items(), ("tab:blue", "tab:orange", "tab:green")):
        rows = [h for h in history if "bottleneck_mean" in h]
        epochs = [h["epoch"] + 1 for h in rows]
        ax.plot(epochs, [h["bottleneck_mean"] for h in rows], color=color, label=f"{name}: bottleneck")
        ax.plot(epochs, [h["skip_mean"] for h in rows], color=color, linestyle="--", label=f"{name}: skip")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean activation (validation split)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def enhanced_channels(history: list[dict], path: Path, title: str) -> Path:
    """Fig. 9: bottleneck activation of the channels FREM enhanced vs the others."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [h for h in history if "enhanced_mean" in h]
    epochs = [h["epoch"] + 1 for h in rows]
    ax.plot(epochs, [h["enhanced_mean"] for h in rows], marker="o", label="enhanced channels")
    ax.plot(epochs, [h["other_mean"] for h in rows], marker="s", label="other channels")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean activation (validation split)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def qualitative(images: np.ndarray, truth: np.ndarray, predictions: dict[str, np.ndarray], classes,
                path: Path, title: str) -> Path:
    """Fig. 5/6: input, ground truth and each variant's prediction for a few tiles."""
    rows, columns = images.shape[0], 2 + len(predictions)
    colours = ListedColormap([np.array(PALETTE[i % len(PALETTE)]) / 255 if name != "background"
                              else (0.1, 0.1, 0.1) for i, name in enumerate(classes)])
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 1.9 * rows + 0.4), squeeze=False)
    for r in range(rows):
        panels = [("input", images[r], "gray"), ("ground truth", truth[r], colours)]
        panels += [(name, prediction[r], colours) for name, prediction in predictions.items()]
        for c, (name, panel, cmap) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel, cmap=cmap, vmin=0, vmax=255 if cmap == "gray" else len(classes) - 1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    legend = ", ".join(f"{name}: {'dark' if name == 'background' else _colour_name(i)}"
                       for i, name in enumerate(classes))
    fig.suptitle(f"{title}\n{legend}", fontsize=9)
    return _save(fig, path)


def _colour_name(index: int) -> str:
    return ("red", "green", "yellow", "blue", "orange", "purple", "cyan", "magenta", "lime", "pink")[index % 10]


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # "tight" grows the canvas to hold a long protocol line in the title instead of cutting it
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
