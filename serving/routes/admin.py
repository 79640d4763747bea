"""``POST /admin/reload``, behind the ``$AFM_ADMIN_TOKEN`` bearer token."""

from __future__ import annotations

import hmac
import os

from fastapi import APIRouter, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving.schemas import (
    ADMIN_TOKEN_ENV,
    PREVIEW_CHARS,
    ReloadResponse,
    clip,
    describe,
    error_response,
    error_responses,
)
from serving.state import ServiceState


def admin_router(state: ServiceState) -> APIRouter:
    """``POST /admin/reload``, behind the ``$AFM_ADMIN_TOKEN`` bearer token."""
    router = APIRouter()
    bearer = HTTPBearer(auto_error=False, description=f"The admin token (${ADMIN_TOKEN_ENV}).")

    @router.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses=error_responses(401, 403, 413, 500, 503),
    )
    def reload(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> JSONResponse:
        """Load CURRENT again (after ``afm model promote/rollback``) and serve it once it scored one request."""
        expected = os.environ.get(ADMIN_TOKEN_ENV)
        if not expected:
            return error_response(503, f"admin routes are disabled: set {ADMIN_TOKEN_ENV} to enable them")
        if credentials is None:  # no header, another scheme, or no token
            return error_response(
                401,
                "a valid 'Authorization: Bearer <token>' header is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(credentials.credentials.strip().encode(), expected.encode()):
            return error_response(403, "the admin token is not valid")
        previous = state.model.version if state.model is not None else None
        with state.reload_lock:
            try:
                state.load(score_once=True)
            except Exception as exc:  # noqa: BLE001 - keep serving the old model
                return error_response(
                    500,
                    f"reload failed, still serving {previous}: {clip(describe(exc), 4 * PREVIEW_CHARS)}",
                    model_version=previous,
                )
        assert state.model is not None
        return JSONResponse(content={"reloaded": True, "model_version": state.model.version, "previous": previous})

    return router
