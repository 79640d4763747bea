"""The service's request and response models, the id domain, and how errors are written (short previews, one JSON shape)."""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from features.contract import MAX_ID, MIN_ID, PADDING_ID, SURFACES, id_in_domain

MAX_CANDIDATES = 2000
PRIMARY_ACTION = "click"
ADMIN_TOKEN_ENV = "AFM_ADMIN_TOKEN"

#: Largest request body (bytes) the service reads: MAX_CANDIDATES ids as long as MAX_ID, each with
#: up to 8 bytes of separator and pretty-printing whitespace, plus 4 KiB for user_id, surface and
#: the keys. A larger body is refused with 413 before it is read; ``create_app(max_body_bytes=)``
#: and ``afm serve --max-body-bytes`` change it.
MAX_BODY_BYTES = MAX_CANDIDATES * (len(str(MAX_ID)) + 8) + 4096
#: Characters of a client's value an error message shows; the rest is only counted.
PREVIEW_CHARS = 64
#: Problems a 422 body lists; the rest are counted in one last entry.
MAX_PROBLEMS = 10


def _bound_text(n: int) -> str:
    """``n`` as ``2^k-1`` when it is one less than a power of two (how MAX_ID reads best), else in digits."""
    k = (n + 1).bit_length() - 1
    return f"2^{k}-1" if n > 1 and n + 1 == 1 << k else str(n)


#: The id domain as error messages write it, e.g. ``1..2^63-1``.
ID_DOMAIN_TEXT = f"{MIN_ID}..{_bound_text(MAX_ID)}"

_REPR = reprlib.Repr()  # bounded repr of containers (Python 3.11's Repr takes no arguments)
_REPR.maxstring = _REPR.maxother = PREVIEW_CHARS
_REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 6, 4, 2


def clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with how many it had when it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


def preview(value: object) -> str:
    """A short rendering of a client's value for an error message: never the whole of a large input.

    Strings are quoted and cut to PREVIEW_CHARS (``'xxxx…'…(N chars)``), an integer too long to
    print briefly is described by its size (``str`` of a 5,000-digit int is refused by Python),
    containers are abbreviated (``reprlib``).
    """
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 4 * PREVIEW_CHARS:
            return f"<an integer of {value.bit_length()} bits>"
        return clip(str(value))
    if isinstance(value, str):
        return repr(value) if len(value) <= PREVIEW_CHARS else f"{value[:PREVIEW_CHARS]!r}…({len(value)} chars)"
    return clip(_REPR.repr(value))


def _outside_domain(kind: str, value: int) -> str:
    """Why ``value`` (a ``kind`` id: "user" or "item") is refused, for a 422."""
    reason = f"{kind} id {preview(value)} is outside the id domain {ID_DOMAIN_TEXT}"
    if kind == "item" and value == PADDING_ID:
        reason += f" ({PADDING_ID} is the padding id)"
    return reason


def _in_domain(kind: str) -> Callable[[int], int]:
    """A pydantic after-validator refusing ``kind`` ids ("user" or "item") outside the id domain."""

    def check(value: int) -> int:
        if not id_in_domain(value):
            raise ValueError(_outside_domain(kind, value))
        return value

    return check


#: JSON schema of an id: what ``id_in_domain`` accepts (MIN_ID..MAX_ID fits a signed 64-bit integer).
_ID_SCHEMA = {"format": "int64", "minimum": MIN_ID, "maximum": MAX_ID}
UserId = Annotated[StrictInt, AfterValidator(_in_domain("user")), Field(json_schema_extra=_ID_SCHEMA)]
ItemId = Annotated[StrictInt, AfterValidator(_in_domain("item")), Field(json_schema_extra=_ID_SCHEMA)]


# ----------------------------------------------------------------------- schemas
class RankRequest(BaseModel):
    """Body of ``POST /v1/rank``."""

    model_config = ConfigDict(extra="forbid")

    user_id: UserId = Field(description="The user to rank for; an id of the contract's id domain.")
    candidates: list[ItemId] = Field(
        description=f"Item ids to rank: 1 to {MAX_CANDIDATES}, no duplicates, each in the id domain.",
        json_schema_extra={"minItems": 1, "maxItems": MAX_CANDIDATES, "uniqueItems": True},
    )
    surface: str = Field(description="Where the items will be shown.", json_schema_extra={"enum": list(SURFACES)})

    @field_validator("candidates")
    @classmethod
    def _candidates_ok(cls, v: list[int]) -> list[int]:
        if not 1 <= len(v) <= MAX_CANDIDATES:
            raise ValueError(f"candidates must hold 1 to {MAX_CANDIDATES} item ids, got {len(v)}")
        if len(set(v)) != len(v):
            raise ValueError("candidates must not contain duplicate item ids")
        return v

    @field_validator("surface")
    @classmethod
    def _surface_known(cls, v: str) -> str:
        if v not in SURFACES:
            raise ValueError(f"surface must be one of {list(SURFACES)}, got {preview(v)}")
        return v


