"""The scoring service behind a real HTTP server (uvicorn): request size limits on the wire."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import uvicorn

from features.config import Layout
from serving.app import create_app
from serving.online_features import UserRow
from serving.schemas import MAX_BODY_BYTES


class ConstModel:
    """The smallest ranker double: every candidate scores 0.5 for each action."""

    version = "c1"
    actions = ("click",)
    embedding_dim = 1

    def user_embeddings(self, sequences: list[dict]) -> np.ndarray:
        return np.zeros((len(sequences), 1), np.float32)  # (U, 1)

    def score(self, user_embedding, candidates, surface, content=None, sequence=None) -> np.ndarray:
        return np.full((len(candidates), 1), 0.5, np.float32)  # (C, 1)


class NoFeatures:
    """Every user is unknown and no item has content; counts the reads."""

    def __init__(self) -> None:
        self.reads = 0

    def status(self) -> str:
        return "ok"

    def warm_up(self) -> None:
        pass

    def user(self, user_id: int) -> UserRow:
        self.reads += 1
        return UserRow()

    def item_content(self, item_ids: Sequence[int]) -> dict[int, list[float]]:
        return {}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[int, NoFeatures]]:
    """A uvicorn server on a free local port, in a thread; yields (port, features)."""
    feats = NoFeatures()
    app = create_app(Layout(tmp_path_factory.mktemp("afm_http")), model_loader=ConstModel, online_features=feats)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not (srv.started and srv.servers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield port, feats
    srv.should_exit = True
    thread.join(timeout=10)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length framed) → (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65_536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65_536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def test_a_small_request_is_ranked(server):
    port, _ = server
    body = json.dumps({"user_id": 1, "candidates": [1, 2], "surface": "home"}).encode()
    with _connect(port) as sock:
        sock.sendall(
            b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        status, _, got = _read_response(sock)
    assert status == 200, got
    assert [it["item_id"] for it in json.loads(got)["items"]] == [1, 2]


def test_a_declared_30_mb_body_is_refused_before_it_is_sent(server):
    port, feats = server
    reads = feats.reads
    with _connect(port) as sock:
        # the headers only: the server must answer from Content-Length without waiting for 30 MB
        sock.sendall(
            b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 30000000\r\n\r\n"
        )
        status, _, got = _read_response(sock)
    assert status == 413, got
    assert json.loads(got)["error"].startswith(f"request body of 30000000 bytes is over the limit of {MAX_BODY_BYTES}")
    assert feats.reads == reads


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server):
    port, feats = server
    reads = feats.reads
    piece = b" " * 8_192
    with _connect(port) as sock:
        sock.sendall(
            b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(MAX_BODY_BYTES // len(piece) + 2):  # just past the limit; the body never ends
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        status, _, got = _read_response(sock)
    assert status == 413, got
    assert json.loads(got)["error"].startswith(f"request body is over the limit of {MAX_BODY_BYTES} bytes")
    assert feats.reads == reads
