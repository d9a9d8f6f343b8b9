"""What attaches to the adaptation/distillation loops: model selection, divergence, logging, progress."""

from __future__ import annotations

import copy
import math
from typing import Any

from rich.console import Console

from pipeline.training.progress import LoopProgressBase

LOG_EVERY = 10  # steps between history rows / tracker points


class ModelSelector:
    """Keeps the weights chosen by CrossSim's selection rule, which never looks at target-test.

    Rule, applied at every evaluation after step 0:

    Without target labels:

    1. *Gate*: source-val AUC must stay within ``tolerance`` of the starting model's (step 0).
       Alignment that buys target confidence by forgetting the source task is rejected.
    2. Then the lowest mean prediction entropy on target-train images (the model most decided
       about the target, Morerio et al. 2018's minimal-entropy criterion).
    3. If no evaluation passes the gate, the one with the highest source-val AUC.

    With labelled target images (``target_labelled_auc`` present) those labels are the direct
    evidence, and a model may give up pediatric cues that do not hold at the target: no gate,
    the highest labelled-target AUC, ties (these rows were trained on, so it saturates) broken
    by the lowest target-train entropy.
    """

    def __init__(self, tolerance: float, reference_auc: float | None = None) -> None:
        """``reference_auc`` fixes the gate (a student starts random: its step 0 is no reference)."""
        self.tolerance = tolerance
        self.fixed_reference = reference_auc is not None
        self.reference_auc = math.nan if reference_auc is None else reference_auc
        self.best_state: dict[str, Any] | None = None
        self.best: dict[str, float] | None = None
        self._best_key: tuple[float, ...] | None = None

    def on_evaluate(self, loop) -> None:
        result = loop.state.evaluation
        if result["step"] == 0:
            if not self.fixed_reference:
                self.reference_auc = result["source_val_auc"]
            return
        key = self._key(result)
        if self._best_key is None or key > self._best_key:
            self._best_key, self.best = key, dict(result)
            self.best_state = copy.deepcopy(loop.model.state_dict())

    def _key(self, result: dict[str, float]) -> tuple[float, ...]:
        if "target_labelled_auc" in result:
            return (1.0, result["target_labelled_auc"], -result["target_entropy"])
        passes = result["source_val_auc"] >= self.reference_auc - self.tolerance
        if not passes:
            return (0.0, result["source_val_auc"])
        return (1.0, -result["target_entropy"])

    @property
    def rule(self) -> str:
        return (
            "with target labels: max labelled-target AUC, then min target-train prediction entropy; without: "
            f"source-val AUC ≥ {self.reference_auc:.4f} − {self.tolerance}, then min target-train prediction "
            "entropy; never target-test"
        )

    def restore_best(self, loop) -> None:
        if self.best_state is not None:
            loop.model.load_state_dict(self.best_state)


class DivergenceDetector:
    """Stops the loop when the discriminator collapses: accuracy ≥ ``high`` or ≤ ``low`` over whole
    evaluation windows, ``patience`` windows in a row (non-finite losses are caught by the loop itself).

    A discriminator that always wins means the features are not being aligned at all; one that is
    always wrong means the feature extractor found a degenerate way to fool it.
    """

    def __init__(self, patience: int, high: float = 0.99, low: float = 0.01) -> None:
        self.patience = patience
        self.high = high
        self.low = low
        self._window: list[float] = []
        self._strikes = 0

    def on_step_end(self, loop) -> None:
        if not math.isnan(loop.state.domain_accuracy):
            self._window.append(loop.state.domain_accuracy)

    def on_evaluate(self, loop) -> None:
        if not self._window:
            return
        mean = sum(self._window) / len(self._window)
        self._window.clear()
        collapsed = mean >= self.high or mean <= self.low
        self._strikes = self._strikes + 1 if collapsed else 0
        if self._strikes >= self.patience:
            loop.state.stop_reason = (
                f"discriminator collapse: its accuracy averaged {mean:.3f} over the last window and stayed outside "
                f"[{self.low}, {self.high}] for {self._strikes} evaluations in a row (up to step {loop.state.step})"
            )


class HistoryRecorder:
    """Losses and discriminator accuracy every ``LOG_EVERY`` steps, evaluations always; to a tracker too."""

    def __init__(self, prefix: str, tracker=None) -> None:
        self.prefix = prefix
        self.tracker = tracker

    def on_step_end(self, loop) -> None:
        if loop.state.step % LOG_EVERY and loop.state.stop_reason is None:
            return
        row = {f"loss.{name}": value for name, value in loop.state.losses.items()}
        if not math.isnan(loop.state.domain_accuracy):
            row["domain_accuracy"] = loop.state.domain_accuracy
        self._record(loop, row)

    def on_evaluate(self, loop) -> None:
        row = {f"eval.{name}": value for name, value in loop.state.evaluation.items() if name != "step"}
        self._record(loop, row | {"images_per_second": loop.state.images_per_second})

    def _record(self, loop, row: dict[str, float]) -> None:
        loop.state.history.append({"step": float(loop.state.step), **row})
        if self.tracker is not None:
            finite = {f"{self.prefix}.{name}": value for name, value in row.items() if math.isfinite(value)}
            self.tracker.log_metrics(finite, step=loop.state.step)


class LoopProgress(LoopProgressBase):
    """A CrossSim loop's progress: steps, the last total loss and discriminator accuracy; one line per tenth of the
    loop without a terminal."""

    shown = "loss {task.fields[loss]:.4f}  D acc {task.fields[acc]:.2f}"

    def __init__(self, description: str, enabled: bool = True, console: Console | None = None) -> None:
        super().__init__(enabled, console)
        self.description = description
        self.label = f"[bold]{description}"

    def extent(self, loop) -> tuple[int, int]:
        return loop.steps, 0

    def fields(self, loop) -> dict[str, Any]:
        return {"loss": loop.state.losses.get("total", math.nan), "acc": loop.state.domain_accuracy}

    def line(self, loop, event: str) -> str | None:
        if event != "step_end" or loop.state.step % max(1, loop.steps // 10):
            return None
        accuracy = loop.state.domain_accuracy  # nan in the loops without a discriminator
        shown = f"  D acc {accuracy:.2f}" if math.isfinite(accuracy) else ""
        loss = loop.state.losses.get("total", math.nan)
        return f"{self.description}: step {loop.state.step}/{loop.steps}  loss {loss:.4f}{shown}"
