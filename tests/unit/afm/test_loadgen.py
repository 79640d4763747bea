"""afm.loadgen and the figures of afm bench serving: Server-Timing parsing, loopback only, the summary and its targets."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from afm.bench_serving import judge, summarize
from afm.loadgen import check_loopback, run_load, server_timing


def test_server_timing_reads_the_entries_with_a_duration() -> None:
    assert server_timing("features;dur=1.25, queue;dur=0.5, model;dur=8.0") == {
        "features": 1.25,
        "queue": 0.5,
        "model": 8.0,
    }
    assert server_timing('cache;desc="hit", model;dur=3') == {"model": 3.0}
    assert server_timing(None) == {}


@pytest.mark.parametrize("url", ["http://10.0.0.5:8080/v1/rank", "http://example.org/v1/rank", "http://192.168.1.2/"])
def test_only_loopback_targets_are_loaded(url: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(url)


def test_loopback_targets_pass() -> None:
    for url in ("http://127.0.0.1:8080/v1/rank", "http://localhost:1/", "http://[::1]:9/"):
        check_loopback(url)


class _Ranker(BaseHTTPRequestHandler):
    """Answers /v1/rank with every candidate ranked, except candidate 13's request (a 503)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if 13 in body["candidates"]:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"error": "down"}')
            return
        out = json.dumps({"model_version": "v1", "items": [{"item_id": c} for c in body["candidates"]]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("server-timing", "features;dur=0.5, queue;dur=0.1, model;dur=2.0")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def test_run_load_records_every_answer_and_failure_and_the_summary_counts_them() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ranker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bodies = [json.dumps({"user_id": 1, "candidates": c}).encode() for c in ([1, 2], [3, 4], [13, 14])]
        samples = run_load(f"http://127.0.0.1:{server.server_port}/v1/rank", bodies, [2, 2, 2], 2, 1.0)
    finally:
        server.shutdown()
    assert len(samples) > 6 and samples == sorted(samples, key=lambda s: s.start)
    failed = [s for s in samples if s.error]
    assert failed and all(s.status == 503 and "HTTP 503" in s.error for s in failed)
    ok = [s for s in samples if not s.error]
    assert all(s.model_version == "v1" and s.model_ms == 2.0 and s.queue_ms == 0.1 and s.items == 2 for s in ok)
    summary = summarize([vars(s) for s in samples], candidates=2, seconds=1.0)
    assert summary["errors"] == len(failed) and summary["requests"] == len(samples)
    assert summary["rps"] == len(ok) and summary["candidates_per_s"] == 2 * len(ok)
    assert summary["model_ms_p50"] == 2.0 and 0 < summary["overhead_share"] < 1
    assert 0 < summary["overhead_share_beyond_queue"] < summary["overhead_share"]


def test_judge_applies_each_target_where_it_belongs() -> None:
    line = {"concurrency": 1, "overhead_share": 0.2, "fetch_overhead_ratio": 3.0, "errors": 0, "p99_ms": 49.0}
    assert judge(line) == {"overhead_share": True, "fetch_overhead_ratio": False, "errors": True, "p99_ms": True}
    busy = {**line, "concurrency": 16, "p99_ms": 900.0, "ratio": 0.79}
    assert judge(busy) == {"fetch_overhead_ratio": False, "errors": True, "ratio": False}  # p99, share: at 1 client
