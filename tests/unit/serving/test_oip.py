"""The Open Inference Protocol v2 model routes: metadata, ready, infer (the /v1/rank scores as tensors), errors, limits."""

from __future__ import annotations

import copy
import json
import time

import pytest
from fastapi.testclient import TestClient

from features.config import Layout
from features.contract import MAX_ID, MIN_ID, SURFACES
from serving.app import create_app
from serving.body_limit import limit_for
from serving.online_features import UserRow
from serving.schemas import MAX_BODY_BYTES, MAX_CANDIDATES, OIP_ENVELOPE_BYTES, OIP_MAX_BODY_BYTES

INFER = "/v2/models/ranker/infer"


def _body(user_id=7, candidates=(30, 10, 20), surface="home", **extra) -> dict:
    return {
        "inputs": [
            {"name": "user_id", "datatype": "INT64", "shape": [1], "data": [user_id]},
            {"name": "candidate_ids", "datatype": "INT64", "shape": [len(candidates)], "data": list(candidates)},
            {"name": "surface", "datatype": "BYTES", "shape": [1], "data": [surface]},
        ],
        **extra,
    }


@pytest.fixture
def service(tmp_path, fakes):
    """(client, model, features) of a warmed-up service; user 7 has a stored sequence."""
    model = fakes.TinyModel("r1")
    features = fakes.MemoryFeatures(users={7: UserRow(sequence=fakes.SEQ)})
    app = create_app(
        Layout(tmp_path), model_loader=lambda: model, online_features=features, warm_up_in_background=False
    )
    return TestClient(app), model, features


def _outputs(answer: dict) -> dict[str, dict]:
    return {o["name"]: o for o in answer["outputs"]}


# ---------------------------------------------------------------------- metadata, ready
@pytest.mark.parametrize("path", ["/v2/models/ranker", "/v2/models/ranker/versions/r1"])
def test_metadata_names_the_version_and_the_tensors(service, path):
    client, _, _ = service
    r = client.get(path)
    assert r.status_code == 200
    assert r.json() == {
        "name": "ranker",
        "versions": ["r1"],
        "platform": "activityfm",
        "inputs": [
            {"name": "user_id", "datatype": "INT64", "shape": [1]},
            {"name": "candidate_ids", "datatype": "INT64", "shape": [-1]},
            {"name": "surface", "datatype": "BYTES", "shape": [1]},
        ],
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "actions", "datatype": "BYTES", "shape": [3]},
        ],
    }


@pytest.mark.parametrize(
    ("method", "path", "says"),
    [
        ("get", "/v2/models/other", "unknown model 'other': this server serves 'ranker'"),
        ("get", "/v2/models/other/ready", "unknown model 'other'"),
        ("post", "/v2/models/other/infer", "unknown model 'other'"),
        ("get", "/v2/models/ranker/versions/r0", "model 'ranker' version 'r0' is not served (serving 'r1')"),
        ("get", "/v2/models/ranker/versions/r0/ready", "version 'r0' is not served"),
        ("post", "/v2/models/ranker/versions/r0/infer", "version 'r0' is not served"),
    ],
)
def test_another_model_or_version_is_404(service, method, path, says):
    client, _, features = service
    r = client.request(method, path, json=_body() if method == "post" else None)
    assert r.status_code == 404
    assert says in r.json()["error"]
    assert features.reads == 0


@pytest.mark.parametrize("path", ["/v2/models/ranker/ready", "/v2/models/ranker/versions/r1/ready"])
def test_model_ready_is_200_once_warmed_up_and_503_before(tmp_path, fakes, path):
    features = fakes.MemoryFeatures()
    features.release.clear()  # the warm-up waits
    app = create_app(Layout(tmp_path), model_loader=fakes.TinyModel, online_features=features)
    client = TestClient(app)
    r = client.get(path)
    assert (r.status_code, r.json()) == (503, {"name": "ranker", "ready": False})
    features.release.set()
    deadline = time.monotonic() + 10
    while not app.state.afm.ready and time.monotonic() < deadline:
        time.sleep(0.01)
    r = client.get(path)
    assert (r.status_code, r.json()) == (200, {"name": "ranker", "ready": True})


def test_without_a_model_ready_infer_and_metadata_are_503(tmp_path, fakes):
    def broken():
        raise FileNotFoundError("no CURRENT ranker")

    app = create_app(
        Layout(tmp_path), model_loader=broken, online_features=fakes.MemoryFeatures(), warm_up_in_background=False
    )
    client = TestClient(app)
    r = client.get("/v2/models/ranker/ready")
    assert (r.status_code, r.json()) == (503, {"name": "ranker", "ready": False})
    for r in (client.get("/v2/models/ranker"), client.post(INFER, json=_body())):
        assert r.status_code == 503
        assert r.json()["error"].startswith("no model loaded: FileNotFoundError")


