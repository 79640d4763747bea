"""The real local deployment: scheduler, API server, DAG processor and triggerer on PostgreSQL.

One scenario on a tiny synthetic world of three days, as on-call meets it:

1. the reference: the three days run one after the other through the embedded path
   (``dag.test()``, SQLite), as ``make demo`` runs them;
2. on the deployment (``afm airflow up``), with a scoring service running: day 2's raw
   partition holds a corrupt file, then ``airflow backfill create`` over the three days;
3. day 2's gate fails at once (bad data is not retried) with an alert line and a webhook
   call; day 1 succeeds; day 3 waits for day 2's snapshot;
4. the file is repaired and the failed task cleared (``airflow tasks clear``): all three runs
   succeed, and every output partition equals the reference's byte for byte;
5. the asset-scheduled DAGs then run on their own, in order: pretraining, fine-tuning,
   publishing, and the service serves the promoted ranker with precomputed embeddings.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from afm.alerts import alerts_file
from afm.local_airflow import LocalAirflow
from features.config import Layout
from training.jobs import registry

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.timeout(2400)]

DAYS = ("2026-01-01", "2026-01-02", "2026-01-03")
BAD_DAY = DAYS[1]
#: the outputs of a feature day that must not depend on how it was run
OUTPUTS = ("valid/events", "quarantine/events", "features/user_sequences", "features/request_sequences",
           "features/ranking_examples", "features/pretrain_corpus")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synth(home: Path) -> None:
    cmd = [sys.executable, "-m", "afm.cli", "data", "synth", "--home", str(home), "--size", "tiny"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)


def parquet_digest(path: Path) -> str:
    """sha256 of a parquet file's bytes: every data page byte for byte, and its footer.

    The footer is compared decoded, with each column chunk's list of encodings sorted:
    parquet-mr (Spark's writer) collects them in a JVM hash set, so their order changes from
    one JVM to the next while the data pages stay identical.
    """
    raw = path.read_bytes()
    footer_len = int.from_bytes(raw[-8:-4], "little")
    meta = pq.read_metadata(path).to_dict()
    for group in meta["row_groups"]:
        for column in group["columns"]:
            column["encodings"] = sorted(column["encodings"])
    footer = json.dumps(meta, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw[: len(raw) - 8 - footer_len] + footer).hexdigest()


def _digests(layout: Layout) -> dict[str, list[str]]:
    """{dataset/ds=D: sorted digests of its parquet files} (Spark names files with a random id)."""
    out = {}
    for rel in OUTPUTS:
        for ds in DAYS:
            part = layout.root / rel / f"ds={ds}"
            out[f"{rel}/ds={ds}"] = sorted(parquet_digest(f) for f in part.glob("*.parquet"))
    return out


class _Webhook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Webhook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """The three days run one after the other through ``dag.test()`` (the embedded path)."""
    home = tmp_path_factory.mktemp("reference")
    _synth(home)
    from afm.demo import airflow_env

    env = airflow_env(Layout(home))
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    runs = [f"activity_features={ds}" for ds in DAYS]
    proc = subprocess.run([sys.executable, "-m", "afm.dag_runner", *runs], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Layout(home)


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[LocalAirflow, str, str]]:
    """``afm airflow up`` on a fresh world, with a scoring service and an alert webhook; down afterwards.

    Its data root is not under pytest's temporary root: a pytest session that starts takes the
    others' permissions off that root, and PostgreSQL runs as another user when this is root.
    """
    home = Path(tempfile.mkdtemp(prefix="afm-deployment-"))
    _synth(home)
    webhook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    token, service_port = secrets.token_urlsafe(16), _free_port()
    service_url = f"http://127.0.0.1:{service_port}"
    env = {**os.environ, "AFM_ADMIN_TOKEN": token, "AFM_SERVICE_URL": service_url,
           "AFM_ALERT_WEBHOOK": f"http://127.0.0.1:{webhook.server_address[1]}/alerts"}  # fmt: skip
    service = subprocess.Popen(
        [sys.executable, "-m", "afm.cli", "serve", "--home", str(home), "--port", str(service_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    airflow = LocalAirflow(Layout(home), api_port=_free_port(), pg_port=_free_port())
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("AFM_ADMIN_TOKEN", "AFM_SERVICE_URL", "AFM_ALERT_WEBHOOK")})
    try:
        t0 = time.perf_counter()
        airflow.up(timeout_s=300)
        print(f"[deployment] up in {time.perf_counter() - t0:.0f} s", flush=True)
        yield airflow, service_url, token
    finally:
        os.environ.clear()
        os.environ.update(saved)
        airflow.down()
        service.terminate()
        service.wait(30)
        webhook.shutdown()
        shutil.rmtree(home, ignore_errors=True)


def _airflow_cli(airflow: LocalAirflow, *args: str) -> str:
    return airflow.airflow_cli(*args).stdout


def _by_day(runs: list[dict]) -> dict[str, dict]:
    return {r["logical_date"][:10]: r for r in runs if r["run_type"] == "backfill"}


def test_backfill_with_a_failed_day_recovers_and_equals_sequential_runs(reference: Layout, deployment) -> None:
    airflow, _, _ = deployment
    layout = airflow.layout
    corrupt = layout.partition(layout.raw_events, BAD_DAY) / "part-9-corrupt.parquet"
    corrupt.write_bytes(b"this is not a parquet file\n")

    t0 = time.perf_counter()
    _airflow_cli(airflow, "backfill", "create", "--dag-id", "activity_features", "--from-date", DAYS[0],
                 "--to-date", DAYS[-1], "--reprocess-behavior", "failed")  # fmt: skip

    def bad_day_failed(runs: list[dict]) -> bool:
        by_day = _by_day(runs)
        return by_day.get(BAD_DAY, {}).get("state") == "failed" and by_day.get(DAYS[0], {}).get("state") == "success"

    runs = airflow.wait_runs("activity_features", bad_day_failed, timeout_s=900)
    bad = _by_day(runs)[BAD_DAY]
    states = airflow.task_states("activity_features", bad["dag_run_id"])
    assert states["gate"] == "failed" and states["user_sequences"] == "upstream_failed"
    # bad data is not retried, and the failure is an alert naming the DAG, the day, the task and the log
    alerts = [json.loads(x) for x in alerts_file(layout).read_text().splitlines()]
    gate_alerts = [a for a in alerts if a["task_id"] == "gate" and a["ds"] == BAD_DAY]
    assert len(gate_alerts) == 1, alerts
    assert gate_alerts[0]["dag_id"] == "activity_features" and "part-9-corrupt.parquet" in gate_alerts[0]["error"]
    assert gate_alerts[0]["log_url"].startswith(airflow.url) and gate_alerts[0]["try_number"] == 1
    assert any(a.get("task_id") == "gate" and a.get("ds") == BAD_DAY for a in _Webhook.received)

    corrupt.unlink()  # repaired; on-call clears the failed task and what it held up
    _airflow_cli(airflow, "tasks", "clear", "activity_features", "--start-date", BAD_DAY, "--end-date", BAD_DAY,
                 "--only-failed", "--downstream", "--yes")  # fmt: skip
    runs = airflow.wait_runs(
        "activity_features",
        lambda rs: all(_by_day(rs).get(ds, {}).get("state") == "success" for ds in DAYS),
        timeout_s=1200,
    )
    print(f"[deployment] backfill of {len(DAYS)} days with one failure and a clear: "
          f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    assert [r["state"] for r in _by_day(runs).values()] == ["success"] * len(DAYS)
    got, want = _digests(layout), _digests(reference)
    assert all(want.values()), want  # every output partition exists in the reference
    assert got == want


def _settled(runs: list[dict]) -> bool:
    return bool(runs) and all(r["state"] in ("success", "failed") for r in runs)


def _last_with(airflow: LocalAirflow, dag_id: str, task_id: str) -> dict:
    """The DAG's last run whose ``task_id`` succeeded (not skipped)."""
    runs = [r for r in airflow.dag_runs(dag_id) if airflow.task_states(dag_id, r["dag_run_id"])[task_id] == "success"]
    assert runs, f"no run of {dag_id} where {task_id} succeeded"
    return max(runs, key=lambda r: r["start_date"])


def test_the_asset_scheduled_dags_follow_by_themselves_and_reach_the_service(deployment) -> None:
    airflow, service_url, _ = deployment
    layout = airflow.layout
    t0 = time.perf_counter()

    def newest_backbone_is_from_the_day_before_the_last(runs: list[dict]) -> bool:
        version = registry.latest_version(layout, "pinfm")
        corpus = version and registry.load_artifact(layout, "pinfm", version)["data_version"]["corpus_ds"]
        return _settled(runs) and corpus == DAYS[-2]  # no eval-day events in the backbone

    airflow.wait_runs("foundation_pretrain", newest_backbone_is_from_the_day_before_the_last, timeout_s=900)
    pretrain = _last_with(airflow, "foundation_pretrain", "pretrain")
    for dag_id in ("ranker_finetune", "publish_serving"):
        airflow.wait_runs(dag_id, lambda rs: _settled(rs) and max(r["start_date"] for r in rs) > pretrain["start_date"],
                          timeout_s=900)  # fmt: skip
    finetune = _last_with(airflow, "ranker_finetune", "finetune")
    publish = _last_with(airflow, "publish_serving", "roll_out")
    print(f"[deployment] asset-triggered chain settled {time.perf_counter() - t0:.0f} s after the backfill", flush=True)
    for dag_id in ("foundation_pretrain", "ranker_finetune", "publish_serving"):
        assert {r["run_type"] for r in airflow.dag_runs(dag_id)} == {"asset_triggered"}, dag_id
    # in order: each started once the one before had produced its asset
    assert pretrain["start_date"] < finetune["start_date"] < publish["start_date"]
    pretrain_task = airflow.api(
        "GET", f"/api/v2/dags/foundation_pretrain/dagRuns/{pretrain['dag_run_id']}/taskInstances/pretrain"
    )
    assert pretrain_task["end_date"] <= finetune["start_date"]

    current = registry.current_version(layout)
    assert current is not None
    health = httpx.get(f"{service_url}/health", timeout=10).json()
    assert health["model_version"] == current  # the service reloaded by itself
    from serving.rollout import smoke_request

    answer = httpx.post(f"{service_url}/v1/rank", json=smoke_request(layout), timeout=30).json()
    assert answer["model_version"] == current and answer["embedding_source"] == "precomputed"


def test_down_stops_everything(tmp_path: Path) -> None:
    """A deployment that never started stops cleanly (no pid files, no server)."""
    airflow = LocalAirflow(Layout(tmp_path), api_port=_free_port(), pg_port=_free_port())
    airflow.down()
    status = airflow.status()
    assert status["components"] == dict.fromkeys(("scheduler", "dag-processor", "triggerer", "api-server"))
    assert status["postgres"] is False and status["health"] is None
