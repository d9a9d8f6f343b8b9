"""A simulated hospital for make bench-loop: real NIH patients served week by week, a worklist asking for reads
under a weekly budget, reads returning a delay later, warm-start retraining, shadow rollouts decided by the rollout's
own rule — the library's stage functions called in one process, no HTTP.

One week (``simulate``):
1. the week's studies are served by the champion (and, during a rollout, scored by the challenger in shadow);
2. the reads asked ``read_delay_weeks`` ago come back (labels, from the NIH CSV);
3. the rollout under way is analysed on its labelled cases — those of its own traffic, both models having scored
   them — with ``pipeline.rollout.analysis.decide_cases``: promote, roll back or continue;
4. the worklist (``pipeline.loop.selection.select``, the strategy under test) asks for ``budget`` reads among the
   served cases of the last ``loop.worklist_window_days`` that are neither labelled nor asked for, on the served
   probabilities and the drift monitor's image embeddings;
5. with new reads since the last retrain, ``pipeline.loop.retrain.warm_start_retrain`` makes a candidate from the
   champion on every read so far (no new read: skipped, and recorded so); with no rollout under way the newest
   candidate becomes the challenger and its shadow rollout starts next week. A rollout needs more labelled cases
   than one week brings (``make bench-rollout``: a truly better challenger took a median of 140), so candidates
   trained meanwhile wait, and the rollout slot takes the newest when it frees. Each week's candidate is scored on
   the held-out patients too: that is the learning curve of the strategy, whatever the rule has decided yet.
Truth is measured where the simulated hospital cannot look: every model's AUC on the fixed held-out patients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from pipeline.config import PipelineConfig
from pipeline.crosssim.engine import DomainData
from pipeline.evaluation import binary_metrics
from pipeline.evaluation.metrics import bootstrap_ci
from pipeline.loop.retrain import warm_start_retrain
from pipeline.loop.selection import select
from pipeline.models import Classifier
from pipeline.rollout.analysis import LabelledCase, decide_cases
from pipeline.rollout.drift import estimated_performance, image_embedding
from pipeline.training.inference import predict_proba

WRONG_PROMOTION_MARGIN = 0.02  # a promoted model this far below the old champion's held-out AUC was a wrong call
BOOTSTRAP = 500
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Hospital:
    """The replayed site: its patients' images in stream order is drawn per seed; labels are the simulator's."""

    site: str
    images: np.ndarray  # (N, S, S) uint8: the replayed patients' prepared images
    labels: np.ndarray  # their NIH labels (revealed only when a read comes back)
    patients: np.ndarray
    embeddings: np.ndarray  # the drift monitor's embedding of each image
    eval_images: np.ndarray  # the fixed held-out patients
    eval_labels: np.ndarray


@dataclass(frozen=True)
class LoopSettings:
    strategy: str
    seed: int
    weeks: int
    studies_per_week: int
    budget: int  # reads asked per week
    read_delay_weeks: int
    window_weeks: int  # loop.worklist_window_days in weeks


@dataclass
class Model:
    """A version as the simulation knows it: network, operating point, and its scores of every image (cached)."""

    version: int
    network: Classifier
    threshold: float
    trained_on: int  # site reads
    pool_scores: np.ndarray = field(repr=False)
    eval_scores: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, version: int, network: Classifier, threshold: float, trained_on: int, hospital: Hospital) -> Model:
        scores = [predict_proba(network, images, CPU).astype(np.float64) for images in (hospital.images, hospital.eval_images)]
        return cls(version, network, threshold, trained_on, *scores)

    def held_out(self, hospital: Hospital) -> dict:
        point = binary_metrics(hospital.eval_labels, self.eval_scores, self.threshold)
        low, high = bootstrap_ci(hospital.eval_labels, self.eval_scores, self.threshold, BOOTSTRAP)["auc"]
        return {"auc": point["auc"], "auc_low": low, "auc_high": high, "sensitivity": point["sensitivity"],
                "specificity": point["specificity"]}  # fmt: skip


@dataclass(frozen=True)
class Retrain:
    week: int
    labelled: int
    version: int
    held_out_auc: float
    seconds: float


@dataclass(frozen=True)
class Decision:
    week: int
    challenger: int
    champion: int
    decision: str  # promote | rollback
    labelled_cases: int
    challenger_auc: float
    champion_auc: float

    @property
    def wrong(self) -> bool:
        """A promotion is wrong when the promoted model is worse on the held-out patients by more than the margin."""
        return self.decision == "promote" and self.challenger_auc < self.champion_auc - WRONG_PROMOTION_MARGIN


@dataclass
class Simulation:
    settings: LoopSettings
    weeks: list[dict] = field(default_factory=list)
    retrains: list[Retrain] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)


def hospital_of(site: str, images: np.ndarray, rows: pd.DataFrame, eval_images: np.ndarray, eval_rows: pd.DataFrame) -> Hospital:
    return Hospital(
        site, np.asarray(images), rows["label"].to_numpy("int64"), rows["patient_id"].to_numpy(), image_embedding(np.asarray(images)),
        np.asarray(eval_images), eval_rows["label"].to_numpy("int64"),
    )  # fmt: skip


def stream_weeks(hospital: Hospital, settings: LoopSettings) -> list[np.ndarray]:
    """The replay order: patients shuffled by the seed (a patient's films stay together), cut into weeks."""
    rng = np.random.default_rng(settings.seed)
    patients = pd.unique(hospital.patients)
    order = np.concatenate([np.flatnonzero(hospital.patients == p) for p in rng.permutation(patients)])
    weeks = min(settings.weeks, len(order) // settings.studies_per_week)
    return [order[w * settings.studies_per_week : (w + 1) * settings.studies_per_week] for w in range(weeks)]


def simulate(hospital: Hospital, start: Model, settings: LoopSettings, cfg: PipelineConfig, log=print) -> Simulation:
    """The loop over ``settings.weeks`` weeks from the ``start`` champion (the module's text)."""
    result = Simulation(settings)
    champion, challenger, candidate = start, None, None
    rollout_cases: list[LabelledCase] = []
    served_week = np.full(len(hospital.images), -1)
    served_p = np.zeros(len(hospital.images))
    served_t = np.zeros(len(hospital.images))
    shadow_p = np.full(len(hospital.images), np.nan)
    shadow_t = np.full(len(hospital.images), np.nan)
    asked_week = np.full(len(hospital.images), -1)
    labelled = np.zeros(len(hospital.images), dtype=bool)
    labels_at_retrain, versions = 0, start.version
    for week, studies in enumerate(stream_weeks(hospital, settings)):
        started = time.perf_counter()
        served_week[studies], served_p[studies], served_t[studies] = week, champion.pool_scores[studies], champion.threshold
        if challenger is not None:
            shadow_p[studies], shadow_t[studies] = challenger.pool_scores[studies], challenger.threshold
        arrived = np.flatnonzero((asked_week >= 0) & (asked_week == week - settings.read_delay_weeks))
        labelled[arrived] = True
        decision, why = ("no rollout", "") if challenger is None else ("continue", "")
        if challenger is not None:
            for i in arrived[~np.isnan(shadow_p[arrived])]:  # its own traffic, scored by both
                rollout_cases.append(LabelledCase(str(i), pd.Timestamp(0).to_pydatetime(), hospital.site, "champion",
                                                  int(hospital.labels[i]), served_p[i], shadow_p[i], served_t[i], shadow_t[i]))  # fmt: skip
            verdict = decide_cases(rollout_cases, cfg.rollout)
            decision, why = verdict.decision, "; ".join(verdict.reasons)
            if decision != "continue":
                result.decisions.append(Decision(
                    week, challenger.version, champion.version, decision, len(rollout_cases),
                    challenger.held_out(hospital)["auc"], champion.held_out(hospital)["auc"],
                ))  # fmt: skip
                champion = challenger if decision == "promote" else champion
                challenger, rollout_cases = None, []
                if candidate is not None and decision == "promote":
                    candidate = None  # trained from the old champion: the new one is retrained below
                shadow_p[:], shadow_t[:] = np.nan, np.nan
        candidates = np.flatnonzero((served_week >= 0) & (served_week > week - settings.window_weeks) & (asked_week < 0))
        known = np.flatnonzero(asked_week >= 0)
        if len(candidates):
            picked = select(settings.strategy, settings.budget, served_p[candidates], served_t[candidates],  # type: ignore[arg-type]
                            hospital.embeddings[candidates], hospital.embeddings[known] if len(known) else None,
                            pool_factor=cfg.loop.hybrid_pool_factor, seed=settings.seed * 1000 + week).indices  # fmt: skip
            asked_week[candidates[picked]] = week
        one_class = len(set(hospital.labels[labelled])) < 2
        retrained = "skipped: no new reads" if labelled.sum() == labels_at_retrain else "skipped: reads of one class only"
        if labelled.sum() > labels_at_retrain and not one_class:
            reads = DomainData(f"{hospital.site} reads", hospital.images[labelled], hospital.labels[labelled])
            made = warm_start_retrain(champion.network, reads, cfg.loop, cfg.train, cfg.augment, settings.seed * 1000 + week)
            versions += 1
            candidate = Model.of(versions, made.model, made.threshold, int(labelled.sum()), hospital)
            labels_at_retrain = int(labelled.sum())
            result.retrains.append(Retrain(week, labels_at_retrain, versions, candidate.held_out(hospital)["auc"], made.seconds))
            retrained = f"v{versions} on {labels_at_retrain} reads ({made.seconds:.0f} s)"
        if challenger is None and candidate is not None and candidate.version > champion.version:
            challenger, candidate = candidate, None  # its shadow rollout starts with next week's studies
            retrained += f"; v{challenger.version} in shadow"
        this_week = served_week == week
        truth = binary_metrics(hospital.labels[this_week], served_p[this_week], champion.threshold)["auc"]
        result.weeks.append({
            "week": week, "labelled": int(labelled.sum()), "asked": int((asked_week >= 0).sum()), "arrived": int(len(arrived)),
            "champion": champion.version, **champion.held_out(hospital), "threshold": champion.threshold,
            "estimated_auc": estimated_performance(served_p[this_week], champion.threshold).auc, "served_week_auc": truth,
            "decision": decision, "why": why, "rollout_cases": len(rollout_cases), "retrain": retrained,
            "candidate_auc": result.retrains[-1].held_out_auc if result.retrains else start.held_out(hospital)["auc"], "cycle_seconds": time.perf_counter() - started,
        })  # fmt: skip
        row = result.weeks[-1]
        log(f"  {settings.strategy} seed {settings.seed} week {week}: {row['labelled']} reads, champion v{champion.version} "
            f"AUC {row['auc']:.3f}; {decision}; {retrained}")  # fmt: skip
    return result
