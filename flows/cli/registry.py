"""``crosssim registry …``: what a reviewer runs — list, review, approve, reject, rollback, site-threshold, lineage,
audit."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from flows.cli.options import ConfigOption, NameOption, ReasonOption, ReviewerOption, SetOption, console, read_config

if TYPE_CHECKING:
    from pipeline.loop.thresholds import SiteThreshold
    from pipeline.registry.review import RegistryActions

# The registry modules import MLflow: each command imports them when it runs, so that `crosssim --help`
# and the stage commands (one process per DVC stage) do not pay for it. No command here imports torch
# (flows.promotion, pipeline.registry.gate): a table must not wait for a deep-learning framework. site-threshold
# alone does, inside the command: its bootstrap intervals are the evaluation's (torch).

registry_app = typer.Typer(help="Registered models: review the challenger, decide, roll back, trace.", no_args_is_help=True)
OverrideGateOption = Annotated[
    bool,
    typer.Option(
        "--override-gate",
        help="Approve a challenger the promotion gate rejected; --reason must say why (recorded as an override).",
    ),
]

SiteArgument = Annotated[str, typer.Argument(help="The site whose operating point is chosen (one of serve.sites).")]
VersionOption = Annotated[Optional[str], typer.Option("--version", help="Version number or alias (default: champion).")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show the threshold it would choose; change nothing.")]


@registry_app.callback()
def _quiet_artifact_downloads() -> None:
    """Reviews read gate and audit JSON artifacts: MLflow's per-file download bars would bury the tables."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _actions(config, set_, name: str | None) -> RegistryActions:
    from pipeline.registry.review import actions_for

    return actions_for(read_config(config, set_), name)


