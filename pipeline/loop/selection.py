"""Which unlabelled cases a radiologist's read would teach the model most: batch active-learning strategies.

Every strategy picks ``budget`` distinct candidates and returns them best first, with a score (higher: asked
first). Inputs are arrays over the candidates: the served probability ``p`` and the operating threshold ``t`` it
was judged at, and an embedding per case; ``labelled`` embeddings are the cases already labelled or asked for.

- ``random``: uniform without replacement, the baseline every active-learning paper reports against.
- ``uncertainty``: margin sampling at the operating point (Lewis & Gale, SIGIR 1994; Scheffer et al., 2001):
  the cases whose served decision is closest to flipping, ``score = −|logit p − logit t|``. At the threshold,
  not at 0.5: a model served at t = 0.11 is uncertain about the cases scored near 0.11, and under a domain shift
  its probabilities are far from calibrated, so the logit distance ranks them where 1 − max(p, 1 − p) saturates.
- ``diverse``: the core-set / k-center greedy batch (Sener & Savarese, ICLR 2018): repeatedly the candidate
  farthest from everything labelled, asked for or already picked, ``score`` = that distance. It covers the
  embedding space instead of asking for twenty near-copies of one ambiguous film.
- ``hybrid``: uncertainty first, then diversity among the uncertain (Zhdanov, "Diverse mini-batch active
  learning", 2019, with k-center in place of weighted k-means): the ``pool_factor × budget`` most uncertain
  candidates are the pool, k-center greedy picks the batch from it, so a batch is both informative and spread.

Embeddings are standardised per dimension over candidates and labelled cases together (Euclidean distance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np

from pipeline.config import WorklistStrategy

Strategy = WorklistStrategy
STRATEGIES: tuple[str, ...] = get_args(Strategy)
_EPS = 1e-6  # probabilities of 0 and 1 (a saturated sigmoid in float32) still get a finite logit


@dataclass(frozen=True)
class Selection:
    """Candidate indices best first, and each one's score under the strategy (higher: asked first)."""

    indices: np.ndarray
    scores: np.ndarray


def threshold_margin(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """|logit p − logit t|: how far each served decision is from flipping (0: on the threshold)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1 - _EPS)
    t = np.clip(np.asarray(thresholds, dtype=np.float64), _EPS, 1 - _EPS)
    return np.abs(np.log(p / (1 - p)) - np.log(t / (1 - t)))


def select(
    strategy: Strategy,
    budget: int,
    probabilities: np.ndarray,
    thresholds: np.ndarray,
    embeddings: np.ndarray,
    labelled: np.ndarray | None = None,
    *,
    pool_factor: float = 4.0,
    seed: int = 0,
) -> Selection:
    """The ``budget`` candidates ``strategy`` asks for (all of them when there are fewer), best first."""
    count = len(probabilities)
    if budget < 1:
        raise ValueError(f"budget {budget}: expected 1 or more")
    if not (len(thresholds) == count == len(embeddings)):
        raise ValueError("probabilities, thresholds and embeddings must have one row per candidate")
    budget = min(budget, count)
    if budget == 0:
        return Selection(np.zeros(0, dtype=np.int64), np.zeros(0))
    if strategy == "random":
        picked = np.random.default_rng(seed).permutation(count)[:budget]
        return Selection(picked, np.linspace(1.0, 0.0, budget, endpoint=False))
    margin = threshold_margin(probabilities, thresholds)
    if strategy == "uncertainty":
        order = np.argsort(margin, kind="stable")[:budget]
        return Selection(order, -margin[order])
    known = np.zeros((0, embeddings.shape[1])) if labelled is None else np.asarray(labelled, dtype=np.float64)
    features, known = _standardised(np.asarray(embeddings, dtype=np.float64), known)
    if strategy == "diverse":
        return _k_center(features, known, budget, np.arange(count))
    if strategy == "hybrid":
        pool = np.argsort(margin, kind="stable")[: max(budget, int(np.ceil(pool_factor * budget)))]
        return _k_center(features, known, budget, pool)
    raise ValueError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")


def _standardised(candidates: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pooled = np.concatenate([candidates, known]) if len(known) else candidates
    mean, scale = pooled.mean(axis=0), pooled.std(axis=0)
    scale[scale == 0] = 1.0  # a constant dimension carries no distance
    return (candidates - mean) / scale, (known - mean) / scale


def _k_center(features: np.ndarray, known: np.ndarray, budget: int, pool: np.ndarray) -> Selection:
    """Greedy k-center over ``pool``: each pick maximises the distance to its nearest labelled or picked case."""
    points = features[pool]
    if len(known):
        nearest = np.min(_distances(points, known), axis=1)
    else:  # nothing labelled yet: start from the case farthest from the pool's centre
        nearest = np.linalg.norm(points - points.mean(axis=0), axis=1)
    picked, scores = [], []
    for _ in range(budget):
        best = int(np.argmax(nearest))
        picked.append(best)
        scores.append(float(nearest[best]))
        nearest = np.minimum(nearest, np.linalg.norm(points - points[best], axis=1))
        nearest[picked] = -np.inf  # never twice, even among exact duplicates (distance 0)
    return Selection(pool[np.asarray(picked, dtype=np.int64)], np.asarray(scores))


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # ‖a−b‖² = ‖a‖² + ‖b‖² − 2ab, in blocks of b so thousands of labelled cases stay a few MB
    rows = []
    for start in range(0, len(b), 2048):
        block = b[start : start + 2048]
        squared = (a**2).sum(1)[:, None] + (block**2).sum(1)[None, :] - 2 * a @ block.T
        rows.append(np.sqrt(np.maximum(squared, 0)))
    return np.concatenate(rows, axis=1)
