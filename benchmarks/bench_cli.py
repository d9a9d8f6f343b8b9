"""How a benchmark run directly (``python benchmarks/X.py``, not through make) finds the datasets and fails.

The datasets are looked for as the Makefile looks for them: ``$CROSSSIM_DATA_DIR``, else the project's
``data/raw`` (DVC-tracked), else ``../shared/data`` beside the checkout. A ``PipelineError`` (datasets missing, a
bad ``--set``) ends the run with its first line and its exit code, not a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import DATA_DIR_ENV
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = (REPO / "data" / "raw", REPO.parent / "shared" / "data")


def run_benchmark(main: Callable[[], None]) -> None:
    """``main()`` with the datasets found (the environment variable set for it and the servers it starts)."""
    if not os.environ.get(DATA_DIR_ENV):
        found = next((path for path in DATA_CANDIDATES if path.is_dir()), None)
        if found is not None:
            os.environ[DATA_DIR_ENV] = str(found)
    # a SIGTERM (a kill, a CI timeout) unwinds like Ctrl-C: the servers a benchmark started are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except PipelineError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        where = os.environ.get(DATA_DIR_ENV) or " or ".join(str(path) for path in DATA_CANDIDATES)
        print(f"error: {first} (datasets looked for in {where}; set ${DATA_DIR_ENV})", file=sys.stderr)
        sys.exit(error.exit_code)