@registry_app.command("list")
def list_versions(config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """Every version with its aliases, review status and gate verdict."""
    actions = _actions(config, set_, name)
    aliases = actions.registry.aliases(actions.name)
    table = Table(title=f"{actions.name} ({actions.registry.tracking_uri})")
    for column in ("version", "aliases", "review", "gate", "kind", "MLflow run"):
        table.add_column(column)
    for version in actions.registry.versions(actions.name):
        held = ", ".join(alias for alias, v in aliases.items() if v == str(version.version))
        tags = version.tags
        review = tags.get("review.status", "") + (" (gate overridden)" if tags.get("review.override_gate") else "")
        table.add_row(
            str(version.version), held, review, tags.get("gate.recommendation", ""),
            tags.get("model_kind", ""), version.run_id or "",
        )  # fmt: skip
    console.print(table)


@registry_app.command()
def review(config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """The pending challenger beside the champion, per site, as the promotion gate measured them."""
    from pipeline.registry.store import CHALLENGER, CHAMPION, RegistryError

    actions = _actions(config, set_, name)
    challenger = actions.registry.find(actions.name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"{actions.name}: no pending challenger to review")
    gate = actions.gate_evidence(str(challenger.version))
    if gate is None:
        raise RegistryError(f"{actions.name} v{challenger.version}: the promotion gate has not run on it")
    table = Table(title=f"{actions.name} v{challenger.version} (challenger) vs {gate['compared_with']}")
    for column in ("set", "metric", "champion", "challenger", "required", "ok"):
        table.add_column(column)
    for row in gate["rows"]:
        champion = "—" if row["champion"] is None else f"{row['champion']:.4f}"
        ok = "[green]yes[/]" if row["passed"] else "[red]no[/]"
        table.add_row(row["set"], row["metric"], champion, f"{row['challenger']:.4f}", f"≥ {row['threshold']:.4f}", ok)
    console.print(table)
    recommendation = "promote" if gate["passed"] else "reject"
    console.print(f"gate recommendation: [bold]{recommendation}[/]")
    champion = actions.registry.find(actions.name, CHAMPION)
    for role, version in (("challenger", challenger), ("champion", champion)):
        if version is not None:
            console.print(
                f"{role} v{version.version}: run {actions.run_link(version.run_id)}; model card: "
                f"models:/{actions.name}/{version.version} (description) and the run's registry/model_card.md"
            )
    console.print("decide: crosssim registry approve|reject --reviewer NAME --reason TEXT")
    if not gate["passed"]:
        console.print("approving it against the gate needs --override-gate (recorded as an override)")


@registry_app.command()
def approve(
    reviewer: ReviewerOption,
    reason: ReasonOption,
    override_gate: OverrideGateOption = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    name: NameOption = None,
) -> None:
    """Promote the pending challenger to champion (one the promotion gate rejected only with --override-gate)."""
    _decide("approve", reviewer, reason, config, set_, name, override_gate=override_gate)


@registry_app.command()
def reject(reviewer: ReviewerOption, reason: ReasonOption, config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """Reject the pending challenger; the champion stays."""
    _decide("reject", reviewer, reason, config, set_, name)


@registry_app.command()
def rollback(reviewer: ReviewerOption, reason: ReasonOption, config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """Make the previous champion champion again."""
    _decide("rollback", reviewer, reason, config, set_, name)


def _decide(action: str, reviewer: str, reason: str, config, set_, name: str | None, **options: bool) -> None:
    actions = _actions(config, set_, name)
    decision = getattr(actions, action)(reviewer=reviewer, reason=reason, **options)
    aliases = ", ".join(f"{alias} → v{version}" for alias, version in sorted(decision.aliases.items()))
    overridden = " against the promotion gate (override recorded)" if options.get("override_gate") else ""
    console.print(f"{action}: {actions.name} v{decision.version}{overridden}; aliases now {aliases or 'none'}")
    console.print(f"audit entry: {decision.audit_artifact}")


@registry_app.command("site-threshold")
def site_threshold(
    site: SiteArgument,
    reviewer: ReviewerOption,
    reason: ReasonOption,
    version: VersionOption = None,
    dry_run: DryRunOption = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    name: NameOption = None,
) -> None:
    """Choose SITE's threshold on its matured reads (the highest reaching loop.site_sensitivity_target) and set it
    on the version (audited); servers answer SITE at it from their next alias check."""
    from pipeline.loop.thresholds import choose_site_threshold, operating_point
    from pipeline.registry.review import actions_for
    from pipeline.registry.store import CHAMPION
    from pipeline.serving.ledger import opened_ledger

    cfg = read_config(config, set_)
    actions = actions_for(cfg, name)
    number, current = operating_point(actions.registry, actions.name, version or CHAMPION, site)
    with opened_ledger(cfg.serve, os.environ) as ledger:
        chosen = choose_site_threshold(
            ledger, actions.name, number, site, current, cfg.loop, cfg.rollout, served_sites=cfg.served_sites()
        )
    console.print(_threshold_table(chosen))
    if dry_run:
        console.print("dry run: nothing changed")
        return
    decision = actions.set_site_threshold(chosen, reviewer, reason)
    console.print(f"site-threshold: {actions.name} v{decision.version} answers {site} at {chosen.threshold:.6g} "
                  "from each server's next alias check")  # fmt: skip
    console.print(f"audit entry: {decision.audit_artifact}")


def _threshold_table(chosen: SiteThreshold) -> Table:
    table = Table(title=f"{chosen.model} v{chosen.version} at {chosen.site}: sensitivity target {chosen.target_sensitivity:g}")
    for column in ("", "before", "chosen"):
        table.add_column(column)
    points = (chosen.before, chosen.chosen)
    table.add_row("threshold", *(f"{point.threshold:.6g}" for point in points))
    for metric in ("sensitivity", "specificity"):
        cells = ((getattr(point, metric), getattr(point, f"{metric}_ci")) for point in points)
        table.add_row(f"{metric} (95% CI)", *(f"{value:.3f} [{low:.3f}, {high:.3f}]" for value, (low, high) in cells))
    normals = chosen.reads - chosen.positives
    table.add_row("reads (pneumonia / normal)", f"{chosen.reads} ({chosen.positives} / {normals})", "same reads")
    return table


@registry_app.command()
def lineage(ref: Annotated[str, typer.Argument(help="NAME@ALIAS or NAME@VERSION")], config: ConfigOption = None, set_: SetOption = None) -> None:
    """Data versions, git commit, flow run, MLflow run and parent models of a registered version."""
    from pipeline.registry.store import RegistryError

    name, _, alias = ref.partition("@")
    if not name or not alias:
        raise RegistryError(f"{ref!r}: expected NAME@ALIAS or NAME@VERSION, e.g. crosssim-pneumonia@champion")
    actions = _actions(config, set_, name)
    version = actions.registry.version(name, alias)
    console.print(f"[bold]{name} v{version.version}[/] ({ref})")
    for key, value in actions.lineage(version).items():
        console.print(f"  {key}: {value}")


@registry_app.command()
def audit(config: ConfigOption = None, set_: SetOption = None, name: NameOption = None) -> None:
    """The audit trail of every registry decision, oldest first."""
    actions = _actions(config, set_, name)
    table = Table(title=f"{actions.name}: audit trail")
    for column in ("when (UTC)", "action", "version", "by", "reason", "aliases after"):
        table.add_column(column)
    for entry in actions.audit.entries():
        after = ", ".join(f"{a}→v{v}" for a, v in sorted(entry.aliases_after.items()))
        action = f"{entry.action} (gate overridden)" if entry.override_gate else entry.action
        table.add_row(entry.at, action, entry.version, entry.actor, entry.reason, after)
    console.print(table)