class RankedItem(BaseModel):
    """One candidate with its probabilities."""

    item_id: ItemId
    score: float = Field(description="Probability of the primary action.")
    scores: dict[str, float] = Field(description="Probability of each action the model predicts.")


class RankResponse(BaseModel):
    """Answer of ``POST /v1/rank``: the candidates, most probable primary action first."""

    model_version: str
    user_id: UserId
    surface: str = Field(json_schema_extra={"enum": list(SURFACES)})
    user_known: bool = Field(description="Whether the online store has the user's sequence.")
    embedding_source: Literal["precomputed", "computed"]
    primary_action: str
    items: list[RankedItem]


class ErrorBody(BaseModel):
    """Every error answer: ``error`` says what went wrong; some errors add fields."""

    model_config = ConfigDict(extra="allow")

    error: str
    problems: list[str] | None = Field(default=None, description="422: each problem of the request.")
    model_version: str | None = Field(default=None, description="Failed reload: the model still served.")


class HealthResponse(BaseModel):
    """``GET /health``: 200 ``ok``/``degraded`` while serving, 503 ``no model``/``warming up``."""

    status: Literal["ok", "degraded", "warming up", "no model"]
    model_version: str | None
    feature_store: str
    actions: list[str] | None = None
    error: str | None = Field(default=None, description="no model: why loading failed.")
    reload_error: str | None = Field(default=None, description="degraded: why the last reload failed.")
    warm_up_error: str | None = Field(default=None, description="degraded: why the start-up warm-up failed.")


class ReadyResponse(BaseModel):
    ready: bool


class LiveResponse(BaseModel):
    live: bool


class ReloadResponse(BaseModel):
    reloaded: bool
    model_version: str
    previous: str | None


_ERROR_DESCRIPTIONS = {
    401: "No valid 'Authorization: Bearer <token>' header (WWW-Authenticate: Bearer).",
    403: "The admin token is not valid.",
    413: "The request body is over the size limit (refused before it is read).",
    422: "The request is not valid; `problems` lists why.",
    500: "The reload failed; the previous model is still served.",
    503: "Not available: no model loaded, the feature store is down, or admin routes are disabled.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of the error statuses ``codes``, all with the ErrorBody schema."""
    return {code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra}, headers=headers)


def problems_response(problems: list[str]) -> JSONResponse:
    """The 422 of an invalid request: at most MAX_PROBLEMS problems, the rest counted."""
    if len(problems) > MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], f"… and {len(problems) - MAX_PROBLEMS} more problems"]
    return error_response(422, "invalid request: " + "; ".join(problems), problems=problems)


