"""PNG figures written by the CLI: training curves (with SPT's prompt-patch NMI when logged) and confusion matrices.

matplotlib is imported lazily with the Agg backend, so these work on headless machines and the package does not
need matplotlib unless a figure is asked for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

NMI_KEY = re.compile(r"(?:^|_|/)nmi/layer_(\d+)$")


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("Plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def nmi_series(log_history: Sequence[dict]) -> dict[int, list[tuple[float, float]]]:
    """{layer: [(step, nmi), ...]} from the Trainer's log history (keys like `eval_nmi/layer_3` or `nmi/layer_3`)."""
    series: dict[int, list[tuple[float, float]]] = {}
    for entry in log_history:
        for key, value in entry.items():
            match = NMI_KEY.search(key)
            if match and isinstance(value, (int, float)):
                series.setdefault(int(match.group(1)), []).append((entry.get("step", 0), float(value)))
    return dict(sorted(series.items()))


def plot_training_curves(log_history: Sequence[dict], path, title: str = "") -> Path:
    """Training loss per logging step and evaluation accuracy per evaluation; a third panel shows the
    prompt-patch NMI of each layer when `PromptPatchNMICallback` logged it."""
    plt = _pyplot()
    loss = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    acc = [(e["step"], e["eval_accuracy"]) for e in log_history if "eval_accuracy" in e]
    nmi = nmi_series(log_history)
    panels = 3 if nmi else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    if loss:
        ax.plot(*zip(*loss), color="tab:blue")
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    if acc:
        ax.plot(*zip(*acc), marker="o", color="tab:green")
    ax.set(title="validation accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if nmi:
        ax = axes[0][2]
        cmap = plt.get_cmap("viridis")
        for i, (layer, points) in enumerate(nmi.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker=".", color=cmap(i / max(1, len(nmi) - 1)), label=f"layer {layer}")
        ax.set(title="prompt-patch NMI (SPT)", xlabel="step", ylabel="NMI")
        if all(v > 0 for points in nmi.values() for _, v in points):
            ax.set_yscale("log")  # NMI values are often orders of magnitude apart between layers
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(matrix, labels: Sequence[str], path, title: Optional[str] = None) -> Path:
    """Counts with rows = true label, columns = predicted label."""
    plt = _pyplot()
    n = len(labels)
    size = min(12, 2.5 + 0.6 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    peak = max(1, max(max(row) for row in matrix))
    if n <= 30:
        for i in range(n):
            for j in range(n):
                value = matrix[i][j]
                ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
