"""A tiny synthetic world written as the parquet tables training reads (schemas of features/tables.py).

Users have one preferred category; their sequences are mostly positive actions on items
of that category, and their clicks/saves on impressions depend on whether the candidate's
category matches, so a ranker that reads the sequence and the candidate can beat AUC 0.5.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import Layout
from features.contract import CONTENT_DIM, ITEM_SCHEMA, SURFACES
from features.tables import PRETRAIN_CORPUS_SCHEMA, RANKING_EXAMPLES_SCHEMA, REQUEST_SEQUENCES_SCHEMA
from training.bench.seqrec import write_chain_file

N_CATS = 4
DAYS = ("2026-01-01", "2026-01-02", "2026-01-03")


def _write(table: pa.Table, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "part-00000.parquet")
    (path / "_SUCCESS").write_text("")


def make_world(
    root: Path,
    n_users: int = 80,
    n_items: int = 160,
    requests_per_day: int = 2,
    seed: int = 0,
    days: tuple[str, ...] = DAYS,
    history: tuple[int, int] = (8, 30),
    impressions: int = 8,
    segment_len: int = 16,
) -> Layout:
    """Write items, pretrain corpus (last day), request sequences and ranking examples for ``days`` under root."""
    rng = np.random.default_rng(seed)
    layout = Layout(root)
    item_ids = np.arange(n_items, dtype=np.int64) * 7919 + 10_000_000_000  # big ids: hashing must cope
    cats = np.arange(n_items) % N_CATS
    t0 = dt.datetime(2025, 12, 1, tzinfo=dt.UTC)
    contents = []
    for c in cats:
        if rng.random() < 0.1:
            contents.append(None)
        else:
            v = rng.normal(0, 0.1, CONTENT_DIM).astype(np.float32)
            v[c] += 1.0
            contents.append(v.tolist())
    items = pa.table(
        {
            "item_id": item_ids,
            "created_at": [t0] * n_items,
            "category": [f"c{c}" for c in cats],
            "content": contents,
        },
        schema=ITEM_SCHEMA,
    )
    layout.items.mkdir(parents=True, exist_ok=True)
    pq.write_table(items, layout.items / "items.parquet")

    by_cat = [item_ids[cats == c] for c in range(N_CATS)]
    pref = np.arange(n_users) % N_CATS
    histories: list[list[tuple[int, str, str]]] = [[] for _ in range(n_users)]

    def grow(u: int, n: int) -> None:
        for _ in range(n):
            if rng.random() < 0.85:
                item = int(rng.choice(by_cat[pref[u]]))
                action = str(rng.choice(["click", "save", "click", "share"]))
            else:
                item = int(rng.choice(item_ids))
                action = "hide"
            histories[u].append((item, action, str(rng.choice(SURFACES[:3]))))

    def seq_cols(events: list[tuple[int, str, str]], start: dt.datetime) -> dict:
        return {
            "item_ids": [e[0] for e in events],
            "actions": [e[1] for e in events],
            "surfaces": [e[2] for e in events],
            "ts": [start + dt.timedelta(minutes=i) for i in range(len(events))],
        }

    for u in range(n_users):
        grow(u, int(rng.integers(*history)))
    for d, ds in enumerate(days):
        day0 = dt.datetime.fromisoformat(ds).replace(tzinfo=dt.UTC)
        req_rows, ex_rows = [], []
        for u in range(n_users):
            for r in range(requests_per_day):
                rid = f"{ds}-u{u}-r{r}"
                surface = str(rng.choice(SURFACES[:3]))
                req_rows.append(
                    {
                        "request_id": rid,
                        "user_id": u,
                        "request_ts": day0,
                        "surface": surface,
                        **seq_cols(histories[u], t0),
                    }
                )
                for item in rng.choice(item_ids, size=impressions, replace=False):
                    match = cats[np.searchsorted(item_ids, item)] == pref[u]
                    click = int(rng.random() < (0.7 if match else 0.1))
                    ex_rows.append(
                        {
                            "request_id": rid,
                            "user_id": u,
                            "item_id": int(item),
                            "surface": surface,
                            "impression_ts": day0,
                            "label_click": click,
                            "label_save": int(click and rng.random() < 0.5),
                            "label_hide": int(rng.random() < (0.02 if match else 0.3)),
                        }
                    )
        _write(
            pa.Table.from_pylist(req_rows, schema=REQUEST_SEQUENCES_SCHEMA),
            Layout.partition(layout.request_sequences, ds),
        )
        _write(
            pa.Table.from_pylist(ex_rows, schema=RANKING_EXAMPLES_SCHEMA), Layout.partition(layout.ranking_examples, ds)
        )
        for u in range(n_users):
            grow(u, int(rng.integers(1, 4)))
        if d == len(days) - 1:
            seg_rows = []
            for u in range(n_users):
                h = histories[u]
                for s, start in enumerate(range(0, len(h), segment_len)):
                    seg_rows.append({"user_id": u, "segment": s, **seq_cols(h[start : start + segment_len], t0)})
            _write(
                pa.Table.from_pylist(seg_rows, schema=PRETRAIN_CORPUS_SCHEMA),
                Layout.partition(layout.pretrain_corpus, ds),
            )
    return layout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """One tiny world per test module (read-only by convention: tests that write models copy nothing into it)."""
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture()
def chain_file(tmp_path: Path):
    """Factory: ``chain_file(n_users=..)`` writes a generated ``user item`` file (see write_chain_file)."""

    def make(name: str = "chains.txt", **kw) -> Path:
        return write_chain_file(tmp_path / name, **kw)

    return make