def _where(loc: Sequence[Any]) -> str:
    """A pydantic error location as the request writes it: ``candidates[3]``, ``user_id``; ``body`` for the whole."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + clip(str(part))
    return out or "body"


def validation_problem(err: dict[str, Any]) -> str:
    """One validation error as ``where: why``, without the raw input."""
    if err.get("type") == "json_invalid":  # FastAPI: loc = ("body", byte position)
        position = next((p for p in err.get("loc", ())[1:] if isinstance(p, int)), None)
        reason = str((err.get("ctx") or {}).get("error", "malformed"))
        return f"body: not valid JSON ({clip(reason)}{'' if position is None else f' at byte {position}'})"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{_where(err.get('loc', ()))}: {clip(msg, 4 * PREVIEW_CHARS)}"


def exact_id_bounds(node: Any) -> None:
    """Put the exact MIN_ID/MAX_ID back into every int64 schema of an OpenAPI document, in place.

    FastAPI's OpenAPI model stores ``minimum``/``maximum`` as floats, and ``float(2**63 - 1)``
    is 2^63: the spec would admit an id the service refuses.
    """
    if isinstance(node, dict):
        if node.get("format") == "int64":
            for key, exact in (("minimum", MIN_ID), ("maximum", MAX_ID)):
                if isinstance(node.get(key), float) and node[key] == float(exact):
                    node[key] = exact
        for value in node.values():
            exact_id_bounds(value)
    elif isinstance(node, list):
        for value in node:
            exact_id_bounds(value)


# ------------------------------------------------------------ Open Inference Protocol v2
#: The ranker's name in the Open Inference Protocol (KServe v2) routes: ``/v2/models/ranker/infer``.
OIP_MODEL_NAME = "ranker"
#: What ``GET /v2/models/ranker`` says the model runs on: a custom runtime (it reads the features itself).
OIP_PLATFORM = "activityfm"
#: The input tensors of ``/v2/models/ranker/infer``, each once; and its output tensors.
OIP_USER_ID, OIP_CANDIDATE_IDS, OIP_SURFACE = "user_id", "candidate_ids", "surface"
OIP_INPUTS = (OIP_USER_ID, OIP_CANDIDATE_IDS, OIP_SURFACE)
OIP_SCORES, OIP_ACTIONS = "scores", "actions"
OIP_OUTPUTS = (OIP_SCORES, OIP_ACTIONS)
#: Longest inference request ``id`` (echoed in the response).
OIP_MAX_REQUEST_ID_CHARS = 256
#: Bytes an inference body may take beyond ``max_body_bytes`` (the /v1/rank limit): its candidates
#: are the same ids in one JSON array, and the rest is the tensors' envelope (names, datatypes,
#: shapes, outputs: about 300 bytes compact, 550 indented) and an ``id`` of up to 256 characters. The
#: largest valid request written with ``json.dumps(body, indent=2)`` (2,000 ids of 19 digits) fits
#: with about 3 KiB left for ``parameters``; written compactly, with about 19 KiB left.
OIP_ENVELOPE_BYTES = 4096
#: Largest ``/v2/models/ranker/infer`` body by default: MAX_BODY_BYTES + OIP_ENVELOPE_BYTES.
OIP_MAX_BODY_BYTES = MAX_BODY_BYTES + OIP_ENVELOPE_BYTES

_OIP_PARAMETERS_DESCRIPTION = "Key/value parameters (Open Inference Protocol); accepted and ignored."


def _shape_problem(shape: list[int], expected: list[int]) -> ValueError:
    return ValueError(f"shape must be {expected}, got {preview(shape)}")


class _OipInput(BaseModel):
    """What every input tensor of an inference request carries besides its name, datatype, shape and data."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, Any] | None = Field(default=None, description=_OIP_PARAMETERS_DESCRIPTION)


#: JSON schema of a shape of one element: ``[1]``.
_SHAPE_OF_ONE = {"minItems": 1, "maxItems": 1, "items": {"type": "integer", "const": 1}}


class OipUserIdInput(_OipInput):
    """Input ``user_id``: INT64, shape ``[1]``; the user to rank for (an id of the contract's id domain)."""

    name: Literal["user_id"]
    datatype: Literal["INT64"]
    shape: list[StrictInt] = Field(json_schema_extra=_SHAPE_OF_ONE)
    data: list[UserId] = Field(min_length=1, max_length=1)

    @field_validator("shape")
    @classmethod
    def _one_user(cls, v: list[int]) -> list[int]:
        if v != [1]:
            raise _shape_problem(v, [1])
        return v


class OipCandidateIdsInput(_OipInput):
    """Input ``candidate_ids``: INT64, shape ``[C]``; the item ids to score, the same rules as ``/v1/rank``."""

    name: Literal["candidate_ids"]
    datatype: Literal["INT64"]
    shape: list[StrictInt] = Field(
        description="[C], C the number of candidates.",
        json_schema_extra={
            "minItems": 1,
            "maxItems": 1,
            "items": {"type": "integer", "minimum": 1, "maximum": MAX_CANDIDATES},
        },
    )
    data: list[ItemId] = Field(
        description=f"Item ids to score: 1 to {MAX_CANDIDATES}, no duplicates, each in the id domain.",
        json_schema_extra={"minItems": 1, "maxItems": MAX_CANDIDATES, "uniqueItems": True},
    )

    @field_validator("data")
    @classmethod
    def _candidates_ok(cls, v: list[int]) -> list[int]:
        return RankRequest._candidates_ok(v)  # the /v1/rank rules

    @model_validator(mode="after")
    def _shape_matches_data(self) -> OipCandidateIdsInput:
        if self.shape != [len(self.data)]:
            raise _shape_problem(self.shape, [len(self.data)])
        return self


