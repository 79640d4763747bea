"""Train/serve parity: fine-tuning's batches and the service feed a ranker the same inputs and get the same scores.

World: the tiny synthetic world through the real feature pipeline, Feast registered and
materialized up to the end of the day before the last (``pipeline_world`` and ``online_world``
in conftest.py); the service reads Feast's online store on SQLite, then on Redis.
Three tiny rankers are fine-tuned on it by :func:`training.jobs.finetune.finetune` itself
(the hybrid, the served default: DCAT early fusion with the published embedding; early fusion
alone; late fusion alone, the published-embedding path), saved as artifacts and loaded as the
service loads them (:func:`serving.model.load_ranker`), so the saved config's round trip is
part of the path.

The two paths, for the same impressions:

(a) training: :func:`training.data.load_ranking_data` of the last day with the ranker's
    history length, then :func:`training.jobs.finetune.batch_tensors` (the inputs) and
    :func:`training.jobs.finetune.predict` (the scores), as fine-tuning and evaluation do;
(b) service: :class:`serving.online_features.FeastOnlineFeatures` ``user(...)`` and ``item_content(...)``,
    read as ``POST /v1/rank`` reads them, then :meth:`serving.model.ServingModel.user_embeddings`
    and :meth:`~serving.model.ServingModel.score` at the request's time
    (:meth:`~serving.model.ServingModel.ranker_inputs` shows what it feeds the ranker).

Point in time. A training example's sequence is its user's sequence as of the request: the
previous day's end-of-day snapshot followed by that user's explicit events of the request
day before the request. The online store holds an end-of-day snapshot: during the last day,
the previous day's. The comparison therefore takes the last day's requests made before any
explicit event of their user that day; for those the two sequences are the same events by
construction, while for a later request the store is legitimately behind (the service reads
last night's snapshot until the next materialization) and the inputs would differ for that
reason alone. Eligibility is decided from the valid events, apart from both paths; the test
then asserts that the sequences the two paths feed are equal, event by event.

The comparison covers sequences longer than the history length (truncation), several
time-gap buckets, candidates created after the ranker's training data (scored from content)
and young trained ones (expected-keep scaling by age). It can fail: serving with a history
length off by one, without time gaps, or with ages taken at the snapshot's time instead of
the request's moves the scores far beyond the tolerance.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import serving.model
from features.contract import IMPRESSION
from features.store import snapshot_timestamp
from serving.model import ServingModel
from serving.online_features import FeastOnlineFeatures
from training.data import load_ranking_data, read_partition, to_unix_seconds
from training.jobs.finetune import ItemFacts, batch_tensors, predict
from training.model.inputs import history_len
from training.model.ranker_objective import ranker_logits

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(1800)]

MODES = ("hybrid", "pinfm_early", "pinfm_late")
ATOL = 1e-5  # fp32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def requests(pipeline_world: SimpleNamespace) -> pd.DataFrame:
    """The last day's requests made before any explicit event of their user that day (see the module docstring)."""
    layout, day = pipeline_world.layout, pipeline_world.request_day
    reqs = read_partition(layout.request_sequences, day, columns=["request_id", "user_id", "request_ts", "surface"])
    events = read_partition(layout.valid_events, day, columns=["user_id", "action", "ts"])
    first_explicit = events[events["action"] != IMPRESSION].groupby("user_id")["ts"].min()
    first = reqs["user_id"].map(first_explicit)
    eligible = reqs[first.isna() | (first >= reqs["request_ts"])].sort_values("request_id").reset_index(drop=True)
    return eligible.assign(request_s=to_unix_seconds(eligible["request_ts"].to_numpy()))


