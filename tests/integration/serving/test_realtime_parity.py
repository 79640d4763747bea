"""Realtime parity: a day replayed through POST /v1/events and POST /v1/rank gets the training examples' sequences and scores.

World: the tiny synthetic world through the real feature pipeline, Feast registered and
materialized up to the end of the day before the last (``pipeline_world``, ``online_world``
in conftest.py), on SQLite, then on Redis. A tiny ranker per mode is fine-tuned on the days
before the last by :func:`training.jobs.finetune.finetune` and loaded as the service loads it:
the default (``hybrid``: DCAT over the sequence and the user embedding), early fusion alone
and the user embedding alone.

The replay (:func:`afm.replay.replay`, what ``afm events replay`` runs) sends the last day's
raw events (every file, the planted bad rows too) to ``POST /v1/events`` in time order, and
each of the day's requests to ``POST /v1/rank`` with its ``request_time`` once every event
before that time has been sent and none at or after it, through the whole app in-process.

Expected values come from the training path, not from the service's merge code:

(a) the sequence: the request's row of ``request_sequences/ds=D`` (Spark's point-in-time
    join: the D-1 snapshot and D's explicit events before the request, capped at
    MAX_SEQ_LEN), event by event with its time in unix seconds; the service's is the one
    its route read (a recording wrapper around :class:`serving.online_features.FeastOnlineFeatures`);
(b) the scores: :func:`training.jobs.finetune.predict` on
    :func:`training.data.load_ranking_data` of the day, loaded and scored as fine-tuning's
    evaluation does (late fusion: the user embedding of the history before the request's day,
    which the service computes from the same sequence when no embedding is published).

The planted bad rows must be rejected for the gate's reasons and quarantined, the duplicate
taken once. Without the events (the snapshot alone, as before) the sequences and scores of
the requests after a user's first event of the day differ: the comparison can fail.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from afm.replay import DayLog, clear_realtime, replay
from features.contract import LABEL_ACTIONS
from serving.app import create_app
from serving.model import ServingModel
from serving.online_features import FeastOnlineFeatures, UserRow
from training.data import load_ranking_data, read_partition, to_unix_seconds
from training.jobs.finetune import ItemFacts, predict
from training.metrics import roc_auc
from training.model.inputs import history_len

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(2400)]

MODES = ("hybrid", "pinfm_early", "pinfm_late")  # the served default first
ATOL = 1e-5  # fp32
SCORES = [f"score_{a}" for a in LABEL_ACTIONS]


class Recording:
    """The service's feature reader, recording each sequence its ``user`` built (and for which request time)."""

    def __init__(self, inner: FeastOnlineFeatures) -> None:
        self.inner = inner
        self.seen: list[tuple[int, int | None, UserRow]] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def user(self, user_id: int, before_us: int | None = None) -> UserRow:
        row = self.inner.user(user_id, before_us=before_us)
        self.seen.append((user_id, before_us, row))
        return row


@pytest.fixture(scope="module")
def day(pipeline_world: SimpleNamespace) -> DayLog:
    return DayLog.read(pipeline_world.layout, pipeline_world.request_day)


def _eval_history(model: ServingModel) -> int:
    """How many of each request's newest events fine-tuning's evaluation loads (``training.jobs.finetune.finetune``).

    The ranker's history length; a ranker that reads a user embedding loads more, to find the history
    before the request's day that its embedding covers.
    """
    from training.jobs import finetune as ft

    n = history_len(model.ranker.cfg)
    if model.ranker.cfg.sequence in getattr(ft, "USER_EMBEDDING_MODES", ()):
        n *= ft.LATE_LOAD_FACTOR
    return n


@pytest.fixture(scope="module")
def trained(pipeline_world: SimpleNamespace, models) -> dict[str, pd.DataFrame]:
    """Per mode: every impression of the last day with the probabilities evaluation gives it."""
    out = {}
    for mode, model in models.items():
        data = load_ranking_data(pipeline_world.layout, [pipeline_world.request_day], _eval_history(model))
        items = ItemFacts.from_layout(pipeline_world.layout, model.ranker.cfg.backbone.content_dim)
        probs = predict(model.ranker, data, items, torch.device("cpu"))  # (N, A)
        frame = pd.DataFrame({"request_id": data.request_ids[data.req_index].astype(str), "item_id": data.item_ids})
        for j, action in enumerate(model.actions):
            frame[f"prob_{action}"] = probs[:, j]
        out[mode] = frame
    return out


def _replay(world: SimpleNamespace, model: ServingModel, day: DayLog, realtime: bool) -> SimpleNamespace:
    """Replay the day through the service over ``world``'s online store; what it served per request."""
    users = {int(u) for u in day.requests["user_id"]} | {
        e["user_id"] for e in day.events if isinstance(e.get("user_id"), int) and e["user_id"] > 0
    }
    clear_realtime(world.layout, sorted(users))  # each replay starts from empty realtime rows
    features = Recording(FeastOnlineFeatures(world.layout))
    app = create_app(world.layout, model_loader=lambda: model, online_features=features, warm_up_in_background=False)
    served: dict[str, dict] = {}

    def on_rank(req: pd.Series, answer: dict) -> None:
        user_id, before_us, row = features.seen[-1]
        assert (user_id, before_us) == (int(req["user_id"]), int(req["request_ts_us"]))
        served[req["request_id"]] = {"sequence": row.sequence, "realtime_events": answer["realtime_events"]}

    with TestClient(app) as client:
        result = replay(client, day, realtime=realtime, on_rank=on_rank)
    return SimpleNamespace(result=result, served=served)


