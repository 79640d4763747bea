"""Background server processes of one deployment under its own folder: pid files, logs, start and stop.

Used by the local Airflow deployment (:mod:`afm.local_airflow`) and the one-machine Spark
cluster (:mod:`afm.spark_cluster`). Each process runs in a session of its own, so stopping it
stops its children too (the JVM a script starts, Airflow's forked workers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Daemons:
    """Start, find and stop named processes: ``root/logs/NAME.log``, ``root/run/NAME.pid``.

    A subclass gives ``root`` (a Path), ``command(name)`` and ``environment()``, and may
    prepare folders in ``_prepare(name)``.
    """

    root: Path

    def command(self, name: str) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        raise NotImplementedError

    def _prepare(self, name: str) -> None:
        """Hook: create what the process needs before it starts."""

    def log_file(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _pid_file(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        """The process's pid when it runs."""
        path = self._pid_file(name)
        if not path.exists():
            return None
        pid = int(path.read_text().strip() or 0)
        return pid if pid and alive(pid) else None

    def _start(self, name: str) -> None:
        if self.pid(name) is not None:
            return
        self.log_file(name).parent.mkdir(parents=True, exist_ok=True)
        self._pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        self._prepare(name)
        with self.log_file(name).open("ab") as out:
            proc = subprocess.Popen(
                self.command(name), env=self.environment(), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root,
            )  # fmt: skip
        self._pid_file(name).write_text(str(proc.pid))

    def _stop(self, name: str, grace_s: float = 30.0) -> None:
        """SIGTERM to the process's session, SIGKILL after ``grace_s``."""
        pid = self.pid(name)
        self._pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
