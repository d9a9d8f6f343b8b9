"""``crosssim rollout …``: the challenger against the champion on live traffic — start, status, ramp, decide."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from flows.cli.options import ConfigOption, NameOption, ReasonOption, ReviewerOption, SetOption, console, read_config

if TYPE_CHECKING:
    from pipeline.rollout.actions import RolloutActions

rollout_app = typer.Typer(help="A/B rollouts: shadow, canary, promote or roll back on outcomes.", no_args_is_help=True)


def _rollouts(config, set_, name: str | None) -> RolloutActions:
    from pipeline.rollout.actions import rollout_actions

    return rollout_actions(read_config(config, set_), name)


@rollout_app.command()
def start(
    reviewer: ReviewerOption,
    reason: ReasonOption,
    mode: Annotated[str, typer.Option("--mode", help="shadow (challenger scores, champion answers) or canary.")] = "shadow",
    config: ConfigOption = None,
    set_: SetOption = None,
    name: NameOption = None,
) -> None:
    """Start a rollout of the pending challenger against the champion (shadow by default)."""
    rollout = _rollouts(config, set_, name).start(mode, reviewer, reason)  # type: ignore[arg-type]
    console.print(f"started {rollout.describe()} (policy {rollout.policy})")


@rollout_app.command()
def status(config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """The running rollout and, per site, its patients per arm with the sample-ratio check."""
    from pipeline.rollout.assignment import sample_ratio_check
    from pipeline.serving.ledger import opened_ledger

    cfg = read_config(config, set_)
    rollouts = _rollouts(config, set_, name)
    rollout = rollouts.active()
    if rollout is None:
        console.print(f"{rollouts.name}: no rollout is running")
        return
    with opened_ledger(cfg.serve, os.environ) as ledger:
        checks = sample_ratio_check(ledger, rollout.rollout_id)
    console.print(f"{rollout.describe()}; policy {rollout.policy}; started {rollout.started_at} by {rollout.started_by}")
    if rollout.recommendation:
        console.print(f"latest analysis ({rollout.recommended_at}): {rollout.recommendation}")
    table = Table(title="patients per arm (sample-ratio check: chi-square against the shares they were assigned under)")
    for column in ("site", "patients", "challenger", "expected", "p-value", "split"):
        table.add_column(column)
    for check in checks:
        p_value = "—" if check.p_value is None else f"{check.p_value:.3g}"
        split = "[red]MISMATCH[/]" if check.mismatch else "ok"
        table.add_row(check.site, str(check.patients), str(check.challenger), f"{check.expected_challenger:.1f}", p_value, split)
    console.print(table)


def _act(action: str, reviewer: str, reason: str, config, set_, name: str | None, **options: bool) -> None:
    rollouts = _rollouts(config, set_, name)
    result = getattr(rollouts, action)(reviewer, reason, **options)
    if hasattr(result, "describe"):
        console.print(f"{action}: {result.describe()}")
    else:
        aliases = ", ".join(f"{alias} → v{version}" for alias, version in sorted(result.aliases.items()))
        console.print(f"{action}: {rollouts.name} v{result.version}; rollout ended; aliases now {aliases or 'none'}")
        console.print(f"audit entry: {result.audit_artifact}")


@rollout_app.command()
def advance(reviewer: ReviewerOption, reason: ReasonOption, config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """Shadow → canary at the schedule's first share, or the canary to its next share."""
    _act("advance", reviewer, reason, config, set_, name)


@rollout_app.command()
def pause(reviewer: ReviewerOption, reason: ReasonOption, config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """Canary → shadow: the challenger answers no patient any more."""
    _act("pause", reviewer, reason, config, set_, name)


@rollout_app.command()
def promote(
    reviewer: ReviewerOption,
    reason: ReasonOption,
    force: Annotated[bool, typer.Option("--force", help="Promote although no analysis recommends it (recorded).")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    name: NameOption = None,
) -> None:
    """The challenger becomes champion and the rollout ends."""
    _act("promote", reviewer, reason, config, set_, name, force=force)


@rollout_app.command()
def rollback(reviewer: ReviewerOption, reason: ReasonOption, config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """The challenger is rejected and the rollout ends."""
    _act("rollback", reviewer, reason, config, set_, name)


@rollout_app.command()
def stop(reviewer: ReviewerOption, reason: ReasonOption, config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """End the rollout without a decision (the challenger stays pending)."""
    _act("stop", reviewer, reason, config, set_, name)


@rollout_app.command()
def analyse(
    config: ConfigOption = None,
    set_: SetOption = None,
    name: NameOption = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write the HTML report here.")] = None,
) -> None:
    """Join the rollout's predictions with their matured outcomes and apply the decision rule; under
    rollout.policy auto a promote or roll back is carried out, under review it is recommended."""
    from pipeline.rollout.run import analyse as analyse_running

    cfg = read_config(config, set_)
    rollouts = _rollouts(config, set_, name)
    rollout = rollouts.running()
    analysis = analyse_running(cfg, rollout)
    if report is not None:
        from pipeline.rollout.report import render_report

        render_report(analysis, report)
    outcome = rollouts.act_on(analysis.decision, analysis.reasons, "rollout analysis")
    console.print(
        f"{rollout.describe()}: {analysis.predictions} predictions, {analysis.labelled} labelled (paired), "
        f"{analysis.pending} pending, {analysis.conflicts} with conflicting labels"
    )
    table = Table(title="per model and site, on the same labelled cases (95% bootstrap intervals)")
    for column in ("model", "site", "n (pneumonia)", "AUC", "sensitivity", "specificity", "ECE"):
        table.add_column(column)
    for m in analysis.metrics:
        shown = {key: f"{getattr(m, key):.3f}" + (" [{:.3f}, {:.3f}]".format(*m.ci[key]) if key in m.ci else "")
                 for key in ("auc", "sensitivity", "specificity")}  # fmt: skip
        table.add_row(m.model, m.site, f"{m.n} ({m.n_pos})", shown["auc"], shown["sensitivity"], shown["specificity"], f"{m.ece:.3f}")
    console.print(table)
    console.print(f"decision: [bold]{analysis.decision}[/] — " + "; ".join(analysis.reasons))
    if not hasattr(outcome, "describe"):
        console.print(f"carried out under policy auto: {outcome.action} of v{outcome.version}; audit entry {outcome.audit_artifact}")