@pytest.fixture(scope="module")
def replays(online_world: SimpleNamespace, models, day) -> dict[str, SimpleNamespace]:
    """Per mode, the replay with realtime events; ``"snapshot only"``: the default (hybrid) ranker without them."""
    out = {mode: _replay(online_world, models[mode], day, realtime=True) for mode in MODES}
    out["snapshot only"] = _replay(online_world, models["hybrid"], day, realtime=False)
    clear_realtime(online_world.layout, sorted({int(u) for u in day.requests["user_id"]}))
    return out


def _expected_sequences(world: SimpleNamespace) -> dict[str, dict]:
    """``request_sequences`` of the request day: each request's sequence as the training example holds it."""
    seq = read_partition(world.layout.request_sequences, world.request_day)
    out = {}
    for row in seq.itertuples(index=False):
        out[str(row.request_id)] = {
            "item_ids": [int(x) for x in row.item_ids],
            "actions": list(row.actions),
            "surfaces": list(row.surfaces),
            "ts": to_unix_seconds(list(row.ts)).tolist() if len(row.ts) else [],
        }
    return out


def _as_compared(sequence: dict | None) -> dict:
    empty = {"item_ids": [], "actions": [], "surfaces": [], "ts": []}
    return {k: [int(x) if k in ("item_ids", "ts") else x for x in (sequence or empty).get(k, [])] for k in empty}


@pytest.mark.parametrize("mode", MODES)
def test_every_replayed_request_gets_the_training_examples_sequence(online_world, replays, day, models, mode):
    served = replays[mode].served
    expected = _expected_sequences(online_world)
    assert set(served) == set(day.candidates) and len(served) >= 50
    wrong = [r for r, s in served.items() if _as_compared(s["sequence"]) != expected[r]]
    assert not wrong, (
        f"{len(wrong)} requests differ, e.g. {wrong[0]}: {_as_compared(served[wrong[0]]['sequence'])} != {expected[wrong[0]]}"
    )
    # what the comparison covered: requests after the user's events of the day, sequences longer than the history
    with_today = sum(s["realtime_events"] > 0 for s in served.values())
    longer = sum(len(e["item_ids"]) > history_len(models[mode].ranker.cfg) for e in expected.values())
    print(f"{mode}: {len(served)} requests, {with_today} with events of the day, {longer} longer than the history")
    assert with_today >= len(served) // 4 and longer >= 1


@pytest.mark.parametrize("mode", MODES)
def test_every_replayed_impression_gets_the_training_score(online_world, replays, trained, mode, record_property):
    scores = replays[mode].result.scores
    merged = trained[mode].merge(scores, on=["request_id", "item_id"], how="left", validate="one_to_one")
    assert not merged[SCORES].isna().any().any() and len(scores) == len(merged)
    diff = max(float(np.abs(merged[f"score_{a}"] - merged[f"prob_{a}"]).max()) for a in LABEL_ACTIONS)
    record_property(f"max_abs_diff_{mode}_{online_world.online_store.kind}", diff)
    print(f"{mode}: {len(merged)} impressions, max |served - trained| = {diff:.3g}")
    assert diff <= ATOL
    assert merged["prob_click"].std() > 1e-3


def test_the_bad_rows_are_rejected_for_the_gates_reasons_and_quarantined(online_world, replays):
    gate = json.loads((online_world.layout.reports / f"ds={online_world.request_day}" / "gate.json").read_text())
    pushed = replays["hybrid"].result.pushed
    by_reason = gate["by_reason"]
    # unknown actions and surfaces are refused by the contract; the duplicate is taken once; the row moved into
    # the next day is valid on its own (a realtime path has no day) and is sent after every request of the day
    assert pushed["rejected"] == by_reason.get("unknown_action", 0) + by_reason.get("unknown_surface", 0) > 0
    assert pushed["duplicates"] == by_reason.get("duplicate_event_id", 0)
    assert pushed["received"] == gate["rows_in"] and pushed["accepted"] == gate["rows_in"] - pushed["rejected"]
    kept = [
        json.loads(line)
        for p in online_world.layout.quarantine_realtime.rglob("*.jsonl")
        for line in p.read_text().splitlines()
    ]
    reasons = sorted(r for q in kept[-pushed["rejected"] :] for r in q["reasons"])
    assert reasons == sorted(
        ["unknown_action"] * by_reason["unknown_action"] + ["unknown_surface"] * by_reason["unknown_surface"]
    )


def test_the_snapshot_alone_differs_and_the_replay_reports_the_auc(online_world, replays, trained, day):
    """The control: without the day's events the sequences of later requests and their scores differ."""
    expected = _expected_sequences(online_world)
    alone = replays["snapshot only"]
    differ = sum(_as_compared(s["sequence"]) != expected[r] for r, s in alone.served.items())
    merged = trained["hybrid"].merge(alone.result.scores, on=["request_id", "item_id"], validate="one_to_one")
    diff = max(float(np.abs(merged[f"score_{a}"] - merged[f"prob_{a}"]).max()) for a in LABEL_ACTIONS)
    assert differ >= len(alone.served) // 4 and diff > 10 * ATOL
    auc = {run: replays[run].result.auc(day.examples) for run in ("hybrid", "snapshot only")}
    evaluated = day.examples.merge(trained["hybrid"], on=["request_id", "item_id"], validate="one_to_one")
    print(f"AUC on {online_world.request_day}: realtime {auc['hybrid']}, snapshot only {auc['snapshot only']}")
    for a in LABEL_ACTIONS:  # served with the day's events = what evaluation measures (the same scores)
        assert auc["hybrid"][a] == pytest.approx(roc_auc(evaluated[f"label_{a}"], evaluated[f"prob_{a}"]), abs=1e-6)
