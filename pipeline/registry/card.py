"""The model card attached to every registered version (its description, and a run artifact).

Sections follow Mitchell et al. 2019, "Model Cards for Model Reporting", cut to what this
pipeline knows for certain: intended use and limits, data, per-site and subgroup metrics with
95% CIs, calibration, CrossSim diagnostics, configuration and lineage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the export needs torch and ONNX Runtime; reviewing and deciding do not
    from pipeline.crosssim.diagnostics import DomainShift
    from pipeline.evaluation import ScoredModel
    from pipeline.serving.export import LoggedBundle

INTENDED_USE = (
    "Decision support for radiologists: the probability that a frontal chest X-ray shows pneumonia, "
    "for triage and second reading. Not a diagnosis and not for use without a clinician's review."
)
LIMITS = [
    "Trained on the sites listed under Data only; performance elsewhere is unknown until measured there.",
    "Paediatric source images (Kermany) and adult target images (NIH) differ: check the per-site rows, not an average.",
    "NIH labels were mined from radiology reports and are noisy; metrics on them carry that noise.",
    "Inputs must be prepared like the training images (grayscale, resized to the model's input size).",
]


CARD_METRICS = ("auc", "sensitivity", "specificity", "ece")


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states; gathered by the flow from the run it registers."""

    name: str
    version: str
    model: str  # what the registered network is, e.g. "CrossSim-adapted resnet18, 64×64"
    lineage: dict[str, str]  # data versions, git commit, flow run, MLflow run, parent models
    data: dict[str, dict[str, Any]]  # site → {"version": md5, "images": n, ...}
    scored: ScoredModel  # the registered model's threshold and its evaluation on every held-out set
    config: dict[str, Any]
    crosssim: DomainShift | None = None  # domain gap before/after
    gate: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    serving: list[LoggedBundle] | None = None  # the deployable artifacts; None: export switched off


