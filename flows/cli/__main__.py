"""``python -m flows.cli …`` is ``crosssim …``."""

from flows.cli import app

app()
