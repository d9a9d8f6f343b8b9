"""Label-free early warning on real images: NIH adults served to a Kermany-built model are flagged within 50
images, windows from the model's own distribution are not; the confidence-based performance estimate matches
the realised metrics when probabilities are calibrated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.data.images import decode_image
from pipeline.data.preprocessing import Preprocessing
from pipeline.rollout.drift import estimated_performance, image_embedding, mmd_test, output_drift

SIZE = 64
ALPHA = 0.01
PERMUTATIONS = 300


def _inputs(paths: list[Path]) -> np.ndarray:
    """The served model's inputs: decoded and resized as training images are."""
    return np.stack([Preprocessing(SIZE).image(decode_image(path)) for path in paths])


def test_nih_adults_drift_from_a_kermany_reference_and_kermany_windows_do_not(data_dir: Path) -> None:
    rng = np.random.default_rng(0)
    kermany = sorted((data_dir / "kermany-pediatric" / "train").rglob("*.jpeg"))
    picked = rng.choice(len(kermany), 150 + 10 * 50, replace=False)
    reference = image_embedding(_inputs([kermany[i] for i in picked[:150]]))
    same = [image_embedding(_inputs([kermany[i] for i in picked[150 + 50 * w : 200 + 50 * w]])) for w in range(10)]
    nih = sorted((data_dir / "nih-cxr8" / "images").glob("*.png"))
    adults = [image_embedding(_inputs([nih[i] for i in rng.choice(len(nih), 50, replace=False)])) for _ in range(3)]

    flagged_same = [mmd_test(reference, window, PERMUTATIONS, seed=w).p_value < ALPHA for w, window in enumerate(same)]
    assert sum(flagged_same) <= 1  # α = 1% per window: 2 or more of 10 would happen by chance 0.4% of the time
    assert all(mmd_test(reference, window, PERMUTATIONS, seed=w).p_value < ALPHA for w, window in enumerate(adults))


def test_output_drift_and_the_confidence_based_estimate() -> None:
    rng = np.random.default_rng(1)
    probabilities = rng.beta(0.8, 0.8, 4000)
    labels = rng.random(4000) < probabilities  # calibrated by construction
    estimate = estimated_performance(probabilities, 0.5)
    flagged = probabilities >= 0.5
    assert estimate.auc == pytest.approx(roc_auc_score(labels, probabilities), abs=0.02)
    assert estimate.sensitivity == pytest.approx(flagged[labels].mean(), abs=0.02)
    assert estimate.specificity == pytest.approx((~flagged)[~labels].mean(), abs=0.02)
    assert output_drift(probabilities[:2000], probabilities[2000:]).p_value > ALPHA
    assert output_drift(probabilities[:2000], np.clip(probabilities[2000:] + 0.15, 0, 1)).p_value < ALPHA
    with pytest.raises(ValueError, match="multiple of"):
        image_embedding(np.zeros((2, 30, 30), np.uint8))