# ------------------------------------------------------------------------------ infer
def test_infer_gives_the_v1_rank_scores_in_request_order(service):
    client, _, _ = service
    candidates = [30, 10, 20, 7]
    r = client.post(INFER, json=_body(candidates=candidates, id="req-1"))
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["model_name"], got["model_version"], got["id"]) == ("ranker", "r1", "req-1")
    ranked = client.post("/v1/rank", json={"user_id": 7, "candidates": candidates, "surface": "home"}).json()
    assert got["parameters"] == {k: ranked[k] for k in ("user_known", "embedding_source", "primary_action")}
    assert got["parameters"]["user_known"] is True

    outputs = _outputs(got)
    actions = outputs["actions"]
    assert actions == {"name": "actions", "datatype": "BYTES", "shape": [3], "data": ["click", "save", "hide"]}
    scores = outputs["scores"]
    assert (scores["datatype"], scores["shape"]) == ("FP32", [4, 3])
    by_item = {it["item_id"]: it["scores"] for it in ranked["items"]}
    assert scores["data"] == [by_item[c][a] for c in candidates for a in actions["data"]]  # row-major, request order
    assert [it["item_id"] for it in ranked["items"]] != candidates  # /v1/rank sorts; infer keeps the order


def test_inputs_come_in_any_order_and_outputs_on_request(service):
    client, _, _ = service
    body = _body(outputs=[{"name": "actions"}])
    body["inputs"].reverse()
    r = client.post(INFER, json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert "id" not in got  # no id asked, none given back
    assert [o["name"] for o in got["outputs"]] == ["actions"]
    r = client.post("/v2/models/ranker/versions/r1/infer", json=_body(outputs=[{"name": "scores"}]))
    assert r.status_code == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["scores"]


def _mutated(change) -> dict:
    body = _body()
    change(body)
    return body


def _set(path: tuple, value):
    def change(body):
        node = body
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (_mutated(_set(("inputs", 0, "data"), [0])), "inputs[0].user_id.data[0]: user id 0 is outside the id domain"),
        (
            _mutated(_set(("inputs", 1, "data"), [1, 0, 2])),
            "inputs[1].candidate_ids.data[1]: item id 0 is outside the id domain 1..2^63-1 (0 is the padding id)",
        ),
        (
            _mutated(_set(("inputs", 1, "data"), [MAX_ID + 1, 2, 3])),
            f"item id {MAX_ID + 1} is outside the id domain",
        ),
        (_mutated(_set(("inputs", 1, "data"), [2, 2, 3])), "must not contain duplicate item ids"),
        (
            _mutated(_set(("inputs", 1), _body(candidates=range(1, MAX_CANDIDATES + 2))["inputs"][1])),
            f"must hold 1 to {MAX_CANDIDATES} item ids, got {MAX_CANDIDATES + 1}",
        ),
        (_mutated(_set(("inputs", 1, "shape"), [2])), "inputs[1].candidate_ids: shape must be [3], got [2]"),
        (_mutated(_set(("inputs", 0, "shape"), [1, 1])), "inputs[0].user_id.shape: shape must be [1], got [1, 1]"),
        (_mutated(_set(("inputs", 0, "data"), ["7"])), "inputs[0].user_id.data[0]: Input should be a valid integer"),
        (_mutated(_set(("inputs", 0, "datatype"), "INT32")), "inputs[0].user_id.datatype: Input should be 'INT64'"),
        (_mutated(_set(("inputs", 2, "data"), ["feed"])), f"surface must be one of {list(SURFACES)}, got 'feed'"),
        (_mutated(_set(("inputs", 2, "name"), "place")), "inputs[2]: Input tag 'place' found using 'name'"),
        (
            _mutated(lambda b: b["inputs"].pop()),
            "inputs: inputs must be the tensors ['user_id', 'candidate_ids', 'surface'], each once",
        ),
        (_mutated(_set(("outputs",), [{"name": "logits"}])), "outputs[0].name: Input should be 'scores' or 'actions'"),
        (_mutated(_set(("id",), "x" * 300)), "id: String should have at most 256 characters"),
        (_mutated(_set(("model",), "ranker")), "model: Extra inputs are not permitted"),
    ],
)
def test_an_invalid_request_is_400_naming_the_problem(service, body, problem):
    client, _, features = service
    r = client.post(INFER, json=body)
    assert r.status_code == 400, r.text
    got = r.json()
    assert any(problem in p for p in got["problems"]), got
    assert got["error"].startswith("invalid request: ")
    assert features.reads == 0  # refused before the store is read


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b'{"inputs": [', "body: not valid JSON"), (b"\xff\xfe{}", "body: not valid JSON"), (b"[]", "body: Input should")],
)
def test_a_body_that_is_not_a_request_object_is_400(service, content, problem):
    client, _, _ = service
    r = client.post(INFER, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["problems"][0].startswith(problem)


def test_a_feature_store_outage_is_503(service):
    client, _, features = service
    features.fail = True
    r = client.post(INFER, json=_body())
    assert r.status_code == 503
    assert r.json()["error"].startswith("feature store unavailable: ConnectionError")


# ------------------------------------------------------------------------- body limit
def test_the_infer_routes_have_room_for_the_tensor_envelope():
    assert limit_for("/v1/rank", MAX_BODY_BYTES) == MAX_BODY_BYTES
    assert limit_for("/v2/models/ranker", MAX_BODY_BYTES) == MAX_BODY_BYTES
    for path in (INFER, "/v2/models/ranker/versions/r1/infer", "/v2/models/other/infer"):
        assert limit_for(path, MAX_BODY_BYTES) == OIP_MAX_BODY_BYTES == MAX_BODY_BYTES + OIP_ENVELOPE_BYTES
    assert limit_for(INFER, 1000) == 1000 + OIP_ENVELOPE_BYTES  # follows --max-body-bytes


def test_the_largest_valid_infer_body_is_served_and_a_byte_more_is_refused_unread(service):
    client, _, features = service
    largest = _body(
        user_id=MAX_ID,
        candidates=[MAX_ID - i for i in range(MAX_CANDIDATES)],  # the longest ids
        surface="related",
        id="x" * 256,
        outputs=[{"name": "scores"}, {"name": "actions"}],
    )
    raw = json.dumps(largest, indent=2).encode()
    assert len(raw) <= OIP_MAX_BODY_BYTES
    assert len(raw) > MAX_BODY_BYTES  # the /v1/rank limit would refuse it
    r = client.post(INFER, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    assert _outputs(r.json())["scores"]["shape"] == [MAX_CANDIDATES, 3]

    reads = features.reads
    over = raw + b" " * (OIP_MAX_BODY_BYTES + 1 - len(raw))  # still valid JSON, one byte over the limit
    r = client.post(INFER, content=over, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"].startswith(
        f"request body of {OIP_MAX_BODY_BYTES + 1} bytes is over the limit of {OIP_MAX_BODY_BYTES} bytes"
    )
    assert features.reads == reads


# ------------------------------------------------------------------------------ spec
@pytest.fixture
def spec(service) -> dict:
    client, _, _ = service
    return client.get("/openapi.json").json()


def _resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


OIP_OPERATIONS = [
    ("/v2/models/{name}", "get", ["200", "404", "503"]),
    ("/v2/models/{name}/versions/{version}", "get", ["200", "404", "503"]),
    ("/v2/models/{name}/ready", "get", ["200", "404", "503"]),
    ("/v2/models/{name}/versions/{version}/ready", "get", ["200", "404", "503"]),
    ("/v2/models/{name}/infer", "post", ["200", "400", "404", "413", "503"]),
    ("/v2/models/{name}/versions/{version}/infer", "post", ["200", "400", "404", "413", "503"]),
]


@pytest.mark.parametrize(("path", "method", "statuses"), OIP_OPERATIONS)
def test_the_spec_declares_each_route_with_its_statuses(spec, path, method, statuses):
    operation = spec["paths"][path][method]
    assert sorted(operation["responses"]) == statuses  # 400, not FastAPI's 422
    (name,) = [p for p in operation["parameters"] if p["name"] == "name"]
    assert (name["in"], name["schema"]["enum"]) == ("path", ["ranker"])
    for status in set(statuses) - {"200"}:
        error = _resolve(spec, operation["responses"][status]["content"]["application/json"]["schema"])
        assert "error" in error["required"] or "ready" in error["required"], (path, status)
    assert "/v1/rank" in spec["paths"]  # the friendly route stays


def test_the_spec_states_the_infer_request_rules(spec):
    body = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    req = _resolve(spec, body)
    assert req["required"] == ["inputs"] and req["additionalProperties"] is False
    inputs = req["properties"]["inputs"]
    assert (inputs["minItems"], inputs["maxItems"]) == (3, 3)
    mapping = inputs["items"]["discriminator"]["mapping"]
    assert sorted(mapping) == ["candidate_ids", "surface", "user_id"]
    tensor = {name: _resolve(spec, {"$ref": ref}) for name, ref in mapping.items()}
    cands = tensor["candidate_ids"]["properties"]["data"]
    assert (cands["minItems"], cands["maxItems"], cands["uniqueItems"]) == (1, MAX_CANDIDATES, True)
    for ids in (cands["items"], tensor["user_id"]["properties"]["data"]["items"]):
        assert (ids["format"], ids["minimum"], ids["maximum"]) == ("int64", MIN_ID, MAX_ID)
    assert tensor["surface"]["properties"]["data"]["items"]["enum"] == list(SURFACES)
    assert tensor["surface"]["properties"]["datatype"]["const"] == "BYTES"
    assert tensor["user_id"]["properties"]["shape"]["items"]["const"] == 1
    assert req["examples"][0]["inputs"][1]["name"] == "candidate_ids"


def test_the_spec_states_the_infer_response(spec):
    ok = spec["paths"]["/v2/models/{name}/infer"]["post"]["responses"]["200"]["content"]["application/json"]
    answer = _resolve(spec, ok["schema"])
    assert {"model_name", "model_version", "outputs"} <= set(answer["required"])
    output = _resolve(spec, answer["properties"]["outputs"]["items"])
    assert output["properties"]["name"]["enum"] == ["scores", "actions"]


def test_the_example_request_of_the_spec_is_served(service, spec):
    client, _, _ = service
    example = copy.deepcopy(_resolve(spec, {"$ref": "#/components/schemas/InferRequest"})["examples"][0])
    r = client.post(INFER, json=example)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "42"
