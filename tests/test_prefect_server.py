"""The temporary Prefect server of `crosssim run`: every log line of the run reaches it before it stops, and nothing
is sent to it once it is gone (once "--- Error logging to API --- All connection attempts failed" ended `make run`)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a Prefect server: left out of make test-fast

REPO = Path(__file__).resolve().parents[1]
LINES = 200

# What `crosssim run` does: a flow (with a task) under the temporary server, its last lines logged just before it
# returns, then the summary printed once the server is stopped.
SCRIPT = f"""
import json, logging
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from flows.prefect_server import temporary_server

@task
def step():
    get_run_logger().info("task line")

@flow(log_prints=True)
def tiny():
    step()
    logger = get_run_logger()
    for i in range({LINES}):
        logger.info("flow line %d", i)
    print("printed last")
    return flow_run.id

with temporary_server() as api_url:
    run_id = tiny()
    logging.getLogger("prefect").info("after the flow, before the stop")
logging.getLogger("prefect").info("after the stop")
print(json.dumps({{"run_id": run_id, "api_url": api_url, "api_url_after": PREFECT_API_URL.value()}}))
"""


def test_every_log_line_reaches_the_server_before_it_stops(tmp_path: Path) -> None:
    home = tmp_path / "prefect"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        # Nothing is sent before the end: every line waits in the queue for the drain (without one, all are lost).
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "600",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Error logging to API" not in done.stderr, done.stderr
    assert "All connection attempts failed" not in done.stderr, done.stderr
    assert "Starting temporary server" not in done.stderr, done.stderr  # no Prefect ephemeral server either
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["api_url_after"] is None  # the settings no longer point at the stopped server

    with closing(sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro", uri=True)) as db:
        messages = [row[0] for row in db.execute("SELECT message FROM log WHERE flow_run_id = ?", (result["run_id"],))]
    flow_lines = {message for message in messages if message.startswith("flow line ")}
    assert flow_lines == {f"flow line {i}" for i in range(LINES)}
    assert "task line" in messages
    assert "printed last" in messages
    assert any(message.startswith("Finished in state Completed") for message in messages)  # the engine's last line
