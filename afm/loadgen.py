"""A closed-loop HTTP load generator of ``POST /v1/rank``: ``concurrency`` clients, each sending its next request when the last one answered.

``afm bench serving`` runs it as a process of its own (``python -m afm.loadgen``), so the
service and the load share no interpreter. Every request is recorded: its wall-clock start,
its latency, the HTTP status, the model version the answer names, the time the service spent
in the model (the ``model`` entry of its ``Server-Timing`` header) and, for a failure, why.
The bodies are encoded once, before the clock starts.

Only loopback addresses are accepted as targets: this is a benchmark of a service on this machine.

Example::

    python -m afm.loadgen --url http://127.0.0.1:8080/v1/rank --bodies bodies.jsonl \\
        --concurrency 4 --seconds 30 --out run.json
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

_TIMING = re.compile(r"(?:^|,)\s*([A-Za-z0-9_-]+)(?:;[^,]*?dur=([0-9.]+))?")


@dataclass
class Sample:
    """One request: ``start`` unix seconds, ``latency_ms``, ``status`` (0 = no answer), what the answer said."""

    start: float
    latency_ms: float
    status: int
    model_version: str | None
    model_ms: float | None
    features_ms: float | None
    queue_ms: float | None
    items: int
    error: str | None


def server_timing(header: str | None) -> dict[str, float]:
    """``Server-Timing: features;dur=1.2, model;dur=8.5`` → ``{"features": 1.2, "model": 8.5}`` (entries with a dur)."""
    out: dict[str, float] = {}
    for name, dur in _TIMING.findall(header or ""):
        if dur:
            out[name] = float(dur)
    return out


def check_loopback(url: str) -> None:
    """Refuse a target that is not on this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the load generator targets only this machine's loopback addresses, not {host!r}")


def _answer(resp: httpx.Response, expected_items: int) -> tuple[str | None, int, str | None]:
    """(model version, items, error) of one answer; an answer that is not a full ranking is an error."""
    if resp.status_code != 200:
        return None, 0, f"HTTP {resp.status_code}: {resp.text[:200]}"
    try:
        body = resp.json()
    except ValueError as exc:
        return None, 0, f"not JSON: {exc}"
    items = len(body.get("items") or [])
    version = body.get("model_version")
    if items != expected_items:
        return version, items, f"{items} items ranked, {expected_items} sent"
    return version, items, None


def run_load(
    url: str, bodies: list[bytes], candidates: list[int], concurrency: int, seconds: float, timeout_s: float = 30.0
) -> list[Sample]:
    """Send ``bodies`` round-robin from ``concurrency`` clients for ``seconds``; every request's :class:`Sample`.

    Args:
        url: the route, e.g. ``http://127.0.0.1:8080/v1/rank`` (loopback only).
        bodies: encoded JSON request bodies.
        candidates: how many candidates each body carries (to check the answers).
        concurrency: clients, each with its own keep-alive connection.
        seconds: how long to send; requests in flight at the end are waited for.
        timeout_s: per request.
    """
    check_loopback(url)
    if concurrency < 1 or not bodies:
        raise ValueError(f"need concurrency ≥ 1 and at least one body, got {concurrency} and {len(bodies)}")
    samples: list[list[Sample]] = [[] for _ in range(concurrency)]
    deadline = time.monotonic() + seconds
    headers = {"content-type": "application/json"}

    def client(k: int) -> None:
        with httpx.Client(timeout=timeout_s) as http:
            i = k
            while time.monotonic() < deadline:
                j = i % len(bodies)
                i += concurrency
                start, t0 = time.time(), time.perf_counter()
                try:
                    resp = http.post(url, content=bodies[j], headers=headers)
                    latency = (time.perf_counter() - t0) * 1e3
                    version, items, error = _answer(resp, candidates[j])
                    timing = server_timing(resp.headers.get("server-timing"))
                    samples[k].append(
                        Sample(start, latency, resp.status_code, version, timing.get("model"),
                               timing.get("features"), timing.get("queue"), items, error)
                    )  # fmt: skip
                except httpx.HTTPError as exc:
                    latency = (time.perf_counter() - t0) * 1e3
                    samples[k].append(
                        Sample(start, latency, 0, None, None, None, None, 0, f"{type(exc).__name__}: {exc}")
                    )

    threads = [threading.Thread(target=client, args=(k,), name=f"loadgen-{k}") for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted((s for per in samples for s in per), key=lambda s: s.start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afm.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="The route to load (loopback only).")
    parser.add_argument("--bodies", required=True, type=Path, help="JSON lines: one request body each.")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--out", required=True, type=Path, help="Where to write the samples (JSON).")
    args = parser.parse_args(argv)
    lines = [line for line in args.bodies.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]
    candidates = [len(b["candidates"]) for b in parsed]
    try:
        samples = run_load(args.url, [line.encode() for line in lines], candidates, args.concurrency, args.seconds)
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps([asdict(s) for s in samples]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