class OipSurfaceInput(_OipInput):
    """Input ``surface``: BYTES, shape ``[1]``; where the items will be shown."""

    name: Literal["surface"]
    datatype: Literal["BYTES"]
    shape: list[StrictInt] = Field(json_schema_extra=_SHAPE_OF_ONE)
    data: list[str] = Field(min_length=1, max_length=1, json_schema_extra={"items": {"enum": list(SURFACES)}})

    @field_validator("shape")
    @classmethod
    def _one_surface(cls, v: list[int]) -> list[int]:
        if v != [1]:
            raise _shape_problem(v, [1])
        return v

    @field_validator("data")
    @classmethod
    def _surface_known(cls, v: list[str]) -> list[str]:
        return [RankRequest._surface_known(s) for s in v]  # the /v1/rank rule


OipInput = Annotated[OipUserIdInput | OipCandidateIdsInput | OipSurfaceInput, Field(discriminator="name")]


class OipRequestedOutput(BaseModel):
    """An output tensor the client wants back."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["scores", "actions"]
    parameters: dict[str, Any] | None = Field(default=None, description=_OIP_PARAMETERS_DESCRIPTION)


class InferRequest(BaseModel):
    """Body of ``POST /v2/models/ranker/infer`` (Open Inference Protocol v2): three named input tensors."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {"name": "user_id", "datatype": "INT64", "shape": [1], "data": [7]},
                        {"name": "candidate_ids", "datatype": "INT64", "shape": [3], "data": [3, 1, 2]},
                        {"name": "surface", "datatype": "BYTES", "shape": [1], "data": ["home"]},
                    ],
                    "outputs": [{"name": "scores"}, {"name": "actions"}],
                }
            ]
        },
    )

    id: str | None = Field(
        default=None, max_length=OIP_MAX_REQUEST_ID_CHARS, description="Echoed in the response when given."
    )
    parameters: dict[str, Any] | None = Field(default=None, description=_OIP_PARAMETERS_DESCRIPTION)
    inputs: list[OipInput] = Field(
        description=f"The tensors {', '.join(OIP_INPUTS)}, each once, in any order.",
        json_schema_extra={"minItems": len(OIP_INPUTS), "maxItems": len(OIP_INPUTS)},
    )
    outputs: list[OipRequestedOutput] | None = Field(
        default=None, min_length=1, description=f"The outputs to return (default: all of {', '.join(OIP_OUTPUTS)})."
    )

    @field_validator("inputs")
    @classmethod
    def _each_input_once(cls, v: list[Any]) -> list[Any]:
        names = [t.name for t in v]
        if sorted(names) != sorted(OIP_INPUTS):
            raise ValueError(f"inputs must be the tensors {list(OIP_INPUTS)}, each once; got {preview(names)}")
        return v

    def tensor(self, name: str) -> Any:
        """The input tensor ``name`` (validation made sure there is exactly one)."""
        return next(t for t in self.inputs if t.name == name)


class OipTensorMetadata(BaseModel):
    """A tensor of the model's metadata; -1 is a dimension of any size."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadataResponse(BaseModel):
    """``GET /v2/models/ranker``: the model's name, served version, platform and tensors."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]


class ModelReadyResponse(BaseModel):
    """``GET /v2/models/ranker/ready``: 200 ready, 503 not (no model loaded, or still warming up)."""

    name: str
    ready: bool


class OipOutput(BaseModel):
    """An output tensor; ``data`` is flat, row-major."""

    name: Literal["scores", "actions"]
    datatype: Literal["FP32", "BYTES"]
    shape: list[int]
    data: list[float] | list[str]


class InferResponseParameters(BaseModel):
    """What ``/v1/rank`` also says about how the request was scored."""

    user_known: bool = Field(description="Whether the online store has the user's sequence.")
    embedding_source: Literal["precomputed", "computed"]
    primary_action: str


class InferResponse(BaseModel):
    """Answer of ``POST /v2/models/ranker/infer``.

    ``scores`` (FP32, shape ``[C, A]``): the probability of each action for each candidate, in the
    order of ``candidate_ids``, flat and row-major (candidate ``i``'s action ``k`` is
    ``data[i * A + k]``); ``actions`` (BYTES, shape ``[A]``): the action of each column.
    """

    model_name: str
    model_version: str
    id: str | None = Field(default=None, description="The request's id, when it had one.")
    parameters: InferResponseParameters
    outputs: list[OipOutput]
