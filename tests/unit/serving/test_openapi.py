"""The served OpenAPI spec states what the service enforces, and the service keeps to it (schemathesis)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from features.config import Layout
from features.contract import MAX_ID, MIN_ID, SURFACES
from features.store import RealtimeSequence
from serving.app import create_app
from serving.online_features import UserRow
from serving.schemas import MAX_CANDIDATES

ADMIN_TOKEN = "s3cret"


class ConstModel:
    """A ranker double: click probability falls with the candidate's position; a user embedding of one number."""

    version = "r1"
    actions = ("click", "save", "hide")
    embedding_dim = 1

    def user_embeddings(self, sequences: list[dict]) -> np.ndarray:
        return np.array([[len(s["item_ids"])] for s in sequences], np.float32)  # (U, 1)

    def score(self, user_embedding, candidates, surface, content=None, sequence=None) -> np.ndarray:
        click = 1.0 / (2.0 + np.arange(len(candidates), dtype=np.float32))  # (C,)
        return np.stack([click, click / 2, 1 - click], axis=1)  # (C, 3)


class DictFeatures:
    """Online features of user 1 (sequence + a precomputed r1 embedding) and item 2's content; realtime rows in memory."""

    def __init__(self) -> None:
        self.rows: dict[int, RealtimeSequence] = {}

    def status(self) -> str:
        return "ok"

    def warm_up(self) -> None:
        pass

    def user(self, user_id: int) -> UserRow:
        if user_id != 1:
            return UserRow()
        seq = {"item_ids": [5, 6], "actions": ["click", "save"], "surfaces": ["home", "home"]}
        return UserRow(sequence=seq, embedding=[2.0], model_version="r1")

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]:
        return {2: [0.5, 0.5]} if 2 in item_ids else {}

    def realtime(self, user_ids: Sequence[int]) -> dict[int, RealtimeSequence]:  # POST /v1/events: rows in memory
        return {u: self.rows[u] for u in user_ids if u in self.rows}

    def push_realtime(self, rows: dict[int, RealtimeSequence]) -> int:
        self.rows.update(rows)
        return len(rows)


#: The service under test, built at import: schemathesis loads its spec when this module is collected.
APP = create_app(
    Layout(Path(tempfile.gettempdir()) / "afm-openapi-test-unused"),
    model_loader=ConstModel,
    online_features=DictFeatures(),
    warm_up_in_background=False,
)


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("AFM_ADMIN_TOKEN", ADMIN_TOKEN)  # else /admin/reload answers 503 (disabled)


@pytest.fixture(scope="module")
def spec() -> dict:
    r = TestClient(APP).get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def _resolve(spec: dict, node: dict) -> dict:
    """``node`` with a local ``$ref`` followed."""
    while "$ref" in node:
        *_, name = node["$ref"].split("/")
        node = spec["components"]["schemas"][name]
    return node


def _json_schema(spec: dict, path: str, method: str, status: str) -> dict:
    return _resolve(spec, spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"])


def test_rank_request_schema_states_the_enforced_constraints(spec):
    body = spec["paths"]["/v1/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    req = _resolve(spec, body)
    props = req["properties"]
    assert set(req["required"]) == {"user_id", "candidates", "surface"}
    assert req["additionalProperties"] is False
    assert props["surface"]["enum"] == list(SURFACES)
    cands = props["candidates"]
    assert (cands["minItems"], cands["maxItems"], cands["uniqueItems"]) == (1, MAX_CANDIDATES, True)
    for ids in (cands["items"], props["user_id"]):
        assert ids["type"] == "integer" and ids["format"] == "int64"
        assert (ids["minimum"], ids["maximum"]) == (MIN_ID, MAX_ID)


@pytest.mark.parametrize(
    ("path", "method", "errors"),
    [
        ("/v1/rank", "post", ["413", "422", "503"]),
        ("/admin/reload", "post", ["401", "403", "413", "500", "503"]),
    ],
)
def test_error_responses_are_declared_with_the_error_body(spec, path, method, errors):
    assert set(errors) <= set(spec["paths"][path][method]["responses"])
    for status in errors:
        error = _json_schema(spec, path, method, status)
        assert "error" in error["required"] and error["properties"]["error"]["type"] == "string", status


@pytest.mark.parametrize(("path", "field"), [("/health", "status"), ("/v2/health/ready", "ready")])
def test_not_ready_is_declared(spec, path, field):
    assert field in _json_schema(spec, path, "get", "503")["required"]


def test_response_models_are_declared(spec):
    rank = _json_schema(spec, "/v1/rank", "post", "200")
    assert {"model_version", "items", "embedding_source"} <= set(rank["required"])
    item = _resolve(spec, rank["properties"]["items"]["items"])
    assert item["properties"]["item_id"]["minimum"] == MIN_ID
    health = _json_schema(spec, "/health", "get", "200")
    assert set(health["properties"]["status"]["enum"]) == {"ok", "degraded", "warming up", "no model"}
    assert "text/plain" in "".join(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"])


def test_admin_reload_declares_bearer_auth(spec):
    schemes = spec["components"]["securitySchemes"]
    (name,) = [n for n, s in schemes.items() if (s["type"], s.get("scheme")) == ("http", "bearer")]
    assert {name: []} in spec["paths"]["/admin/reload"]["post"]["security"]


# ----------------------------------------------------------------------- schemathesis
#: A bounded run: at most ~50 generated cases per operation, the same cases on every run, no example database.
SCHEMATHESIS_CONFIG = {
    "seed": 20260105,
    "generation": {"mode": "all", "max-examples": 50, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
}
#: No 5xx; every status, content type and body as the spec declares; and every request the spec rules
#: out is refused (the spec is not looser than the code). Not positive_data_acceptance: JSON Schema
#: counts 1.0 as an integer, and the service refuses ids written as floats (above 2^53 a float is not
#: the id the client meant).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=schemathesis.Config.from_dict(SCHEMATHESIS_CONFIG))


@pytest.fixture(scope="module")
def run_clock():
    """Wall time of the whole schemathesis run (all operations), asserted to stay well under a minute."""
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    print(f"schemathesis {schemathesis.__version__}: {elapsed:.1f} s")
    assert elapsed < 60, f"the schemathesis run took {elapsed:.1f} s"


@schema.parametrize()
def test_the_service_conforms_to_its_spec(case, run_clock):
    case.call_and_validate(checks=CHECKS)