def _training_path(model: ServingModel, world: SimpleNamespace, requests: pd.DataFrame) -> SimpleNamespace:
    """What fine-tuning and evaluation feed the ranker for these requests, and the probabilities evaluation gets.

    Returns:
        ``requests`` in the batch's row order, ``b`` (batch_tensors of their impressions),
        ``probs`` (U, C, A) in the batch's candidate grid, ``user`` (U, D) the user embeddings the
        training forward reads (of the requests' histories; these requests have no event of their
        day before them), or None for a ranker that reads none.
    """
    rcfg = model.ranker.cfg
    data = load_ranking_data(world.layout, [world.request_day], history_len(rcfg))
    items = ItemFacts.from_layout(world.layout, rcfg.backbone.content_dim)
    rows = pd.Index(data.request_ids).get_indexer(requests["request_id"])
    assert (rows >= 0).all()
    order = np.argsort(rows)  # batch_tensors lays the requests out in the order of their rows
    idx = np.flatnonzero(np.isin(data.req_index, rows))  # (N,) impressions of the requests
    b = batch_tensors(data, idx, items, CPU)
    probs = np.zeros((*b["cand_ids"].shape, len(model.actions)), np.float32)  # (U, C, A)
    probs[b["inverse"].numpy(), b["slot"].numpy()] = predict(model.ranker, data, items, CPU)[idx]
    user = None
    if model.uses_user_embedding:
        late = batch_tensors(data, idx, items, CPU, history_len(rcfg), late=True)["late_seq"]
        with torch.no_grad():
            emb = model.ranker.user_embedding(
                late["item_ids"], late["action_ids"], late["surface_ids"], late["content"], late["pad_mask"],
                late["ts"],
            )  # fmt: skip
        user = emb[late["index"]].numpy()  # (U, D)
        if rcfg.sequence == "pinfm_late":  # late fusion alone: that embedding is the forward's user vector
            with torch.no_grad():
                _, forward_user = ranker_logits(model.ranker, b, return_user=True)  # (U, D)
            np.testing.assert_allclose(forward_user.numpy(), user, atol=ATOL, rtol=0)
    return SimpleNamespace(requests=requests.iloc[order].reset_index(drop=True), b=b, probs=probs, user=user)


def _service_path(
    model: ServingModel,
    features: FeastOnlineFeatures,
    req: pd.Series,
    candidates: list[int],
    request_s: int | None = None,
) -> SimpleNamespace:
    """What the service feeds the ranker for one request, read from the Feast online store as /v1/rank reads it."""
    sequence = features.user(int(req["user_id"])).sequence or {"item_ids": [], "actions": [], "surfaces": []}
    content = features.item_content(candidates) or None
    request_s = int(req["request_s"]) if request_s is None else request_s
    embedding = model.user_embeddings([sequence])[0]  # (D,)
    return SimpleNamespace(
        sequence=sequence,
        embedding=embedding,
        probs=model.score(embedding, candidates, req["surface"], content, sequence=sequence, request_ts=request_s),
        inputs=model.ranker_inputs(candidates, req["surface"], content, sequence, request_s),
    )


def _candidates(b: dict, u: int) -> list[int]:
    return b["cand_ids"][u][b["cand_mask"][u]].tolist()


def _served_probs(model: ServingModel, world: SimpleNamespace, train: SimpleNamespace, request_s: int | None = None):
    """(U, C, A) service probabilities of the requests of ``train``, in its batch's grid (0 at padding slots)."""
    features = FeastOnlineFeatures(world.layout)
    out = np.zeros_like(train.probs)
    for u, req in train.requests.iterrows():
        cands = _candidates(train.b, u)
        out[u, : len(cands)] = _service_path(model, features, req, cands, request_s).probs
    return out


