"""``crosssim``: the command line. Each command lives in a small module; this one puts them on one app.

    stages.py    validate, prepare, pretrain, train, evaluate, adapt, run
    services.py  ingest, serve-flows, deploy, serve
    registry.py  crosssim registry …      rollout.py  crosssim rollout …      feedback.py  crosssim feedback …
    loop.py      worklist, change-plan (the learning loop)
    options.py   the shared options, config reading and the one error handler
"""

from __future__ import annotations

import typer

from flows.cli import services, stages
from flows.cli.feedback import feedback_app
from flows.cli.loop import change_plan, worklist
from flows.cli.options import CleanErrors
from flows.cli.registry import registry_app
from flows.cli.rollout import rollout_app

app = typer.Typer(
    cls=CleanErrors, help="CrossSim: retrain and evaluate a chest X-ray pneumonia classifier.", no_args_is_help=True
)
for command in (stages.validate, stages.prepare, stages.pretrain, stages.train, stages.evaluate, stages.adapt, stages.run, services.ingest):
    app.command()(command)
app.command("serve-flows")(services.serve_flows)
app.command()(services.deploy)
app.command()(worklist)
app.command("change-plan")(change_plan)
app.command(epilog=services.serve_help())(services.serve)
app.add_typer(registry_app, name="registry")
app.add_typer(feedback_app, name="feedback")
app.add_typer(rollout_app, name="rollout")
