"""``afm demo``: the whole system on a fresh synthetic world, through the real Airflow DAGs.

1. generate the synthetic world (deterministic) under the data root;
2. the DAGs with Airflow's ``dag.test()`` (embedded SQLite metadata DB under <root>/airflow):
   ``activity_features`` for every day, then ``foundation_pretrain`` (on the corpus of the
   day before the last), ``ranker_finetune`` (evaluated on the last day) and
   ``publish_serving``, run for the last day as the assets would trigger them;
3. start ``afm serve``, send one ``POST /v1/rank`` for a known user, print the top items;
4. print the model's per-action AUC beside the best AUC the generator allows, and where
   to look next.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from features.config import Layout

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO_ROOT / "dags"
WIPED_ON_START = ("raw", "valid", "quarantine", "features", "feast")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def airflow_env(layout: Layout) -> dict[str, str]:
    """Environment for the local Airflow: SQLite metadata DB and logs under the data root."""
    if not DAGS_FOLDER.is_dir():
        raise FileNotFoundError(f"DAG folder {DAGS_FOLDER} not found: run the demo from a checkout of the repo")
    env = dict(os.environ)
    env.update(
        AFM_HOME=str(layout.root),
        AIRFLOW_HOME=str(layout.airflow),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_FOLDER),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        PYSPARK_PYTHON=sys.executable,
    )
    return env


def _run_logged(cmd: list[str], env: dict[str, str], log: Path, what: str) -> None:
    """Run a command with its output appended to ``log`` (progress lines ``[dag] …`` also shown).

    Raises with the log tail when it fails.
    """
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {what}\n")
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if line.startswith("[dag]"):
                print(line.rstrip(), flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{what} failed (rc={proc.returncode}); log {log}:\n{tail}")
    _say(f"{what}: ok ({time.perf_counter() - start:.0f} s)")


def run_dags(layout: Layout, days: list[str]) -> None:
    """Run the four DAGs with Airflow's ``dag.test()`` (what ``airflow dags test`` runs) for the demo's days.

    All runs go through one process (afm.dag_runner), so Airflow, GX, Feast and Spark
    start once instead of once per run.
    """
    env = airflow_env(layout)
    layout.airflow.mkdir(parents=True, exist_ok=True)
    log = layout.airflow / "demo-airflow.log"
    log.write_text("")
    _run_logged([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], env, log, "airflow db migrate")
    runs = [f"activity_features={ds}" for ds in days]
    # as the assets trigger them; the pretraining takes the corpus of the day before (no eval-day events leak in)
    runs += [f"foundation_pretrain={days[-1]}", f"ranker_finetune={days[-1]}", f"publish_serving={days[-1]}"]
    _run_logged([sys.executable, "-m", "afm.dag_runner", *runs], env, log, "dag.test " + " ".join(runs))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(layout: Layout, port: int | None = None, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start ``afm serve`` in a subprocess and wait until /health answers 200."""
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    afm = str(Path(sys.executable).with_name("afm"))
    log = (layout.root / "serve.log").open("w")
    proc = subprocess.Popen(
        [afm, "serve", "--home", str(layout.root), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"afm serve exited with {proc.returncode}; see {layout.root / 'serve.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise TimeoutError(f"afm serve did not become healthy within {timeout_s:.0f} s; see {layout.root / 'serve.log'}")


def pick_request(layout: Layout, ds: str) -> dict:
    """A real request of day ``ds`` (a known user and the slate shown), for the demo query."""
    import pandas as pd

    examples = pd.read_parquet(layout.partition(layout.ranking_examples, ds))
    clicked = examples.groupby("request_id")["label_click"].sum()
    request_id = clicked.sort_values(ascending=False, kind="stable").index[0]
    rows = examples[examples["request_id"] == request_id]
    return {
        "user_id": int(rows["user_id"].iloc[0]),
        "candidates": [int(i) for i in rows["item_id"]],
        "surface": str(rows["surface"].iloc[0]),
        "clicked": [int(i) for i in rows.loc[rows["label_click"] == 1, "item_id"]],
    }


def run_demo(layout: Layout, size: str = "demo") -> int:
    """Run the demo end to end; returns a process exit code."""
    from features.quality import data_docs_index
    from features.synth import SynthConfig, best_auc, generate_world
    from training.jobs.registry import current_version, list_versions

    t0 = time.perf_counter()
    for name in WIPED_ON_START:
        shutil.rmtree(layout.root / name, ignore_errors=True)
    cfg = SynthConfig.preset(size)
    summary = generate_world(layout, cfg)
    days = layout.available_days(layout.raw_events)
    _say(f"synthetic world: {len(days)} days {days[0]}..{days[-1]}, {json.dumps(summary.get('n_events', ''))} events")

    run_dags(layout, days)

    version = current_version(layout)
    metrics = next(v["metrics"] for v in list_versions(layout) if v["version"] == version)
    best = best_auc(layout, days[-1])
    actions = [a for a in best if a != "n_impressions"]

    proc, url = start_service(layout)
    try:
        req = pick_request(layout, days[-1])
        resp = httpx.post(f"{url}/v1/rank", json={k: req[k] for k in ("user_id", "candidates", "surface")}, timeout=30)
        resp.raise_for_status()
        ranked = resp.json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print()
    print("GX gate (rows in = valid + quarantined):")
    for ds in days:
        gate = json.loads((layout.partition(layout.reports, ds) / "gate.json").read_text())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(gate["by_reason"].items())) or "none"
        print(f"  {ds}  {gate['rows_in']} = {gate['rows_valid']} + {gate['rows_quarantined']}  ({reasons})")
    print()
    print(f"POST {url}/v1/rank  user_id={req['user_id']} surface={req['surface']} candidates={len(req['candidates'])}")
    print(f"model {ranked['model_version']} (user embedding: {ranked.get('embedding_source')})")
    print(f"{'rank':>4}  {'item_id':>8}  " + "  ".join(f"{a:>6}" for a in ranked["items"][0]["scores"]) + "  clicked")
    for rank, item in enumerate(ranked["items"][:5], start=1):
        scores = "  ".join(f"{p:6.3f}" for p in item["scores"].values())
        mark = "yes" if item["item_id"] in req["clicked"] else ""
        print(f"{rank:>4}  {item['item_id']:>8}  {scores}  {mark}")
    print()
    print(f"per-action AUC on {days[-1]} (held-out day)   model   best the generator allows")
    for action in actions:
        best_value = best[action]
        model_value = metrics.get(f"auc_{action}")
        model_text = f"{model_value:.3f}" if model_value is not None else "  n/a"
        print(f"  {action:<8}{'':30}{model_text}   {best_value:.3f}")
    print()
    print("where to look next:")
    print(f"  GX data docs      {data_docs_index(layout)}")
    print(f"  quarantined rows  {layout.quarantine_events}/ds=*/")
    print(
        f"  Feast repo        {REPO_ROOT / 'features' / 'feature_repo'} (registry + online store under {layout.feast})"
    )
    print(f"  model artifact    {layout.models / 'ranker' / version}")
    print(f"  Airflow log       {layout.airflow / 'demo-airflow.log'}")
    print(f"  scoring service   afm serve --home {layout.root}  →  http://127.0.0.1:8080/v1/rank")
    print(f"demo done in {time.perf_counter() - t0:.0f} s")
    return 0
