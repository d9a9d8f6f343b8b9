"""A temporary Prefect API server for one ``crosssim run`` that never outlives the run.

Prefect's own ephemeral server (``SubprocessASGIServer``) is stopped by an ``atexit`` hook, which
does not run when the process is killed (SIGKILL) or ends on Prefect's re-raised SIGTERM: its
uvicorn process was left behind, holding a port and the state database. This starts the same app
with the same settings, but the child asks the kernel for a SIGTERM the moment its parent dies
(``PR_SET_PDEATHSIG``, Linux), however the parent dies. Elsewhere only the orderly stop applies.

Prefect sends log records and events to the API from background workers (``APILogWorker``, ``EventsWorker``) that
batch them and are otherwise drained only at interpreter exit: by then this server is gone, their last batches fail
("--- Error logging to API --- All connection attempts failed") and are lost. So they are drained while the server is
still up, as ``prefect_test_harness`` does before it stops its own, and only then is the server stopped.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import httpx
import prefect
from filelock import FileLock
from filelock import Timeout as FileLockTimeout
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
    temporary_settings,
)
from prefect.utilities.asyncutils import run_coro_as_sync

from pipeline.errors import PipelineError

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_DRAIN_TIMEOUT_S = 30.0  # per worker kind; a server that stopped answering must not hold up the stop for long


class OrchestrationError(PipelineError):
    """Prefect's temporary API server did not start; nothing was run."""

    exit_code = 7


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(port: int) -> subprocess.Popen:
    # The command and settings of Prefect's SubprocessASGIServer: the API without the UI, its database in PREFECT_HOME.
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
        "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent(os.getpid()))  # noqa: PLW1509


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _drain_prefect_workers(timeout: float = _DRAIN_TIMEOUT_S) -> None:
    """Send every queued log record, then every queued event, to the API and stop their workers (Prefect's calls)."""

    async def drain() -> None:
        for worker in (APILogWorker, EventsWorker):  # logs first: the flow run's last lines matter most
            result = worker.drain_all(timeout=timeout)  # awaitable here, in an event loop
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())


def _wait_until_healthy(process: subprocess.Popen, api_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            status = process.poll()
            if status is not None:
                raise OrchestrationError(
                    f"Prefect's temporary API server exited with status {status} (its error is printed above); "
                    f"nothing was run. Its state database is in PREFECT_HOME={PREFECT_HOME.value()}."
                )
            try:
                if client.get(f"{api_url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise OrchestrationError(
        f"Prefect's temporary API server did not answer within {timeout:g} s (a busy machine starts it slowly); "
        "nothing was run. Set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher (make run uses 120), or "
        "start a server (`prefect server start`) and set PREFECT_API_URL to it."
    )


@contextmanager
def temporary_server() -> Iterator[str]:
    """Run a Prefect API server on a free loopback port for the block; yields its API URL, set as PREFECT_API_URL."""
    home = PREFECT_HOME.value()
    home.mkdir(parents=True, exist_ok=True)  # its SQLite database lives there
    timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    # Servers of concurrent runs share PREFECT_HOME's database, whose schema each one migrates as it starts: two
    # migrations at once collide ("duplicate column"), so servers start one at a time (the lock goes once healthy).
    try:
        with FileLock(home / ".crosssim-server-start.lock", timeout=2 * timeout):
            port = _free_port()  # chosen once the lock is held: a port picked before the wait may be taken by then
            api_url = f"http://127.0.0.1:{port}/api"
            process = _start(port)
            try:
                _wait_until_healthy(process, api_url, timeout)
            except BaseException:
                _stop(process)
                raise
    except FileLockTimeout as exc:
        raise OrchestrationError(
            f"another run's Prefect server has been starting for over {2 * timeout:g} s (PREFECT_HOME={home}); "
            "nothing was run"
        ) from exc
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            try:
                yield api_url
            finally:
                _drain_prefect_workers()  # while the server still answers
        # The settings that point at it are gone with the block, so later records do not go to a dead server.
    finally:
        _stop(process)
