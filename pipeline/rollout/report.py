"""A rollout analysis as one self-contained HTML page a reviewer would rather look at than read: the decision and
why, the challenger's Brier gain over the labelled cases with its always-valid bounds, both models' ROC per site
on the same cases, the site's learning curve when the challenger is a loop version, and the per-site tables. Figures are inline SVG (no external file, script or font)."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from pipeline.loop.curve import LearningPoint  # noqa: E402
from pipeline.rollout.analysis import MODELS, RolloutAnalysis, brier_gain  # noqa: E402
from pipeline.rollout.monitor import DriftCheck  # noqa: E402

_COLOURS = {"champion": "#1f77b4", "challenger": "#d62728"}
_DECISION_COLOURS = {"promote": "#2ca02c", "rollback": "#d62728", "continue": "#7f7f7f"}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
.decision { display: inline-block; padding: .3rem .8rem; border-radius: .4rem; color: white; font-weight: 600; }
table { border-collapse: collapse; margin: 1rem 0; } td, th { border: 1px solid #ccc; padding: .3rem .6rem; }
th { background: #f3f3f3; } .figures { display: flex; flex-wrap: wrap; gap: 1rem; } figure { margin: 0; }
"""


def render_report(
    analysis: RolloutAnalysis, path: Path, drift: Sequence[DriftCheck] = (), curve: Sequence[LearningPoint] = ()
) -> Path:
    """Write the report of ``analysis`` (and the ``drift`` checks run with it) to ``path`` (HTML); ``curve``: the
    learning curve of the challenger's site when it is a loop version (pipeline.loop.curve)."""
    a = analysis
    colour = _DECISION_COLOURS[a.decision]
    reasons = "".join(f"<li>{html.escape(reason)}</li>" for reason in a.reasons)
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Rollout {a.rollout_id}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Rollout {html.escape(a.rollout_id)}: challenger v{a.challenger} vs champion v{a.champion}</h1>",
        f"<p>Mode {a.mode}; analysed {a.analysed_at:%Y-%m-%d %H:%M} UTC. {a.predictions} predictions "
        f"(answered by the champion {a.answered_by.get('champion', 0)}, the challenger {a.answered_by.get('challenger', 0)}), "
        f"{a.labelled} with a matured label, {a.pending} pending, {a.conflicts} with conflicting labels.</p>",
        f"<p><span class='decision' id='decision' style='background:{colour}'>{a.decision}</span></p><ul>{reasons}</ul>",
        "<div class='figures'>",
        f"<figure id='brier-gain'>{_gain_figure(a)}<figcaption>Brier gain of the challenger per case (running mean) "
        "and its always-valid bounds: promote above 0, roll back below.</figcaption></figure>",
        f"<figure id='roc'>{_roc_figure(a)}<figcaption>ROC of both models on the same labelled cases, per site."
        "</figcaption></figure>",
        *(
            [
                f"<figure id='learning-curve'>{_learning_figure(curve, a)}<figcaption>The site's learning curve: each loop "
                "version's AUC on the frozen evaluation sets, against the site's reads it learnt from (this challenger "
                "circled).</figcaption></figure>"
            ]
            if curve
            else []
        ),
        "</div>",
        _metrics_table(a),
        _sensitivity_table(a),
        _drift_table(drift),
        "</body></html>",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _svg(figure: plt.Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG sits inside HTML


def _gain_figure(a: RolloutAnalysis) -> str:
    figure, axes = plt.subplots(figsize=(6, 3.6))
    if a.labelled:
        n = np.arange(1, a.labelled + 1)
        gains = np.array([brier_gain(case) for case in a.cases])
        axes.plot(n, np.cumsum(gains) / n, color="#333", label="running mean")
        axes.fill_between(n, a.brier.low, a.brier.high, color="#999", alpha=0.35, label=f"{1 - a.brier.alpha:.1%} bounds")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set(xlabel="labelled cases", ylabel="Brier gain of the challenger", ylim=(-1, 1))
    axes.legend(loc="upper right")
    return _svg(figure)


def _learning_figure(curve: Sequence[LearningPoint], a: RolloutAnalysis) -> str:
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for set_name in sorted({name for point in curve for name in point.auc}):
        points = [(p.reads, p.auc[set_name], p.version) for p in curve if set_name in p.auc]
        axes.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o", label=set_name)
        axes.scatter([x for x, _, v in points if v == a.challenger], [y for _, y, v in points if v == a.challenger],
                     s=160, facecolors="none", edgecolors="black")  # fmt: skip
    axes.set(xlabel="site reads learnt from", ylabel="AUC", ylim=(0.4, 1))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return _svg(figure)


def _roc_figure(a: RolloutAnalysis) -> str:
    sites = sorted({case.site for case in a.cases}) or ["(no labelled case)"]
    figure, axes_row = plt.subplots(1, len(sites), figsize=(3.6 * len(sites), 3.6), squeeze=False)
    for axes, site in zip(axes_row[0], sites, strict=True):
        chosen = [case for case in a.cases if case.site == site]
        labels = np.array([case.label for case in chosen])
        if 0 < labels.sum() < labels.size:
            for model in MODELS:
                fpr, tpr, _ = roc_curve(labels, [case.probability(model) for case in chosen])
                axes.plot(fpr, tpr, color=_COLOURS[model], label=model)
            axes.legend(loc="lower right")
        axes.plot([0, 1], [0, 1], color="#bbb", linestyle="--", linewidth=0.8)
        axes.set(title=site, xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1))
    return _svg(figure)


