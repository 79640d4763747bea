"""``afm serve`` in its own process stops gracefully on SIGTERM: the request in flight completes, new connections are refused."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
#: Seconds the slow model takes to score a request holding SLOW_ITEM: long enough to SIGTERM the server mid-request.
SCORING_S = 3.0
SLOW_ITEM = 777

#: The service as `afm serve` runs it (the real command, uvicorn and its signal handling), with a slow
#: model double in place of loading CURRENT. argv: a marker file (written when slow scoring starts), the
#: seconds slow scoring takes, the item id that makes scoring slow.
SERVER = """
import sys
import time
from pathlib import Path

import numpy as np

import serving.app
from serving.cli import serve
from serving.online_features import UserRow

MARKER, SECONDS, SLOW_ITEM = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])


class SlowModel:
    version = "slow1"
    actions = ("click", "save")
    embedding_dim = 1

    def user_embeddings(self, sequences):
        return np.zeros((len(sequences), 1), np.float32)  # (U, 1)

    def score(self, user_embedding, candidates, surface, content=None, sequence=None):
        if SLOW_ITEM in candidates:
            MARKER.write_text("scoring")
            time.sleep(SECONDS)
        return np.full((len(candidates), 2), 0.5, np.float32)  # (C, 2)


class NoFeatures:
    def status(self):
        return "ok"

    def user(self, user_id):
        return UserRow()

    def item_content(self, item_ids):
        return {}


build = serving.app.create_app
serving.app.create_app = lambda layout, **kw: build(
    layout, model_loader=SlowModel, online_features=NoFeatures(), warm_up_in_background=False, **kw
)
serve.main(["--home", str(MARKER.parent / "home"), "--port", "0"], prog_name="afm serve")
"""


class ServerLog:
    """The server's combined output, read in a thread; ``wait_for`` a line matching a pattern."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if found := re.search(pattern, line):
                        return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n" + "\n".join(self.lines))
                self._changed.wait(left)

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


def _infer_body(candidates: list[int]) -> bytes:
    return json.dumps(
        {
            "id": "in-flight",
            "inputs": [
                {"name": "user_id", "datatype": "INT64", "shape": [1], "data": [7]},
                {"name": "candidate_ids", "datatype": "INT64", "shape": [len(candidates)], "data": candidates},
                {"name": "surface", "datatype": "BYTES", "shape": [1], "data": ["home"]},
            ],
        }
    ).encode()


def _post(port: int, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.timeout(120)
def test_sigterm_lets_the_request_in_flight_complete_and_refuses_new_connections(tmp_path):
    marker = tmp_path / "scoring-started"
    script = tmp_path / "serve_slow_model.py"
    script.write_text(SERVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("AFM_GRACEFUL_SHUTDOWN_S", None)  # the default bound (20 s) is well over SCORING_S
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), str(SCORING_S), str(SLOW_ITEM)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log = ServerLog(proc)
        started = log.wait_for(r"Uvicorn running on http://([\d.]+):(\d+)", timeout=60)
        host, port = started.group(1), int(started.group(2))
        assert host == "127.0.0.1"  # `afm serve` binds the loopback address unless told otherwise

        status, body = _post(port, "/v2/models/ranker/infer", _infer_body([1, 2]), timeout=30)
        assert status == 200, body  # serving, and fast for an ordinary request

        answer: dict = {}

        def in_flight() -> None:
            answer["status"], answer["body"] = _post(port, "/v2/models/ranker/infer", _infer_body([5, SLOW_ITEM]), 60)

        request = threading.Thread(target=in_flight)
        request.start()
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, "the slow request never reached the model"
            time.sleep(0.01)
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        # shutdown has started: the listening socket closes at once, while the request is still being scored
        while not _refuses_connections(port):
            assert time.monotonic() - sigterm_at < SCORING_S / 2, "new connections were still accepted"
            time.sleep(0.02)
        assert request.is_alive(), "the request finished before new connections were refused"

        request.join(timeout=60)
        assert not request.is_alive()
        assert answer["status"] == 200, answer["body"]
        got = json.loads(answer["body"])  # complete: the whole body, valid JSON
        assert got["id"] == "in-flight" and got["model_version"] == "slow1"
        (scores,) = [o for o in got["outputs"] if o["name"] == "scores"]
        assert scores["shape"] == [2, 2] and scores["data"] == [0.5] * 4

        assert proc.wait(timeout=30) == 0, log.text()
        assert time.monotonic() - sigterm_at >= SCORING_S / 2  # it waited for the request
        assert "Waiting for connections to close" in log.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
