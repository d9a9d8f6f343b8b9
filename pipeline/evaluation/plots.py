"""PNG figures of one evaluated set: ROC, precision-recall, reliability diagram, confusion matrix.

Each figure is a ``matplotlib.figure.Figure`` attached to an Agg canvas, never created through
pyplot: no display is needed, the process-wide backend is left alone (notebooks keep theirs), and
figures are freed when they go out of scope instead of piling up in pyplot's registry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve

# Operating points marked on the curves: label -> (x, y) in the plot's coordinates.
Points = dict[str, tuple[float | None, float | None]]  # None: undefined at that threshold
_SIZE = (4.5, 4.0)
_DPI = 100


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, auc: float, points: Points, title: str, path: Path) -> Path:
    fig, ax = _figure()
    ax.plot(fpr, tpr, lw=1.5, label=f"ROC (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance")
    _mark(ax, points)
    _finish(ax, title, "false positive rate (1 - specificity)", "sensitivity", "lower right")
    return _save(fig, path)


def plot_pr(
    recall: np.ndarray, precision: np.ndarray, ap: float, prevalence: float, points: Points, title: str, path: Path
) -> Path:
    fig, ax = _figure()
    ax.step(recall, precision, where="post", lw=1.5, label=f"PR (AP {ap:.3f})")
    ax.axhline(prevalence, ls="--", lw=0.8, color="grey", label=f"prevalence {prevalence:.2f}")
    _mark(ax, points)
    _finish(ax, title, "recall (sensitivity)", "precision", "lower left")
    return _save(fig, path)


def plot_reliability(y_true: np.ndarray, y_score: np.ndarray, n_bins: int, ece: float, title: str, path: Path) -> Path:
    """Observed pneumonia rate against mean predicted probability per equal-width bin, over a histogram."""
    fig, ax = _figure()
    observed, predicted = calibration_curve(y_true, y_score, n_bins=n_bins, strategy="uniform")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfect calibration")
    ax.plot(predicted, observed, marker="o", lw=1.5, label=f"model (ECE {ece:.3f})")
    # The histogram shows where the scores lie: a bin's point means little when few images fall in it.
    counts = ax.twinx()
    counts.hist(y_score, bins=n_bins, range=(0, 1), color="grey", alpha=0.25)
    counts.set_ylabel("images")
    ax.set_zorder(counts.get_zorder() + 1)  # curve above the histogram, not hidden behind it
    ax.patch.set_visible(False)
    _finish(ax, title, "mean predicted probability of pneumonia", "observed pneumonia rate", "upper left")
    return _save(fig, path)


def plot_confusion(tn: int, fp: int, fn: int, tp: int, threshold: float, title: str, path: Path) -> Path:
    fig, ax = _figure()
    counts = np.array([[tn, fp], [fn, tp]])
    ax.imshow(counts, cmap="Blues")
    for (row, col), value in np.ndenumerate(counts):
        colour = "white" if value > counts.max() / 2 else "black"
        ax.text(col, row, str(value), ha="center", va="center", color=colour, fontsize=12)
    ax.set_xticks([0, 1], ["normal", "pneumonia"])
    ax.set_yticks([0, 1], ["normal", "pneumonia"])
    ax.set_xlabel(f"predicted (probability >= {threshold:.3f})")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_message(message: str, title: str, path: Path) -> Path:
    """A figure that says why the real one cannot be drawn, so every expected file still exists."""
    fig, ax = _figure()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _figure():
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _mark(ax, points: Points) -> None:
    for label, (x, y) in points.items():
        if x is not None and y is not None and np.isfinite(x) and np.isfinite(y):  # None: undefined at this threshold
            ax.plot([x], [y], marker="o", ls="none", label=label)


def _finish(ax, title: str, xlabel: str, ylabel: str, legend_at: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(loc=legend_at, fontsize=7)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