def _metrics_table(a: RolloutAnalysis) -> str:
    def cell(value: float, interval: tuple[float, float] | None) -> str:
        shown = "—" if np.isnan(value) else f"{value:.3f}"
        return shown + (f" <small>[{interval[0]:.3f}, {interval[1]:.3f}]</small>" if interval else "")

    rows = "".join(
        f"<tr><td>{m.model}</td><td>{html.escape(m.site)}</td><td>{m.n} ({m.n_pos})</td>"
        f"<td>{cell(m.auc, m.ci.get('auc'))}</td><td>{cell(m.sensitivity, m.ci.get('sensitivity'))}</td>"
        f"<td>{cell(m.specificity, m.ci.get('specificity'))}</td><td>{m.ece:.3f}</td></tr>"
        for m in a.metrics
    )
    return (
        "<h2>Per model and site</h2><table id='per-site'><tr><th>model</th><th>site</th><th>cases (pneumonia)</th>"
        "<th>AUC [95% CI]</th><th>sensitivity</th><th>specificity</th><th>ECE</th></tr>" + rows + "</table>"
    )


def _sensitivity_table(a: RolloutAnalysis) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(s.site)}</td><td>{s.positives}</td><td>{s.specificity:.3f}</td>"
        f"<td>{s.challenger_threshold:.4f}</td><td>[{s.low:+.3f}, {s.high:+.3f}]</td><td>{s.verdict}</td></tr>"
        for s in a.sensitivity
    )
    return (
        "<h2>Sensitivity guardrail (challenger − champion at the champion's specificity, paired, always-valid bounds)"
        "</h2><table id='guardrail'><tr><th>site</th><th>labelled pneumonia</th><th>champion's specificity</th>"
        "<th>challenger read at</th><th>bounds</th><th>verdict</th></tr>" + rows + "</table>"
    )


def _drift_table(drift: Sequence[DriftCheck]) -> str:
    if not drift:
        return "<h2>Drift</h2><p id='drift'>No check: too few served images per site, or no drift reference.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(c.site)}</td><td>{c.model} v{c.version}</td><td>{c.window} ({c.images} images)</td>"
        f"<td>{'—' if c.input is None else f'{c.input.p_value:.4f}'}</td><td>{c.output.p_value:.3g}</td>"
        f"<td>{c.estimated.auc:.3f}</td><td>{'<b>ALARM</b>' if c.alarm else 'ok'}</td></tr>"
        for c in drift
    )
    return (
        "<h2>Drift (label-free, latest served images)</h2><table id='drift'><tr><th>site</th><th>model</th>"
        "<th>window</th><th>input drift p (MMD)</th><th>output drift p (KS)</th><th>estimated AUC</th><th></th></tr>"
        + rows + "</table>"
    )
