"""How far apart the two domains' features are: proxy A-distance and a t-SNE picture.

Computed before and after adaptation on the same images, so a drop in distance (and
overlapping clouds) shows that alignment happened, not just that the loss went down.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from pipeline.crosssim.losses import proxy_a_distance


@dataclass(frozen=True)
class DomainGap:
    proxy_a_distance: float
    mean_feature_distance: float  # ‖mean(f_src) − mean(f_tgt)‖₂: cheap, tracked over training
    tsne_plot: Path

    def to_dict(self) -> dict[str, float | str]:
        return {
            "proxy_a_distance": self.proxy_a_distance,
            "mean_feature_distance": self.mean_feature_distance,
            "tsne_plot": self.tsne_plot.name,
        }


@dataclass(frozen=True)
class DomainShift:
    """The gap between source and target features before and after adaptation, on the same probe images."""

    before: DomainGap
    after: DomainGap

    def to_dict(self) -> dict[str, dict[str, float | str]]:
        return {"before": self.before.to_dict(), "after": self.after.to_dict()}


def domain_gap(source: np.ndarray, target: np.ndarray, title: str, plot_path: Path, seed: int) -> DomainGap:
    """PAD between (N, D) source and (M, D) target features, plus a t-SNE scatter of both."""
    source, target = np.asarray(source, dtype=np.float32), np.asarray(target, dtype=np.float32)
    distance = float(np.linalg.norm(source.mean(axis=0) - target.mean(axis=0)))
    return DomainGap(
        proxy_a_distance=proxy_a_distance(source, target, seed),
        mean_feature_distance=distance,
        tsne_plot=plot_tsne(source, target, title, plot_path, seed),
    )


def plot_tsne(source: np.ndarray, target: np.ndarray, title: str, path: Path, seed: int) -> Path:
    both = np.concatenate([source, target])
    perplexity = float(min(30, max(2, (len(both) - 1) // 3)))  # t-SNE needs perplexity < n
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(both)
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.scatter(*embedded[: len(source)].T, s=6, alpha=0.6, label=f"source (n={len(source)})")
    axes.scatter(*embedded[len(source) :].T, s=6, alpha=0.6, label=f"target (n={len(target)})")
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path
