"""A real, throwaway PostgreSQL server on loopback for tests (no mock): the ``postgres_server`` fixture.

Use it from a test file with::

    from tests.pg_fixture import PostgresServer, postgres_server  # noqa: F401  (pytest finds the fixture by name)

    def test_x(postgres_server: PostgresServer) -> None:
        engine_url = postgres_server.url          # postgresql+psycopg://postgres@127.0.0.1:<port>/postgres
        postgres_server.stop()                    # pg_ctl stop -m fast: connections are cut, new ones refused
        postgres_server.start()                   # same data, same port

Each test gets its own cluster (``initdb`` into a fresh folder under /tmp owned by the ``postgres`` user, trust
authentication, listening on 127.0.0.1 only at a free port), stopped and deleted afterwards. ``initdb`` and
``pg_ctl`` run as the ``postgres`` user (PostgreSQL refuses to run as root) through ``runuser``. The test is
skipped, with the reason, only when the server binaries or that user are missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.serving.ledger import PredictionLedger

SERVER_USER = "postgres"
START_TIMEOUT_S = 30


def find_postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (Debian layout first, then $PATH)."""
    versions = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if path.parent.name.isdigit()]
    for folder in sorted(versions, key=lambda path: int(path.parent.name), reverse=True):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path  # owned by the postgres user: data/, the socket folder, the server log
    port: int

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, database: str, driver: str = "psycopg") -> str:
        """SQLAlchemy URL of ``database`` (``driver`` asyncpg for Prefect's server)."""
        return f"postgresql+{driver}://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, database: str) -> str:
        """A new, empty database (as a team's DBA creates one per service); its psycopg URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SERVER_USER} dbname=postgres", autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{database}"')
        return self.database_url(database)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.log_file), "-o", options)

    def stop(self) -> None:
        self._pg_ctl("stop", "-w", "-m", "fast")

    def _pg_ctl(self, *args: str) -> None:
        _run_as_server_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args], self.root, self.log_file)


def _run_as_server_user(command: list[str], cwd: Path, log_file: Path | None = None) -> None:
    if os.geteuid() != pwd.getpwnam(SERVER_USER).pw_uid:
        command = ["runuser", "-u", SERVER_USER, "--", *command]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=START_TIMEOUT_S + 10)
    if result.returncode != 0:
        log = log_file.read_text()[-2000:] if log_file and log_file.is_file() else ""
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}\n{log}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A fresh cluster, started; stopped and deleted after the block (skips the test when it cannot run)."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    try:
        user = pwd.getpwnam(SERVER_USER)
    except KeyError:
        pytest.skip(f"no {SERVER_USER!r} user to run the PostgreSQL server as")
    if os.geteuid() not in (0, user.pw_uid):
        pytest.skip(f"running the server as {SERVER_USER!r} needs root or that user")
    # Not under pytest's tmp_path: its parents are private to the current user, the server could not enter them.
    root = Path(tempfile.mkdtemp(prefix="crosssim-pg-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    server = PostgresServer(bin_dir=bin_dir, root=root, port=_free_port())
    try:
        initdb = [str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", SERVER_USER, "--auth=trust"]
        _run_as_server_user([*initdb, "--no-locale", "-E", "UTF8", "--no-sync"], root)
        server.start()
        yield server
    finally:
        if (server.data_dir / "postmaster.pid").exists():  # running (a test may have left it stopped)
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])  # a PostgreSQL server: slow
def ledger_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PredictionLedger]:
    """The prediction ledger on SQLite (a file in tmp_path) and on its own real PostgreSQL server."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("postgres_server").url
    ledger = PredictionLedger(url)
    yield ledger
    ledger.close()
