"""HTTP layer of the scoring service, with a tiny deterministic model and in-memory features (conftest.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from features.config import Layout
from features.contract import MAX_ID, MIN_ID, SURFACES
from serving.app import create_app
from serving.online_features import UserRow
from serving.schemas import MAX_BODY_BYTES, MAX_CANDIDATES

ADMIN = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def setup(tmp_path, fakes):
    model = fakes.TinyModel("r1")
    feats = fakes.MemoryFeatures(
        users={
            1: UserRow(sequence=fakes.SEQ, embedding=[10.0, 20.0], model_version="r1"),
            2: UserRow(sequence=fakes.SEQ, embedding=[10.0, 20.0], model_version="r0"),  # another version
        }
    )
    loaded = {"model": model}
    app = create_app(
        Layout(tmp_path), model_loader=lambda: loaded["model"], online_features=feats, warm_up_in_background=False
    )
    return TestClient(app), model, feats, loaded


def _rank(client, **body):
    payload = {"user_id": 1, "candidates": [1, 2, 3, 4], "surface": "home", **body}
    return client.post("/v1/rank", json=payload)


def _wait_until(predicate, timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passed; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_health_ok_with_model(setup):
    client, *_ = setup
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["model_version"] == "r1" and r.json()["feature_store"] == "ok"


def test_health_503_without_model(tmp_path, fakes):
    def no_model():
        raise FileNotFoundError("no ranker is promoted")

    app = create_app(
        Layout(tmp_path), model_loader=no_model, online_features=fakes.MemoryFeatures(), warm_up_in_background=False
    )
    client = TestClient(app)
    r = client.get("/health")
    assert r.status_code == 503
    assert "no ranker is promoted" in r.json()["error"]
    assert client.get("/v2/health/ready").status_code == 503
    r = _rank(client)
    assert r.status_code == 503 and "no model loaded" in r.json()["error"]


def test_rank_sorted_by_click_probability_with_all_actions(setup):
    client, model, *_ = setup
    r = _rank(client, candidates=[3, 10, 4, 1])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "r1" and body["user_id"] == 1 and body["surface"] == "home"
    ids = [it["item_id"] for it in body["items"]]
    scores = [it["score"] for it in body["items"]]
    assert sorted(ids) == [1, 3, 4, 10]
    assert scores == sorted(scores, reverse=True)
    assert ids[0] == 4  # 4 % 7 - 3 = 1 is the largest logit
    for it in body["items"]:
        assert set(it["scores"]) == {"click", "save", "hide"}
        assert it["score"] == it["scores"]["click"]


def test_precomputed_embedding_used_only_for_the_same_version(setup, fakes):
    client, model, *_ = setup
    embedded_before = len(model.embedded)  # the start-up warm-up pass computed one
    r = _rank(client, user_id=1)
    assert r.json()["embedding_source"] == "precomputed" and r.json()["user_known"] is True
    np.testing.assert_allclose(model.scored_with[-1], [10.0, 20.0])
    assert len(model.embedded) == embedded_before

    r = _rank(client, user_id=2)  # stored embedding is from r0; model is r1
    assert r.json()["embedding_source"] == "computed" and r.json()["user_known"] is True
    assert model.embedded[-1] == [fakes.SEQ]
    np.testing.assert_allclose(model.scored_with[-1], [2.0, 11.0])


def test_unknown_user_gets_empty_sequence(setup):
    client, model, *_ = setup
    r = _rank(client, user_id=999)
    assert r.status_code == 200
    assert r.json()["user_known"] is False and r.json()["embedding_source"] == "computed"
    assert model.embedded[-1] == [{"item_ids": [], "actions": [], "surfaces": []}]


def test_item_content_from_store_is_passed_to_the_model(tmp_path, fakes):
    feats = fakes.MemoryFeatures(content={2: [0.1, 0.2]})
    app = create_app(
        Layout(tmp_path), model_loader=lambda: fakes.TinyModel(), online_features=feats, warm_up_in_background=False
    )
    r = _rank(TestClient(app), candidates=[1, 2, 3])
    assert r.json()["items"][0]["item_id"] == 2


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"candidates": []}, "candidates must hold 1 to 2000 item ids, got 0"),
        ({"candidates": list(range(1, MAX_CANDIDATES + 2))}, "got 2001"),
        ({"candidates": [1, 1]}, "duplicate"),
        ({"candidates": ["a"]}, "candidates[0]"),
        ({"surface": "moon"}, "surface must be one of"),
        ({"user_id": "7"}, "user_id"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_requests_are_422_with_a_clear_message(setup, body, needle):
    client, *_ = setup
    r = _rank(client, **body)
    assert r.status_code == 422
    assert needle in r.json()["error"], r.json()


def test_missing_field_is_422(setup):
    client, *_ = setup
    r = client.post("/v1/rank", json={"user_id": 1, "surface": "home"})
    assert r.status_code == 422 and "candidates" in r.json()["error"]


# ------------------------------------------------------------------------ the id domain
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"candidates": [0, 963, 1181]},
            "candidates[0]: item id 0 is outside the id domain 1..2^63-1 (0 is the padding id)",
        ),
        ({"candidates": [963, -5]}, "candidates[1]: item id -5 is outside the id domain 1..2^63-1"),
        ({"candidates": [7, MAX_ID + 1]}, f"candidates[1]: item id {MAX_ID + 1} is outside the id domain 1..2^63-1"),
        ({"user_id": 0}, "user_id: user id 0 is outside the id domain 1..2^63-1"),
        ({"user_id": -(2**63)}, f"user_id: user id {-(2**63)} is outside the id domain 1..2^63-1"),
    ],
)
def test_ids_outside_the_id_domain_are_422_and_never_scored(setup, body, message):
    client, model, feats, _ = setup
    scored, reads = len(model.scored_with), feats.reads
    r = _rank(client, **body)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"], r.json()
    assert (len(model.scored_with), feats.reads) == (scored, reads)  # refused before any lookup or scoring


def test_every_out_of_domain_candidate_is_named(setup):
    client, *_ = setup
    r = _rank(client, candidates=[0, 5, -1, MAX_ID + 1])
    assert r.status_code == 422
    assert r.json()["problems"] == [
        "candidates[0]: item id 0 is outside the id domain 1..2^63-1 (0 is the padding id)",
        "candidates[2]: item id -1 is outside the id domain 1..2^63-1",
        f"candidates[3]: item id {MAX_ID + 1} is outside the id domain 1..2^63-1",
    ]


def test_the_ends_of_the_id_domain_are_accepted(setup):
    client, *_ = setup
    r = _rank(client, user_id=MAX_ID, candidates=[MIN_ID, MAX_ID])
    assert r.status_code == 200, r.text
    assert sorted(it["item_id"] for it in r.json()["items"]) == [MIN_ID, MAX_ID]


# ---------------------------------------------------------------------- request size
def test_default_body_limit_admits_the_largest_valid_request(setup):
    client, *_ = setup
    candidates = list(range(MAX_ID - MAX_CANDIDATES + 1, MAX_ID + 1))  # 2000 ids of 19 digits
    body = json.dumps({"user_id": MAX_ID, "candidates": candidates, "surface": "related"}, indent=2).encode()
    assert len(body) <= MAX_BODY_BYTES
    r = client.post("/v1/rank", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["items"]) == MAX_CANDIDATES


def test_oversized_body_with_content_length_is_413_before_parsing(setup):
    client, model, feats, _ = setup
    body = json.dumps({"user_id": 1, "candidates": list(range(1, 3_000_001)), "surface": "home"}).encode()
    assert len(body) > 20_000_000  # the probe's 30 MB body
    r = client.post("/v1/rank", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"] == (
        f"request body of {len(body)} bytes is over the limit of {MAX_BODY_BYTES} bytes;"
        f" send at most {MAX_CANDIDATES} candidates per request"
    )
    assert feats.reads == 0 and len(model.scored_with) == 1  # only the start-up warm-up pass scored


def test_oversized_streamed_body_without_content_length_is_413(setup):
    client, _, feats, _ = setup
    sent = []

    def chunks():
        for _ in range(2_000):  # 2000 chunks of 16 KiB: 32 MiB, chunked (no Content-Length)
            sent.append(1)
            yield b" " * 16_384

    r = client.post("/v1/rank", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"].startswith(f"request body is over the limit of {MAX_BODY_BYTES} bytes")
    assert feats.reads == 0


def test_body_limit_is_configurable(tmp_path, fakes):
    app = create_app(
        Layout(tmp_path),
        model_loader=lambda: fakes.TinyModel(),
        online_features=fakes.MemoryFeatures(),
        warm_up_in_background=False,
        max_body_bytes=100,
    )
    client = TestClient(app)
    assert _rank(client, candidates=[1]).status_code == 200  # 50-odd bytes
    r = _rank(client, candidates=list(range(1, 40)))
    assert r.status_code == 413 and "over the limit of 100 bytes" in r.json()["error"]
    with pytest.raises(ValueError, match="max_body_bytes must be a positive number of bytes, got 0"):
        create_app(
            Layout(tmp_path), model_loader=fakes.TinyModel, online_features=fakes.MemoryFeatures(), max_body_bytes=0
        )


# -------------------------------------------------------------- no large echoes in errors
def _roomy_client(tmp_path, fakes) -> TestClient:
    """A service whose body limit lets a 1 MB field through to validation."""
    app = create_app(
        Layout(tmp_path),
        model_loader=lambda: fakes.TinyModel(),
        online_features=fakes.MemoryFeatures(),
        warm_up_in_background=False,
        max_body_bytes=8_000_000,
    )
    return TestClient(app)


def test_a_huge_surface_is_not_echoed_in_the_422(tmp_path, fakes):
    client = _roomy_client(tmp_path, fakes)
    r = _rank(client, surface="x" * 1_000_000)
    assert r.status_code == 422
    assert len(r.content) < 2_000, len(r.content)
    body = r.json()
    assert "surface must be one of" in body["error"] and "…(1000000 chars)" in body["error"]
    assert all(isinstance(p, str) for p in body["problems"])  # no raw pydantic `input`


def test_huge_keys_and_many_problems_stay_short(tmp_path, fakes):
    client = _roomy_client(tmp_path, fakes)
    r = client.post(
        "/v1/rank", json={"user_id": 1, "candidates": ["a"] * MAX_CANDIDATES, "surface": "home", "k" * 500_000: 1}
    )
    assert r.status_code == 422
    assert len(r.content) < 4_000, len(r.content)
    body = r.json()
    assert len(body["problems"]) <= 11 and body["problems"][-1].startswith("… and ")


@pytest.mark.parametrize(
    ("digits", "needle"),
    [
        (4_000, "user_id: user id <an integer of 13288 bits> is outside the id domain"),
        (5_000, "body: not valid JSON (ValueError: Exceeds the limit (4300 digits)"),  # Python's json refuses it
    ],
)
def test_a_huge_integer_is_422_and_not_echoed(tmp_path, fakes, digits, needle):
    client = _roomy_client(tmp_path, fakes)
    body = b'{"user_id": ' + b"9" * digits + b', "candidates": [1], "surface": "home"}'
    r = client.post("/v1/rank", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text[:300]
    assert len(r.content) < 2_000, len(r.content)
    assert needle in r.json()["error"], r.json()


# --------------------------------------------------------------------------- warm-up
def test_start_up_warms_the_store_and_runs_one_scoring_pass(setup):
    client, model, feats, _ = setup
    assert feats.warm_ups == 1
    assert len(model.embedded) == 1 and len(model.scored_with) == 1
    assert client.get("/v2/health/ready").status_code == 200


def test_not_ready_until_the_background_warm_up_finished(tmp_path, fakes):
    feats = fakes.MemoryFeatures()
    feats.release.clear()  # the store "opens" only when the test says so
    model = fakes.TinyModel()
    client = TestClient(create_app(Layout(tmp_path), model_loader=lambda: model, online_features=feats))
    assert _wait_until(lambda: feats.warm_ups == 1)
    r = client.get("/v2/health/ready")
    assert r.status_code == 503 and r.json()["ready"] is False
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "warming up"
    assert model.scored_with == []

    feats.release.set()
    assert _wait_until(lambda: client.get("/v2/health/ready").status_code == 200)
    assert client.get("/health").json()["status"] == "ok"
    assert len(model.scored_with) == 1


def test_features_without_warm_up_still_serve(tmp_path, fakes):
    model = fakes.TinyModel()
    app = create_app(Layout(tmp_path), model_loader=lambda: model, online_features=fakes.FeaturesWithoutWarmUp())
    client = TestClient(app)
    assert _wait_until(lambda: client.get("/v2/health/ready").status_code == 200)
    assert len(model.scored_with) == 1  # the model pass still ran
    assert _rank(client).status_code == 200


def test_a_failed_warm_up_is_reported_and_the_service_still_serves(tmp_path, fakes):
    feats = fakes.MemoryFeatures()
    feats.warm_up_error = ConnectionError("redis is not reachable")
    app = create_app(Layout(tmp_path), model_loader=fakes.TinyModel, online_features=feats, warm_up_in_background=False)
    client = TestClient(app)
    body = client.get("/health").json()
    assert body["status"] == "degraded" and "redis is not reachable" in body["warm_up_error"]
    assert client.get("/v2/health/ready").status_code == 200  # finished; requests retry opening the store
    assert _rank(client).status_code == 200


# ----------------------------------------------------------------------------- admin
def test_admin_reload_auth(setup, monkeypatch, fakes):
    client, _, _, loaded = setup
    monkeypatch.delenv("AFM_ADMIN_TOKEN", raising=False)
    assert client.post("/admin/reload").status_code == 503

    monkeypatch.setenv("AFM_ADMIN_TOKEN", "s3cret")
    for headers in ({}, {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer"}, {"Authorization": "s3cret"}):
        r = client.post("/admin/reload", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["WWW-Authenticate"] == "Bearer", headers
        assert "Authorization: Bearer" in r.json()["error"]
    r = client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403 and "WWW-Authenticate" not in r.headers
    assert r.json()["error"] == "the admin token is not valid"

    loaded["model"] = fakes.TinyModel("r2")
    r = client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"reloaded": True, "model_version": "r2", "previous": "r1"}
    assert client.get("/health").json()["model_version"] == "r2"
    # user 1's stored embedding is r1's: after the reload it must not be used
    assert _rank(client, user_id=1).json()["embedding_source"] == "computed"


def test_admin_reload_failure_keeps_the_old_model(setup, monkeypatch):
    client, _, _, loaded = setup
    monkeypatch.setenv("AFM_ADMIN_TOKEN", "s3cret")

    def boom():
        raise RuntimeError("corrupt artifact")

    client.app.state.afm.loader = boom
    r = client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 500 and "corrupt artifact" in r.json()["error"]
    assert client.get("/health").json()["model_version"] == "r1"


def test_health_is_degraded_after_a_failed_reload_until_one_succeeds(setup, monkeypatch, fakes):
    client, _, _, loaded = setup
    monkeypatch.setenv("AFM_ADMIN_TOKEN", "s3cret")
    good_loader = client.app.state.afm.loader

    def boom():
        raise RuntimeError("corrupt artifact")

    client.app.state.afm.loader = boom
    assert client.post("/admin/reload", headers=ADMIN).status_code == 500
    r = client.get("/health")
    assert r.status_code == 200  # still serving r1
    assert r.json()["status"] == "degraded" and r.json()["model_version"] == "r1"
    assert r.json()["reload_error"] == "RuntimeError: corrupt artifact"
    assert client.get("/v2/health/ready").status_code == 200

    client.app.state.afm.loader = good_loader
    loaded["model"] = fakes.TinyModel("r2")
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model_version"] == "r2"
    assert "reload_error" not in r.json()


def test_a_reloaded_model_is_warmed_before_it_serves(setup, monkeypatch, fakes):
    client, _, _, loaded = setup
    monkeypatch.setenv("AFM_ADMIN_TOKEN", "s3cret")
    loaded["model"] = new = fakes.TinyModel("r2")
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200
    assert len(new.scored_with) == 1  # one pass before the swap


# ----------------------------------------------------------------------------- misc
def test_feature_store_down_is_503(setup):
    client, _, feats, _ = setup
    feats.fail = True
    r = _rank(client)
    assert r.status_code == 503 and "online store is down" in r.json()["error"]


def test_metrics_count_requests_by_route(setup):
    client, *_ = setup
    _rank(client)
    _rank(client, candidates=[])
    text = client.get("/metrics").text
    assert 'afm_http_requests_total{method="POST",route="/v1/rank",status="200"} 1.0' in text
    assert 'afm_http_requests_total{method="POST",route="/v1/rank",status="422"} 1.0' in text
    assert 'afm_http_request_seconds_count{route="/v1/rank"} 2.0' in text
    assert 'afm_rank_embedding_source_total{source="precomputed"} 1.0' in text


def test_surfaces_of_the_contract_are_accepted(setup):
    client, *_ = setup
    for surface in SURFACES:
        assert _rank(client, surface=surface).status_code == 200, surface


def server_timing(header: str) -> dict[str, float]:
    """``features;dur=1.2, model;dur=3.4`` → ``{"features": 1.2, "model": 3.4}``."""
    entries = (part.strip().split(";dur=") for part in header.split(","))
    return {name: float(dur) for name, dur in entries}


def test_rank_answers_server_timing_of_the_store_read_the_wait_and_the_model(setup):
    client, *_ = setup
    resp = _rank(client)
    timing = server_timing(resp.headers["server-timing"])
    assert set(timing) == {"features", "queue", "model"} and all(v >= 0 for v in timing.values())


def test_one_request_at_a_time_in_the_model_by_default(tmp_path, fakes, monkeypatch):
    """AFM_MODEL_CONCURRENCY=1: a second request waits (``queue``) while the first is inside the model."""
    import threading

    class SlowModel(fakes.TinyModel):
        inside = 0
        most_inside = 0

        def score(self, *args, **kwargs):
            SlowModel.inside += 1
            SlowModel.most_inside = max(SlowModel.most_inside, SlowModel.inside)
            time.sleep(0.2)
            SlowModel.inside -= 1
            return super().score(*args, **kwargs)

    def served_with(concurrency: str) -> tuple[int, list[dict]]:
        monkeypatch.setenv("AFM_MODEL_CONCURRENCY", concurrency)
        SlowModel.most_inside = 0
        model = SlowModel("r1")
        app = create_app(Layout(tmp_path), model_loader=lambda: model, online_features=fakes.MemoryFeatures(),
                         warm_up_in_background=False)  # fmt: skip
        client, timings = TestClient(app), []

        def one() -> None:
            timings.append(server_timing(_rank(client).headers["server-timing"]))

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return SlowModel.most_inside, timings

    inside, timings = served_with("1")
    assert inside == 1 and len(timings) == 3
    assert max(t["queue"] for t in timings) >= 150  # ms: someone waited for a pass to finish
    inside, _ = served_with("3")
    assert inside > 1


def test_an_oversized_events_batch_is_told_to_send_fewer_events(setup):
    client, *_ = setup
    events = [{"event_id": f"e-{i}", "user_id": 1, "item_id": 2, "action": "click"} for i in range(40_000)]
    r = client.post("/v1/events", json={"events": events})
    assert r.status_code == 413
    assert "send fewer events per batch" in r.json()["error"] and "candidates" not in r.json()["error"]
