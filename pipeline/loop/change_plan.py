"""The change-control record of the learning loop, rendered from the configuration it runs with.

Its shape is the FDA's "predetermined change control plan" (PCCP; final guidance for AI-enabled device software
functions, December 2024): **the modifications** the loop may make by itself, the **modification protocol** (the
data it learns from and how, how a change is evaluated and accepted, how it is rolled out and rolled back), and
the **impact** boundary — what must go to a human because the plan does not cover it. Every figure in it is read
from ``PipelineConfig``, so the record cannot drift from what the loop does: change a knob and the plan changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import PipelineConfig


@dataclass(frozen=True)
class PlanItem:
    what: str
    rule: str  # the configured rule, with its values
    keys: tuple[str, ...]  # the configuration keys it is read from


@dataclass(frozen=True)
class ChangePlan:
    model_name: str
    automatic: bool  # rollout.policy auto: promotions and rollbacks need no reviewer
    modifications: tuple[PlanItem, ...]  # what the loop may change by itself
    data_protocol: tuple[PlanItem, ...]
    retraining_protocol: tuple[PlanItem, ...]
    acceptance: tuple[PlanItem, ...]  # the per-site gate and the sequential rule
    rollout_and_rollback: tuple[PlanItem, ...]
    needs_a_human: tuple[PlanItem, ...]


def change_plan(cfg: PipelineConfig) -> ChangePlan:
    """What the configured loop may change by itself, how, under which acceptance criteria, and what it may not."""
    loop, rollout, registry, train, data = cfg.loop, cfg.rollout, cfg.registry, cfg.train, cfg.data
    automatic = rollout.policy == "auto"
    decides = "the loop itself" if automatic else "a reviewer (the analysis only recommends)"
    return ChangePlan(
        registry.model_name,
        automatic,
        modifications=(
            PlanItem("Re-training of the weights", f"every weight of the registered {train.backbone} is re-estimated on the "
                     "site's labelled reads; architecture, input and preprocessing stay fixed", ("train.backbone",)),
            PlanItem("Operating threshold", "re-chosen from the site's labelled reads (Youden's J"
                     + (f", on the {loop.calibration_share:g} of them held out of fine-tuning, after temperature scaling"
                        if loop.calibration_share else "") + "); carried by the version's serving bundle",
                     ("loop.calibration_share",)),
        ),  # fmt: skip
        data_protocol=(
            PlanItem("When", f"one cycle per site ({', '.join(loop.sites)}) on cron {loop.cycle_cron!r} "
                     f"({cfg.schedule.timezone}): the deployment crosssim-continuous-learning/<site>",
                     ("loop.sites", "loop.cycle_cron", "schedule.timezone")),
            PlanItem("Which cases get labels", f"a read worklist, strategy {loop.worklist_strategy}, over cases served in "
                     f"the last {loop.worklist_window_days:g} days; a case is asked for once",
                     ("loop.worklist_strategy", "loop.worklist_window_days", "loop.hybrid_pool_factor")),
            PlanItem("Whose labels count", f"sources {', '.join(rollout.outcome_sources)} (precedence in that order), "
                     f"matured {rollout.maturity_hours:g} h after they were reported",
                     ("rollout.outcome_sources", "rollout.maturity_hours")),
            PlanItem("Data checks", f"exported reads go through ingest: de-identification, the validation suite "
                     f"(images ≥ {cfg.validation.min_side} px, class share ≥ {cfg.validation.min_class_share:g}), known "
                     f"patients {'accepted' if cfg.ingest.allow_known_patients else 'refused'}, an atomic DVC commit",
                     ("validation", "ingest.allow_known_patients")),
            PlanItem("Evaluation patients", "models are never selected on the patients that evaluate them: no checkpoint "
                     "selection; acceptance is judged on the rollout's own later traffic", ()),
        ),  # fmt: skip
        retraining_protocol=(
            PlanItem("Warm start", f"from the champion's weights, {loop.retrain_steps} steps at learning rate "
                     f"{loop.retrain_lr:g} (cosine), batch {train.batch_size}, the training augmentation; "
                     + (f"{loop.source_replay:g} source images replayed per read" if loop.source_replay else "site reads only"),
                     ("loop.retrain_steps", "loop.retrain_lr", "loop.source_replay", "train.batch_size", "augment")),
            PlanItem("Input", f"{data.image_size}×{data.image_size} grayscale, harmonisation {data.harmonisation}",
                     ("data.image_size", "data.harmonisation")),
        ),  # fmt: skip
        acceptance=(
            PlanItem("Registry gate, per site", f"no drop of AUC or of sensitivity at specificity {registry.specificity:g} "
                     f"by more than {registry.margin:g} against the champion; a first champion needs AUC ≥ "
                     f"{registry.floor_auc:g} and sensitivity ≥ {registry.floor_sensitivity:g} on every set",
                     ("registry.margin", "registry.specificity", "registry.floor_auc", "registry.floor_sensitivity")),
            PlanItem("Sequential rule on live outcomes", f"the challenger's Brier gain, an always-valid confidence sequence at "
                     f"α = {rollout.alpha:g}, above 0, and per site with ≥ {rollout.min_site_positives} pneumonia reads "
                     f"sensitivity at the champion's specificity no more than {rollout.sensitivity_margin:g} below; no "
                     f"decision before {rollout.min_labelled} labelled cases",
                     ("rollout.alpha", "rollout.min_labelled", "rollout.sensitivity_margin", "rollout.min_site_positives")),
        ),  # fmt: skip
        rollout_and_rollback=(
            PlanItem("Rollout", f"shadow first, then canary shares {', '.join(f'{s:g}' for s in rollout.canary_schedule)} "
                     "of patients (sticky per patient); decided by " + decides,
                     ("rollout.canary_schedule", "rollout.policy")),
            PlanItem("Rollback", "the rule's upper bound below 0, or a site's sensitivity inferior: the champion keeps (or "
                     f"takes back) all traffic; decided by {decides}; every move is an audited registry action",
                     ("rollout.policy",)),
            PlanItem("Drift", f"input (MMD) or output (KS) drift at p < {rollout.drift_alpha:g} over the last "
                     f"{rollout.drift_window} served images pauses the canary and raises an event",
                     ("rollout.drift_alpha", "rollout.drift_window")),
        ),  # fmt: skip
        needs_a_human=(
            *(() if automatic else (PlanItem("Every promotion and rollback", "rollout.policy is review", ("rollout.policy",)),)),
            PlanItem("A new architecture, input size or preprocessing", "outside the plan: a full `crosssim run` and a "
                     "reviewed registration", ("train.backbone", "data.image_size", "data.harmonisation")),
            PlanItem("A new site, or a new label definition or source", "outside the plan: configuration change and review",
                     ("serve.sites", "rollout.outcome_sources")),
            PlanItem("A challenger the registry gate rejected", "not rolled out; only a reviewer's audited "
                     "approval with --override-gate promotes it", ("registry.policy",)),
            PlanItem("A change to the acceptance criteria", "the gate's and the rule's values above are the plan", ("registry", "rollout")),
        ),  # fmt: skip
    )


def render_markdown(plan: ChangePlan) -> str:
    """The plan as a Markdown document (what ``crosssim change-plan`` prints)."""
    lines = [
        f"# Predetermined change control plan: {plan.model_name}",
        "",
        f"Promotions and rollbacks: **{'automatic (rollout.policy: auto)' if plan.automatic else 'by a reviewer (rollout.policy: review)'}**.",
    ]
    sections = (
        ("Modifications the loop may make", plan.modifications),
        ("Data protocol", plan.data_protocol),
        ("Re-training protocol", plan.retraining_protocol),
        ("Acceptance criteria", plan.acceptance),
        ("Rollout and rollback", plan.rollout_and_rollback),
        ("Needs a human", plan.needs_a_human),
    )
    for title, items in sections:
        lines += ["", f"## {title}", "", "| what | rule | configuration |", "|---|---|---|"]
        lines += [f"| {item.what} | {item.rule} | {', '.join(f'`{k}`' for k in item.keys) or '—'} |" for item in items]
    return "\n".join(lines) + "\n"
