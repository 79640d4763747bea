"""ASGI middleware that refuses an oversized request body (413) before the app reads or parses it."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.schemas import MAX_CANDIDATES, OIP_ENVELOPE_BYTES

#: The Open Inference Protocol inference routes: their bodies carry the candidates in a tensor envelope.
OIP_INFER_PATH = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer")


#: What a client sends less of, per route (the 413's hint).
EVENTS_PATH = "/v1/events"
EVENTS_HINT = "send fewer events per batch (afm events push sends 100 a batch)"


def hint_for(path: str) -> str:
    """How to get under the limit on ``path``: fewer events on ``/v1/events``, fewer candidates elsewhere."""
    return EVENTS_HINT if path == EVENTS_PATH else f"send at most {MAX_CANDIDATES} candidates per request"


def limit_for(path: str, max_bytes: int) -> int:
    """The body limit of a request to ``path``: ``max_bytes``, plus OIP_ENVELOPE_BYTES on an inference route.

    ``max_bytes`` is sized for the largest valid ``/v1/rank`` body; an inference body holds as many
    candidates in the same JSON array, and its tensors' names, datatypes and shapes, an ``id`` and
    ``parameters`` take at most OIP_ENVELOPE_BYTES more.
    """
    return max_bytes + OIP_ENVELOPE_BYTES if OIP_INFER_PATH.fullmatch(path) else max_bytes


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over its limit, before the app reads or parses it.

    The limit is ``max_bytes``, more on the inference routes (:func:`limit_for`).

    A declared ``Content-Length`` over the limit is refused at once, without reading the body.
    Otherwise the body is read while counting its bytes (chunked requests have no
    ``Content-Length``) and refused as soon as the count passes the limit; a body within the
    limit is handed to the app whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = limit_for(path, self.max_bytes)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(send, f"request body of {declared} bytes is over the limit of {limit} bytes", path)
            return

        chunks: list[bytes] = []
        size = 0
        pending: list[Message] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app sees that
                pending.append(message)
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(send, f"request body is over the limit of {limit} bytes", path)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending.insert(0, {"type": "http.request", "body": b"".join(chunks), "more_body": False})

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, message: str, path: str) -> None:
        body = json.dumps({"error": f"{message}; {hint_for(path)}"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the rest of the body is never read
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    """The request's declared ``Content-Length``; ``None`` when absent or not a number."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
