"""``afm roll-out``: the service reloads CURRENT and a smoke request checks it; a failure rolls back."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from features.config import Layout
from serving.rollout import RolloutError, roll_out, smoke_request
from training.jobs import registry

TOKEN = "s3cret-token"


def _layout(tmp_path: Path) -> tuple[Layout, str, str]:
    """A data root with a user_sequences snapshot, an item table and two promoted rankers (old, new)."""
    layout = Layout(tmp_path)
    snap = layout.partition(layout.user_sequences, "2026-01-03")
    snap.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "user_id": [9, 4],
                "item_ids": [[1, 2], [3]],
                "actions": [["click", "save"], ["click"]],
                "surfaces": [["home", "home"], ["search"]],
            }
        ),  # fmt: skip
        snap / "part-0.parquet",
    )
    layout.items.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": pa.array(range(20, 0, -1), pa.int64())}), layout.items / "items.parquet")
    versions = []
    for _ in range(2):
        v = registry.save_artifact(layout, "ranker", {"w": torch.zeros(1)}, config={}, metrics={}, data_version={})
        registry.promote(layout, v)
        versions.append(v)
    return layout, versions[0], versions[1]


class _Service(http.server.BaseHTTPRequestHandler):
    """A stand-in for the scoring service's two routes; ``serves`` and ``source`` set what it answers."""

    serves = ""
    source = "precomputed"
    reloads = 0

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/admin/reload":
            ok = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            type(self).reloads += ok
            self._answer(200 if ok else 403, {"reloaded": ok})
        else:
            answer = {
                "model_version": type(self).serves,
                "embedding_source": type(self).source,
                "user_id": body["user_id"],
            }
            self._answer(200, answer)

    def _answer(self, code: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *_: object) -> None:
        return None


@pytest.fixture
def service() -> Iterator[str]:
    _Service.reloads, _Service.source = 0, "precomputed"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_smoke_request_is_a_published_user_and_catalogue_items(tmp_path: Path) -> None:
    layout, _, _ = _layout(tmp_path)
    assert smoke_request(layout) == {"user_id": 9, "candidates": [1, 2, 3, 4, 5], "surface": "home"}


def test_a_service_serving_current_passes(tmp_path: Path, service: str) -> None:
    layout, _, new = _layout(tmp_path)
    _Service.serves = new
    out = roll_out(layout, service, token=TOKEN)
    assert out == {"version": new, "url": service, "user_id": 9, "rolled_back": False}
    assert _Service.reloads == 1 and registry.current_version(layout) == new


@pytest.mark.parametrize(("serves", "source", "why"), [
    ("old", "precomputed", "the service answers with"),
    ("new", "computed", "embedding_source=computed"),
])  # fmt: skip
def test_a_failed_smoke_check_rolls_back_and_says_so(tmp_path: Path, service: str, serves, source, why) -> None:
    layout, old, new = _layout(tmp_path)
    _Service.serves, _Service.source = {"old": old, "new": new}[serves], source
    with pytest.raises(
        RolloutError, match=f"roll-out of {new} failed: .*{why}.*rolled back, the service now serves {old}"
    ):
        roll_out(layout, service, token=TOKEN)
    assert registry.current_version(layout) == old
    assert _Service.reloads == 2  # the failed version, then the one rolled back to


def test_a_wrong_token_fails_and_rolls_back(tmp_path: Path, service: str) -> None:
    layout, old, new = _layout(tmp_path)
    _Service.serves = new
    with pytest.raises(RolloutError, match="reload answered HTTP 403"):
        roll_out(layout, service, token="wrong")
    assert registry.current_version(layout) == old