def model_card(facts: CardFacts) -> str:
    from pipeline.evaluation import metrics_table_markdown  # imports torch: only cards need it, not review notes

    lines = [
        f"# Model card: {facts.name} v{facts.version}",
        "",
        f"**Model**: {facts.model}",
        "",
        "## Intended use",
        INTENDED_USE,
        "",
        "## Limits",
        *(f"- {limit}" for limit in [*LIMITS, *facts.notes]),
        "",
        "## Data",
        "| site | data version (DVC md5) | images |",
        "|---|---|---|",
        *(f"| {site} | `{info.get('version', '?')}` | {info.get('images', '?')} |" for site, info in facts.data.items()),
        "",
        f"## Metrics (threshold {facts.scored.threshold:.4f}, chosen on {facts.scored.threshold_chosen_on}; 95% bootstrap CI)",
        metrics_table_markdown(facts.scored.sets, CARD_METRICS),
    ]
    lines += ["", "### Subgroups (at the same threshold)", "| set | grouping | group | n | AUC | sensitivity | specificity |"]
    lines.append("|---|---|---|---|---|---|---|")
    for name, result in facts.scored.sets.items():
        for grouping, groups in result.subgroups.items():
            for group, metrics in groups.items():
                if "note" in metrics:
                    lines.append(f"| {name} | {grouping} | {group} | {metrics['n']} | {metrics['note']} | | |")
                else:
                    lines.append(
                        f"| {name} | {grouping} | {group} | {metrics['n']} | {metrics['auc']:.3f} | "
                        f"{metrics['sensitivity']:.3f} | {metrics['specificity']:.3f} |"
                    )
    lines += ["", "## Calibration", "Expected calibration error (ECE, L1, equal-width bins) per set is in the metrics table; "
              "reliability diagrams are in the run's `eval/` artifacts."]
    if facts.crosssim is not None:
        before, after = facts.crosssim.before, facts.crosssim.after
        lines += [
            "",
            "## CrossSim diagnostics",
            f"- Proxy A-distance source↔target features: {before.proxy_a_distance:.3f} before, {after.proxy_a_distance:.3f} after",
            f"- Mean-feature distance: {before.mean_feature_distance:.3f} before, {after.mean_feature_distance:.3f} after",
        ]
    if facts.gate is not None:
        lines += ["", f"## Promotion gate (vs {facts.gate['compared_with']}): {'passed' if facts.gate['passed'] else 'failed'}"]
        lines += ["| set | metric | challenger | champion | required |", "|---|---|---|---|---|"]
        for row in facts.gate["rows"]:
            champion = "—" if row["champion"] is None else f"{row['champion']:.4f}"
            lines.append(f"| {row['set']} | {row['metric']} | {row['challenger']:.4f} | {champion} | ≥ {row['threshold']:.4f} |")
    lines += _deployable_artifacts(facts.serving)
    lines += ["", "## Lineage", *(f"- {key}: `{value}`" for key, value in facts.lineage.items())]
    lines += ["", "## Training configuration", "```json", json.dumps(facts.config, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _deployable_artifacts(bundles: list[LoggedBundle] | None) -> list[str]:
    """The card section on the serving bundles: files, hashes, the checks they passed, and what is missing and why."""
    lines = ["", "## Deployable artifacts"]
    if bundles is None:
        return [*lines, "None built: `serve.export.enabled` is false, so this version cannot be served by `crosssim serve`."]
    lines.append(
        "ONNX Runtime bundles (`serving.json` + ONNX files) that `crosssim serve` loads without `params.yaml`: input "
        "(B, 1, S, S) grayscale pixels in [0, 1], normalisation inside the graph, output P(pneumonia)."
    )
    for logged in bundles:
        bundle = logged.bundle
        lines += [
            "",
            f"### {logged.name}: `{logged.artifact_uri}`",
            f"{bundle.backbone}, input {bundle.preprocessing.describe()}, decision threshold "
            f"{bundle.threshold:.4f} (chosen on {bundle.threshold_chosen_on})",
            "",
            "| precision | file | SHA-256 | checks |",
            "|---|---|---|---|",
        ]
        for precision, info in bundle.artifacts.items():
            checks = _checks(precision, info.checks)
            lines.append(f"| {precision.upper()} | `{info.file}` | `{info.sha256}` | {checks} |")
        lines += [f"- Missing: {note}" for note in bundle.notes]
    return lines


def _checks(precision: str, checks: dict[str, float]) -> str:
    if precision == "fp32":
        return f"max \\|Δp\\| vs PyTorch {checks['max_abs_diff']:.2g} on {checks['golden_images']:.0f} golden images"
    sets = [key.removeprefix("auc.") for key in checks if key.startswith("auc.")]
    deltas = [f"{name} {checks[f'auc.{name}']:.4f} (Δ {checks[f'auc_delta.{name}']:+.4f})" for name in sets]
    return "AUC vs PyTorch: " + "; ".join(deltas)


DESCRIPTION_LIMIT = 5000  # characters: MLflow's SQL stores keep a version's description in a VARCHAR(5000)
FULL_CARD = "registry/model_card.md"  # the whole card, an artifact of the version's run


def fit_description(text: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """``text`` within ``limit`` characters for the registry: its largest ``## `` sections (the training
    configuration first, as a rule) are replaced by a pointer to the full card until it fits. Every heading, the
    title and later notes (a gate override's) stay; a text that fits is returned as it is."""
    head, *sections = text.split("\n## ")
    sections = [f"## {section}" for section in sections]
    while len(text) > limit and sections:
        largest = max(range(len(sections)), key=lambda index: len(sections[index]))
        title = sections[largest].split("\n", 1)[0]
        shortened = f"{title}\n(left out here for the registry's {limit}-character limit: see `{FULL_CARD}`)\n"
        if len(shortened) >= len(sections[largest]):
            break  # nothing left to gain by shortening sections
        sections[largest] = shortened
        text = "\n".join([head, *sections])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def gate_override_note(reviewer: str, reason: str, failures: list[str], audit_artifact: str) -> str:
    """The card section saying that a reviewer promoted this version although the promotion gate rejected it."""
    return "\n".join(
        [
            "## Review: approved against the promotion gate (override)",
            f"{reviewer} made this version champion although the promotion gate rejected it on:",
            *(f"- {failure}" for failure in failures),
            "",
            f"Reason given: {reason}",
            "",
            f"Audit entry: `{audit_artifact}`",
            "",
        ]
    )


def rollout_evidence_note(rollout_id: str, actor: str, reasons: str, analysis: str, audit_artifact: str) -> str:
    """The card section saying which rollout admitted this version and where its evidence is."""
    return "\n".join(
        [
            f"## Admitted by rollout {rollout_id}",
            f'Promoted by {actor} at the end of its rollout (decision rule: README "Rollouts"); reason:',
            "",
            f"{reasons}",
            "",
            f"Analysis (decision, bounds, per-site metrics, HTML report): {analysis}",
            "",
            f"Audit entry: `{audit_artifact}`",
            "",
        ]
    )
