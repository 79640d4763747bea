"""The Open Inference Protocol v2 (KServe) model routes, with the ranker as the model ``ranker``.

Routes (each also under ``/v2/models/ranker/versions/{version}``, for the version served now)::

    GET  /v2/models/ranker          metadata: {name, versions, platform, inputs, outputs}
    GET  /v2/models/ranker/ready    200 {name, ready: true} | 503 {name, ready: false}
    POST /v2/models/ranker/infer    named tensors → scores

An inference request has three input tensors, each once, in any order: ``user_id`` (INT64,
shape ``[1]``), ``candidate_ids`` (INT64, shape ``[C]``) and ``surface`` (BYTES, shape
``[1]``), under the same rules as ``/v1/rank`` (the id domain, 1 to MAX_CANDIDATES candidates,
no duplicates, a known surface). The answer has two output tensors: ``scores`` (FP32, shape
``[C, A]``, flat and row-major, the rows in the order of ``candidate_ids``) and ``actions``
(BYTES, shape ``[A]``, the action of each column); ``model_version`` is the version that
scored, and ``parameters`` says whether the user was known and where the embedding came from.
A request may ask for some outputs only (``"outputs": [{"name": "scores"}]``).

The scores are those of ``/v1/rank``: the request is scored by its function
(``serving.routes.ranking._rank``), then the ranked items are put back in request order.

Errors are ``{"error": str, ...}``: 400 for a request that is not valid (``problems`` lists
why; FastAPI's validation errors are turned into 400 here, not the 422 of ``/v1/rank``), 404
for another model name or a version not served, 413 for a body over the limit
(``serving.body_limit.limit_for``), 503 without a model or a feature store.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import FastAPI, Path
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, APIRouter
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from serving.routes.ranking import _rank
from serving.schemas import (
    MAX_CANDIDATES,
    OIP_ACTIONS,
    OIP_CANDIDATE_IDS,
    OIP_INPUTS,
    OIP_MODEL_NAME,
    OIP_OUTPUTS,
    OIP_PLATFORM,
    OIP_SCORES,
    OIP_SURFACE,
    OIP_USER_ID,
    PREVIEW_CHARS,
    ErrorBody,
    InferRequest,
    InferResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    RankRequest,
    clip,
    describe,
    error_response,
    preview,
    problems_response,
    validation_problem,
)
from serving.state import RankingModel, ServiceMetrics, ServiceState

_ERRORS: dict[int, str] = {
    400: "The request is not valid; `problems` lists why.",
    404: f"No such model (this server serves '{OIP_MODEL_NAME}'), or the version is not the one served.",
    413: "The request body is over the size limit (refused before it is read).",
    503: "Not available: no model loaded, or the feature store is down.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _ERRORS[code]} for code in codes}


def bad_request(problems: list[str]) -> JSONResponse:
    """The 400 of an invalid inference request: ``{"error", "problems"}`` as /v1/rank's 422 writes them."""
    response = problems_response(problems)
    response.status_code = 400
    return response


