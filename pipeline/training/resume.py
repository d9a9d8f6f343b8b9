"""``--resume``: continue a run only with the configuration it was trained with.

``last.pt`` records the run's configuration (:func:`run_config`); a resume compares it with the
current one and refuses on any difference, listing each. Two kinds of keys are exempt:

- where the run happens, not what it learns: ``train.device``, ``num_threads``, ``processes``, ``output_dir``
  (and ``resume`` itself): a run may resume on another number of processes (torchrun's included), since the data
  order and augmentation draws depend on the seed and the epoch only;
- ``train.epochs`` may be raised to train longer. The warm-up + cosine learning-rate schedule is
  then stretched to the new length, so the result differs from a run set to that many epochs from
  the start; the note returned says so.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from pipeline.config import PipelineConfig
from pipeline.data.prepare import PreparedDataset
from pipeline.errors import TrainingError

RUNTIME_KEYS = ("train.device", "train.num_threads", "train.processes", "train.output_dir", "train.resume")
EPOCHS = "train.epochs"


def run_config(cfg: PipelineConfig, prepared: PreparedDataset) -> dict[str, Any]:
    """What determines a training run, flat (``{"train.lr": 0.001, ...}``): saved in last.pt."""
    record: dict[str, Any] = {
        "seed": cfg.seed,
        "data.image_size": int(prepared.images.shape[-1]),
        "data.prepared_key": prepared.key,  # content hash of the train/val images, labels and splits
    }
    for section in ("train", "augment"):
        for key, value in getattr(cfg, section).model_dump(mode="json").items():
            record[f"{section}.{key}"] = value
    for key in RUNTIME_KEYS:
        del record[key]
    return record


def load_for_resume(path: Path, expected: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint at ``path`` (on the CPU) and notes for the user; TrainingError if it cannot be resumed."""
    if not path.is_file():
        raise TrainingError(f"--resume: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise TrainingError(f"--resume: {path} is truncated or corrupt ({exc}); train anew without --resume") from exc
    recorded = checkpoint.get("run_config") if isinstance(checkpoint, dict) else None
    if recorded is None:
        raise TrainingError(
            f"--resume: {path} records no training configuration (not a training checkpoint, or written before "
            "resume checked it), so it cannot be matched with this one; train anew without --resume"
        )
    differences = [
        f"{key}: checkpoint {recorded.get(key, '(not recorded)')!r}, config {expected.get(key, '(not set)')!r}"
        for key in sorted(set(recorded) | set(expected))
        if key != EPOCHS and recorded.get(key) != expected.get(key)
    ]
    if expected[EPOCHS] < recorded[EPOCHS]:
        differences.append(f"{EPOCHS}: checkpoint {recorded[EPOCHS]}, config {expected[EPOCHS]} (may only be raised)")
    if differences:
        raise TrainingError(
            f"--resume: {path} was trained with another configuration:\n  "
            + "\n  ".join(differences)
            + "\nResume with the checkpoint's values, or train anew without --resume."
        )
    return checkpoint, _notes(path, checkpoint["state"], recorded[EPOCHS], expected[EPOCHS])


def _notes(path: Path, state: dict[str, Any], epochs_before: int, epochs: int) -> list[str]:
    done = state["epoch"]
    notes = []
    if epochs > epochs_before:
        notes.append(
            f"{EPOCHS} raised from {epochs_before} to {epochs}: training continues after epoch {done} with the "
            f"learning-rate schedule stretched to {epochs} epochs (not the same as a run set to {epochs} from the "
            "start)"
        )
    if state["should_stop"]:
        best = state["best_epoch"]
        notes.append(f"{path} stopped early at epoch {done} (no val AUC gain since {best}): nothing left to train")
    elif done >= epochs:
        notes.append(f"{path} already holds {done} of {epochs} epochs: nothing left to train; raise {EPOCHS} for more")
    return notes
