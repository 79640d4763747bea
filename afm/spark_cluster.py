"""A real Spark standalone cluster on one machine: one master and N workers on 127.0.0.1.

``afm spark up`` (``make spark-up``) starts, from the PySpark distribution that ``pip`` installed
(its ``bin/spark-class``; the wheel has no ``sbin/start-master.sh``), under
``$AFM_HOME/deploy/spark/``:

* ``org.apache.spark.deploy.master.Master`` on ``spark://127.0.0.1:<master_port>`` with its web
  UI (and JSON status, ``/json/``) on ``ui_port``;
* ``workers`` × ``org.apache.spark.deploy.worker.Worker``, each offering ``worker_cores`` cores
  and ``worker_memory`` to executors, with its web UI on ``ui_port + i``.

Each daemon runs in its own session (process group; the executors a worker launches are in
it too) with its log in ``logs/`` and its pid in ``run/``; executors' own logs and the files
shipped to them are in ``work/<worker>/<app>/<executor>/``. ``afm spark down`` stops the
workers, then the master. The feature steps run on the cluster with
``--master spark://127.0.0.1:<master_port>`` (or ``AFM_SPARK_MASTER``); the session ships the
project's code to the executors (:func:`features.shipping.project_zip`).

The daemons start with this machine's environment less ``PYTHONPATH`` and in a folder outside
the repository, so executors find the project's code only because the session ships it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from afm.daemons import Daemons
from afm.postgres import port_is_free
from features.config import Layout

DEFAULT_MASTER_PORT = 7077
DEFAULT_UI_PORT = 8090  # not Spark's 8080: that is the local Airflow's UI
DEFAULT_WORKERS = 2
DEFAULT_WORKER_CORES = 1
DEFAULT_WORKER_MEMORY = "1g"
#: heap of each daemon (master, workers); executors get ``spark.executor.memory`` (features.spark)
DAEMON_MEMORY = "512m"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


class SparkClusterError(RuntimeError):
    """The local cluster could not start, stop or answer; the message names the daemon and its log."""


def spark_home() -> Path:
    """The Spark distribution inside the ``pyspark`` wheel (``bin/spark-class``, ``jars/``)."""
    import pyspark

    home = Path(pyspark.__file__).resolve().parent
    if not (home / "bin" / "spark-class").exists():
        raise SparkClusterError(f"the pyspark package at {home} has no bin/spark-class: run 'make setup'")
    return home


@dataclass(frozen=True)
class LocalSparkCluster(Daemons):
    """The standalone cluster under one ``$AFM_HOME``.

    Args:
        layout: the data root; the cluster's files live in ``layout.root / "deploy" / "spark"``.
        master_port: the master's RPC port (the ``spark://`` URL).
        ui_port: the master's web UI and JSON status; worker ``i`` (1-based) uses ``ui_port + i``.
        workers: how many workers.
        worker_cores: cores each worker offers.
        worker_memory: memory each worker offers to executors (``1g``, ``512m``).
        host: the address every daemon binds to.

    Example:
        >>> cluster = LocalSparkCluster(Layout(Path("var")))
        >>> cluster.up()["alive_workers"]  # doctest: +SKIP
        2
        >>> cluster.master_url
        'spark://127.0.0.1:7077'
    """

    layout: Layout
    master_port: int = DEFAULT_MASTER_PORT
    ui_port: int = DEFAULT_UI_PORT
    workers: int = DEFAULT_WORKERS
    worker_cores: int = DEFAULT_WORKER_CORES
    worker_memory: str = DEFAULT_WORKER_MEMORY
    host: str = "127.0.0.1"

    # ------------------------------------------------------------------ places
    @property
    def root(self) -> Path:
        return self.layout.root / "deploy" / "spark"

    @property
    def master_url(self) -> str:
        return f"spark://{self.host}:{self.master_port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.ui_port}"

    @property
    def daemons(self) -> tuple[str, ...]:
        """Daemon names, master first: ``master``, ``worker-1`` … ``worker-N``."""
        return ("master", *(f"worker-{i}" for i in range(1, self.workers + 1)))

    def work_dir(self, daemon: str) -> Path:
        """A worker's work folder: one sub-folder per application, with its executors' logs and files."""
        return self.root / "work" / daemon

    # ------------------------------------------------------------------ processes
    def command(self, daemon: str) -> list[str]:
        spark_class = str(spark_home() / "bin" / "spark-class")
        if daemon == "master":
            return [spark_class, MASTER_CLASS, "--host", self.host, "--port", str(self.master_port),
                    "--webui-port", str(self.ui_port)]  # fmt: skip
        index = self.daemons.index(daemon)
        return [spark_class, WORKER_CLASS, self.master_url, "--host", self.host, "--webui-port",
                str(self.ui_port + index), "--cores", str(self.worker_cores), "--memory", self.worker_memory,
                "--work-dir", str(self.work_dir(daemon))]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """The daemons' environment: this one less ``PYTHONPATH``, with Spark's home, address and heap."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update({
            "SPARK_HOME": str(spark_home()),
            "SPARK_LOCAL_IP": self.host,
            "SPARK_DAEMON_MEMORY": DAEMON_MEMORY,
            "SPARK_LOCAL_DIRS": str(self.root / "tmp"),
            "SPARK_CONF_DIR": str(self.root / "conf"),  # empty: nothing from a machine-wide spark-defaults
            "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON") or sys.executable,
        })  # fmt: skip
        # no REST submission server (port 6066): jobs come from the driver; two clusters must not clash
        env["SPARK_MASTER_OPTS"] = f"{env.get('SPARK_MASTER_OPTS', '')} -Dspark.master.rest.enabled=false".strip()
        return env

    def _prepare(self, daemon: str) -> None:
        for folder in (self.root / "tmp", self.root / "conf"):
            folder.mkdir(parents=True, exist_ok=True)
        if daemon != "master":
            self.work_dir(daemon).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lifecycle
    def _check_ports(self) -> None:
        ports = [("the master port", self.master_port, "--master-port / AFM_SPARK_MASTER_PORT"),
                 ("the master's web UI port", self.ui_port, "--ui-port / AFM_SPARK_UI_PORT")]  # fmt: skip
        ports += [(f"{d}'s web UI port", self.ui_port + i, "--ui-port") for i, d in enumerate(self.daemons) if i]
        for what, port, option in ports:
            if not port_is_free(self.host, port):
                raise SparkClusterError(
                    f"{what}, {port} on {self.host}, is in use by another program: stop it, or choose another "
                    f"port ({option})"
                )

    def up(self, timeout_s: float = 120.0, echo: Any = None) -> dict:
        """Start the master and the workers; wait until the master reports every worker ALIVE.

        Returns:
            :meth:`status` once every worker is registered.

        Raises:
            SparkClusterError: no Java, a port is taken, a daemon exits or the workers do not
                register in time; the message names the daemon and its log.
        """
        from features.spark import require_java

        say = echo or (lambda msg: None)
        t0 = time.perf_counter()
        try:
            require_java()
        except RuntimeError as exc:
            raise SparkClusterError(str(exc)) from exc
        if all(self.pid(d) is None for d in self.daemons):
            self._check_ports()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "cluster.json").write_text(json.dumps(self.settings(), indent=2, sort_keys=True) + "\n")
        self._start("master")
        self._wait(lambda state: state.get("status") == "ALIVE", "the master's web UI to answer", timeout_s)
        say(f"master: {self.master_url}  UI: {self.ui_url} ({time.perf_counter() - t0:.0f} s)")
        for daemon in self.daemons[1:]:
            self._start(daemon)
        self._wait(lambda state: self._alive_workers(state) >= self.workers, f"{self.workers} ALIVE workers",
                   timeout_s)  # fmt: skip
        say(f"{self.workers} workers ALIVE, {self.worker_cores} core(s) and {self.worker_memory} each "
            f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        return self.status()

    def down(self) -> None:
        """Stop the workers (and their executors), then the master; logs and work folders stay."""
        for daemon in reversed(self.daemons):
            self._stop(daemon)

    def settings(self) -> dict[str, Any]:
        """What :meth:`up` records in ``cluster.json`` (and :meth:`recorded` reads back)."""
        return {"host": self.host, "master_port": self.master_port, "ui_port": self.ui_port, "workers": self.workers,
                "worker_cores": self.worker_cores, "worker_memory": self.worker_memory}  # fmt: skip

    @classmethod
    def recorded(cls, layout: Layout) -> LocalSparkCluster | None:
        """The cluster that ``up`` last started under ``layout`` (its ``cluster.json``), or None."""
        path = layout.root / "deploy" / "spark" / "cluster.json"
        if not path.exists():
            return None
        return cls(layout, **json.loads(path.read_text(encoding="utf-8")))

    def master_state(self) -> dict | None:
        """The master's JSON status (``/json/``: workers, applications), or None when it does not answer."""
        try:
            resp = httpx.get(f"{self.ui_url}/json/", timeout=5)
            return resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    @staticmethod
    def _alive_workers(state: dict | None) -> int:
        return sum(1 for w in (state or {}).get("workers", []) if w.get("state") == "ALIVE")

    def status(self) -> dict:
        """Each daemon's pid (null = not running), the master's status and how many workers it sees ALIVE."""
        state = self.master_state()
        return {
            "master_url": self.master_url,
            "ui_url": self.ui_url,
            "daemons": {d: self.pid(d) for d in self.daemons},
            "master_status": (state or {}).get("status"),
            "alive_workers": self._alive_workers(state) if state is not None else None,
        }

    def _log_tail(self, daemon: str, lines: int = 5) -> str:
        path = self.log_file(daemon)
        text = path.read_text(errors="replace").strip().splitlines()[-lines:] if path.exists() else []
        return " | ".join(text)

    def _wait(self, done: Any, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state: dict | None = None
        while time.monotonic() < deadline:
            for daemon in self.daemons:
                if self._pid_file(daemon).exists() and self.pid(daemon) is None:
                    raise SparkClusterError(f"{daemon} exited (log {self.log_file(daemon)}): {self._log_tail(daemon)}")
            state = self.master_state()
            if state is not None and done(state):
                return
            time.sleep(0.5)
        seen = "no answer" if state is None else f"{self._alive_workers(state)} ALIVE worker(s)"
        raise SparkClusterError(f"timed out after {timeout_s:.0f} s waiting for {what} at {self.ui_url} ({seen}); "
                                f"logs in {self.root / 'logs'}")  # fmt: skip