class OipRoute(APIRoute):
    """A route whose invalid requests get 400 (Open Inference Protocol), not FastAPI's 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_as_oip(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                return bad_request([validation_problem(err) for err in exc.errors()])
            except StarletteHTTPException as exc:
                # FastAPI could not decode the body (not UTF-8, an integer too long to convert): as malformed JSON
                if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
                    return bad_request([f"body: not valid JSON ({clip(describe(exc.__cause__), 4 * PREVIEW_CHARS)})"])
                raise

        return handle_as_oip


def include_oip_routes(app: FastAPI, state: ServiceState, metrics: ServiceMetrics) -> None:
    """Add the model routes to ``app``, and keep FastAPI's default 422 out of their part of the spec.

    FastAPI documents a 422 (its own validation error body) for every route with parameters;
    these routes answer 400 instead, which they declare.
    """
    app.include_router(oip_router(state, metrics))
    build_spec = app.openapi

    def openapi() -> dict[str, Any]:
        spec = build_spec()  # FastAPI's, cached in app.openapi_schema: the change below is made once
        for path, operations in spec.get("paths", {}).items():
            if path.startswith("/v2/models/"):
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        schemas = spec.get("components", {}).get("schemas", {})
        if "HTTPValidationError" in schemas and "#/components/schemas/HTTPValidationError" not in json.dumps(spec):
            schemas.pop("HTTPValidationError")  # no route answers it any more
            schemas.pop("ValidationError", None)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


#: The model name in a path: the spec lists the one model served; another name gets 404.
ModelName = Annotated[
    str, Path(description="The model: this server serves only 'ranker'.", json_schema_extra={"enum": [OIP_MODEL_NAME]})
]
#: The model version in a path: the one served now (``GET /v2/models/ranker`` lists it); another gets 404.
ModelVersion = Annotated[str, Path(description="The version served now (GET /v2/models/ranker lists it).")]


def oip_router(state: ServiceState, metrics: ServiceMetrics) -> APIRouter:
    """The Open Inference Protocol v2 model routes (metadata, ready, infer), with and without a version."""
    router = APIRouter(route_class=OipRoute)

    def _not_served(name: str, version: str | None, model: RankingModel | None) -> JSONResponse | None:
        """The 404 of another model name, or of a version other than the one served; ``None`` when served."""
        if name != OIP_MODEL_NAME:
            return error_response(404, f"unknown model {preview(name)}: this server serves '{OIP_MODEL_NAME}'")
        if version is not None and model is not None and version != model.version:
            return error_response(
                404, f"model '{OIP_MODEL_NAME}' version {preview(version)} is not served (serving {model.version!r})"
            )
        return None

    def _no_model() -> JSONResponse:
        return error_response(503, f"no model loaded: {state.load_error}")

    # ------------------------------------------------------------------ metadata
    def metadata(name: str, version: str | None) -> JSONResponse:
        model = state.model
        if (refused := _not_served(name, version, model)) is not None:
            return refused
        if model is None:
            return _no_model()
        n_actions = len(model.actions)
        return JSONResponse(
            content={
                "name": OIP_MODEL_NAME,
                "versions": [model.version],
                "platform": OIP_PLATFORM,
                "inputs": [
                    {"name": OIP_USER_ID, "datatype": "INT64", "shape": [1]},
                    {"name": OIP_CANDIDATE_IDS, "datatype": "INT64", "shape": [-1]},
                    {"name": OIP_SURFACE, "datatype": "BYTES", "shape": [1]},
                ],
                "outputs": [
                    {"name": OIP_SCORES, "datatype": "FP32", "shape": [-1, n_actions]},
                    {"name": OIP_ACTIONS, "datatype": "BYTES", "shape": [n_actions]},
                ],
            }
        )

    metadata_doc = dict(
        response_model=ModelMetadataResponse,
        responses=_errors(404, 503),
        summary="Model metadata",
        description=(
            f"The ranker's name ('{OIP_MODEL_NAME}'), the version served, and its tensors: inputs "
            f"{', '.join(OIP_INPUTS)}; outputs {', '.join(OIP_OUTPUTS)} (-1: a dimension of any size)."
        ),
    )

    @router.get("/v2/models/{name}", **metadata_doc)
    def model_metadata(name: ModelName) -> JSONResponse:
        return metadata(name, None)

    @router.get("/v2/models/{name}/versions/{version}", **metadata_doc)
    def model_version_metadata(name: ModelName, version: ModelVersion) -> JSONResponse:
        return metadata(name, version)

    # --------------------------------------------------------------------- ready
    def ready(name: str, version: str | None) -> JSONResponse:
        model = state.model
        if (refused := _not_served(name, version, model)) is not None:
            return refused
        ok = state.ready
        return JSONResponse(status_code=200 if ok else 503, content={"name": OIP_MODEL_NAME, "ready": ok})

    ready_doc = dict(
        response_model=ModelReadyResponse,
        responses={
            503: {"model": ModelReadyResponse, "description": "No model loaded, or still warming up."},
            **_errors(404),
        },
        summary="Model ready",
        description="200 when the ranker is loaded and warmed up, else 503 (as `/v2/health/ready`).",
    )

    @router.get("/v2/models/{name}/ready", **ready_doc)
    def model_ready(name: ModelName) -> JSONResponse:
        return ready(name, None)

    @router.get("/v2/models/{name}/versions/{version}/ready", **ready_doc)
    def model_version_ready(name: ModelName, version: ModelVersion) -> JSONResponse:
        return ready(name, version)

    # --------------------------------------------------------------------- infer
    def infer(name: str, version: str | None, req: InferRequest) -> JSONResponse:
        model = state.model
        if (refused := _not_served(name, version, model)) is not None:
            return refused
        if model is None:
            return _no_model()
        try:  # the tensors were validated by the /v1/rank rules already
            rank_req = RankRequest(
                user_id=req.tensor(OIP_USER_ID).data[0],
                candidates=req.tensor(OIP_CANDIDATE_IDS).data,
                surface=req.tensor(OIP_SURFACE).data[0],
            )
        except ValidationError as exc:
            return bad_request([validation_problem(err) for err in exc.errors()])
        ranked = _rank(state, metrics, rank_req)
        if ranked.status_code != 200:
            return ranked
        body = json.loads(ranked.body)
        if version is not None and body["model_version"] != version:  # reloaded during the request
            return error_response(
                404,
                f"model '{OIP_MODEL_NAME}' version {preview(version)} is not served any more "
                f"(replaced by {body['model_version']!r})",
            )
        return JSONResponse(content=_infer_response(req, body, rank_req.candidates))

    infer_doc = dict(
        response_model=InferResponse,
        responses=_errors(400, 404, 413, 503),
        summary="Score candidates (Open Inference Protocol v2)",
        description=(
            f"Inputs `{OIP_USER_ID}` (INT64 [1]), `{OIP_CANDIDATE_IDS}` (INT64 [C], 1 to {MAX_CANDIDATES}, "
            f"no duplicates) and `{OIP_SURFACE}` (BYTES [1]); outputs `{OIP_SCORES}` (FP32 [C, A], flat and "
            f"row-major, rows in the order of `{OIP_CANDIDATE_IDS}`) and `{OIP_ACTIONS}` (BYTES [A], the action "
            "of each column). The same scores as `POST /v1/rank`."
        ),
    )

    @router.post("/v2/models/{name}/infer", **infer_doc)
    def model_infer(name: ModelName, req: InferRequest) -> JSONResponse:
        return infer(name, None, req)

    @router.post("/v2/models/{name}/versions/{version}/infer", **infer_doc)
    def model_version_infer(name: ModelName, version: ModelVersion, req: InferRequest) -> JSONResponse:
        return infer(name, version, req)

    return router


def _infer_response(req: InferRequest, ranked: dict[str, Any], candidates: list[int]) -> dict[str, Any]:
    """``/v1/rank``'s answer ``ranked`` as an inference response: the scores in the order of ``candidates``."""
    scores_of = {item["item_id"]: item["scores"] for item in ranked["items"]}  # action → probability
    actions = list(scores_of[candidates[0]])  # the model's action order (every item lists them in it)
    outputs = {
        OIP_SCORES: {
            "name": OIP_SCORES,
            "datatype": "FP32",
            "shape": [len(candidates), len(actions)],
            "data": [scores_of[c][a] for c in candidates for a in actions],  # (C, A) row-major
        },
        OIP_ACTIONS: {"name": OIP_ACTIONS, "datatype": "BYTES", "shape": [len(actions)], "data": actions},
    }
    wanted = OIP_OUTPUTS if req.outputs is None else tuple(dict.fromkeys(o.name for o in req.outputs))
    content: dict[str, Any] = {"model_name": OIP_MODEL_NAME, "model_version": ranked["model_version"]}
    if req.id is not None:
        content["id"] = req.id
    content |= {
        "parameters": {
            "user_known": ranked["user_known"],
            "embedding_source": ranked["embedding_source"],
            "primary_action": ranked["primary_action"],
        },
        "outputs": [outputs[name] for name in wanted],
    }
    return content