@pytest.mark.parametrize("mode", MODES)
def test_training_batches_and_the_service_feed_the_ranker_the_same_inputs(
    online_world, models, requests, mode: str
) -> None:
    model = models[mode]
    ranker, hist = model.ranker, history_len(model.ranker.cfg)
    assert len(requests) >= 8
    train = _training_path(model, online_world, requests)
    b = train.b
    train_gaps = ranker.time_gaps(b["seq"])  # (U, L) the buckets the backbone reads
    features = FeastOnlineFeatures(online_world.layout)
    cutoff = ranker.cfg.id_cutoff_s
    horizon_s = ranker.cfg.new_items.age_horizon_days * 86_400
    seen = {"truncated": 0, "gap_buckets": set(), "content_only": 0, "young_trained": 0, "candidates": 0}
    for u, req in train.requests.iterrows():
        cands = _candidates(b, u)
        served = _service_path(model, features, req, cands)
        s = served.inputs
        # the sequence: same events, same order, same truncation, same times and gaps
        n = int(b["seq"]["pad_mask"][u].sum())
        assert int(s["seq"]["pad_mask"][0].sum()) == n == min(len(served.sequence["item_ids"]), hist), req.request_id
        for key in ("item_ids", "action_ids", "surface_ids", "ts"):
            assert torch.equal(s["seq"][key][0, :n], b["seq"][key][u, :n]), (req.request_id, key)
        assert torch.equal(s["seq"]["content"][0, :n], b["seq"]["content"][u, :n])
        gaps = ranker.time_gaps(s["seq"])  # (1, L)
        assert gaps is not None and torch.equal(gaps[0, :n], train_gaps[u, :n]), req.request_id
        # the candidates: ids, surface, content, age at the request, request time
        assert s["cand_ids"][0].tolist() == cands and len(cands) >= 5
        C = len(cands)
        for key in ("cand_surface_ids", "cand_age_s", "cand_content"):
            assert torch.equal(s[key][0], b[key][u, :C]), (req.request_id, key)
        assert int(s["request_ts"][0]) == int(b["request_ts"][u]) == int(req["request_s"])
        # the served (published) user embedding = the one the training forward reads; none where none is read
        if train.user is None:
            assert not served.embedding.any()
        else:
            np.testing.assert_allclose(served.embedding, train.user[u], atol=ATOL, rtol=0)

        age = s["cand_age_s"][0].numpy()
        created = int(req["request_s"]) - age
        seen["truncated"] += len(served.sequence["item_ids"]) > hist
        seen["gap_buckets"] |= set(gaps[0, :n].tolist()) - {0}
        seen["content_only"] += int(((age >= 0) & (created > cutoff)).sum())
        seen["young_trained"] += int(((age >= 0) & (age < horizon_s) & (created <= cutoff)).sum())
        seen["candidates"] += C
    # what the comparison covered
    assert seen["truncated"] >= 1, seen  # longer than the history length: the truncation rule matters
    assert len(seen["gap_buckets"]) >= 3, seen
    assert seen["content_only"] >= 1 and seen["young_trained"] >= 1, seen


@pytest.mark.parametrize("mode", MODES)
def test_training_batches_and_the_service_give_the_same_scores(
    online_world, models, requests, mode: str, record_property
) -> None:
    model = models[mode]
    train = _training_path(model, online_world, requests)
    served = _served_probs(model, online_world, train)
    mask = train.b["cand_mask"].numpy()  # (U, C)
    diff = float(np.abs(served - train.probs)[mask].max())
    record_property(f"max_abs_diff_{mode}_{online_world.online_store.kind}", diff)
    print(f"{mode}: {int(mask.sum())} impressions of {len(requests)} requests, max |served - trained| = {diff:.3g}")
    assert diff <= ATOL
    assert train.probs[mask].std() > 1e-3  # the scores differ between candidates: the comparison means something


@pytest.mark.parametrize("mode", MODES)
def test_a_rule_decided_differently_in_serving_changes_the_scores(
    online_world, models, requests, mode: str, monkeypatch
) -> None:
    """The parity check would catch a drifted rule: each wrong rule moves the scores far beyond the tolerance."""
    model = models[mode]
    train = _training_path(model, online_world, requests)
    mask = train.b["cand_mask"].numpy()

    def gap(served: np.ndarray) -> float:
        return float(np.abs(served - train.probs)[mask].max())

    gaps = {}
    with monkeypatch.context() as m:  # history length off by one
        m.setattr(serving.model, "history_len", lambda cfg: history_len(cfg) - 1)
        shorter = ServingModel(model.ranker, model.version, model.content, model.created)
        assert shorter.max_len == model.max_len - 1
        gaps["history_len - 1"] = gap(_served_probs(shorter, online_world, train))
    with monkeypatch.context() as m:  # event times not read: no time gaps
        m.setattr(serving.model, "reads_event_times", lambda cfg: False)
        gaps["no time gaps"] = gap(_served_probs(model, online_world, train))
    # candidate ages taken at the snapshot's time instead of the request's
    snap_s = int(snapshot_timestamp(online_world.snapshot_day).timestamp())
    gaps["age at the snapshot"] = gap(_served_probs(model, online_world, train, snap_s))
    print(f"{mode}: max |served - trained| with a wrong rule: {gaps}")
    for rule, g in gaps.items():
        assert g > 10 * ATOL, (rule, g)
    # and the right rules, once more: within the tolerance
    assert gap(_served_probs(model, online_world, train)) <= ATOL
