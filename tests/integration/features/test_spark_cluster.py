"""The feature steps on a real Spark standalone cluster give the same bytes as on ``local[*]``.

The module starts a master and two workers (1 core, 1g each) on 127.0.0.1 with the code of
``afm spark up`` (:class:`afm.spark_cluster.LocalSparkCluster`), on free ports under its own
``AFM_HOME``, and stops them at the end. A demo-size synthetic day (``afm data synth --size
demo --days 1``) is generated into two data roots, and ``afm features run-day`` runs on it once
with ``--master local[*]`` and once with ``--master spark://127.0.0.1:<port>``, each in its own
process started outside the repository without ``PYTHONPATH``. Every output file (parquet part
files, their ``.crc``, ``_SUCCESS``; the step reports with the data root's path replaced) must
be equal byte for byte: :mod:`features.reproducible` makes Spark's part files byte-reproducible.

The shipping of code is shown twice: each executor of the day's run fetched the project's zip
(``features.shipping``) into its work folder, and a task on the cluster, with the editable
install's import hook removed from its Python worker and ``features`` forgotten, imports
``features.config`` from that zip.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from afm.spark_cluster import LocalSparkCluster, SparkClusterError
from features.config import Layout
from features.shipping import zip_bytes

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(1200)]

DS = "2026-01-01"
REPO = Path(__file__).resolve().parents[3]
#: the day's outputs (folders under the data root) compared file by file
OUTPUTS = (
    f"valid/events/ds={DS}",
    f"quarantine/events/ds={DS}",
    f"features/user_sequences/ds={DS}",
    f"features/request_sequences/ds={DS}",
    f"features/ranking_examples/ds={DS}",
    f"features/pretrain_corpus/ds={DS}",
    f"features/reports/ds={DS}",
    f"feast/sources/user_sequence/{DS}",
    "feast/sources/item_features",
)
STEPS = ("gate", "sequences", "examples", "corpus")
#: a log line's leading time (``2026-01-01 10:00:00,123`` or ``2026-01-01T10:00:00.123456Z``)
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)[,.](\d+)")
#: what marks the end of each phase of run-day in its log
_PHASES = {"session": "started Spark", **{step: f"[{step} ds={DS}]" for step in STEPS}, "feast": "feast sources for"}

#: run on the cluster by a driver started outside the repository (``python -c``): one task per
#: executor drops the editable install's import hook and every ``features`` module, then imports
#: ``features.config`` again. Only the shipped zip can provide it.
PROBE = r"""
import json, sys, time
from features.spark import spark_session

master, n, ds = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def task(ds):
    import importlib, os, sys
    hooks = [f for f in sys.meta_path if "editable" in type(f).__module__ or "editable" in getattr(f, "__module__", "")]
    sys.meta_path[:] = [f for f in sys.meta_path if all(f is not h for h in hooks)]
    for name in [m for m in sys.modules if m == "features" or m.startswith("features.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    config = importlib.import_module("features.config")
    return {"file": config.__file__, "previous_ds": config.previous_ds(ds), "cwd": os.getcwd(),
            "pythonpath": os.environ.get("PYTHONPATH", ""), "hooks_removed": len(hooks),
            "features_dirs": [p for p in sys.path if os.path.isdir(os.path.join(os.path.abspath(p or "."), "features"))]}

with spark_session(master) as spark:
    sc = spark.sparkContext
    deadline = time.monotonic() + 120
    while sc._jsc.sc().getExecutorMemoryStatus().size() < n + 1 and time.monotonic() < deadline:
        time.sleep(0.5)  # the driver counts too: wait for n executors, one task each
    tasks = sc.parallelize([ds] * n, n).map(task).collect()
    print(json.dumps({"files": list(sc.listFiles), "includes": list(sc._python_includes), "tasks": tasks}))
"""


def _free_port(span: int = 1) -> int:
    """A port P with P … P+span-1 free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65535 and all(_is_free(p) for p in range(port, port + span)):
            return port
    raise RuntimeError(f"no {span} consecutive free ports")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _env(home: Path) -> dict[str, str]:
    """A clean environment for a driver: its own data root, no PYTHONPATH, 4 shuffle partitions on any master."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AFM_SPARK_MASTER")}
    env.update({"AFM_HOME": str(home), "AFM_SPARK_SHUFFLE_PARTITIONS": "4", "PYSPARK_PYTHON": sys.executable})
    return env


def _afm(*args: str, home: Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    afm = str(Path(sys.executable).with_name("afm"))
    proc = subprocess.run([afm, *args], env=_env(home), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"afm {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _step_times(stderr: str, started: float, finished: float) -> dict[str, float]:
    """Seconds per phase from the run's log lines: session start, each step (up to its report line), the rest."""
    marks: list[tuple[str, float]] = []
    for line in stderr.splitlines():
        m = _LOG_TIME.match(line)
        phase = next((name for name, text in _PHASES.items() if text in line), None)
        if m and phase and phase not in dict(marks):
            stamp = f"{m.group(1)} {m.group(2)}.{m.group(3)[:6]}"
            marks.append((phase, dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()))
    out, last = {}, started
    for name, when in marks:
        out[name] = round(when - last, 1)
        last = when
    out["rest"] = round(finished - last, 1)
    out["total"] = round(finished - started, 1)
    return out


def _files(home: Path) -> dict[str, bytes]:
    """{path under the data root: bytes} of every output file of the day; reports with the root's path as $AFM_HOME."""
    out = {}
    for rel in OUTPUTS:
        folder = home / rel
        assert folder.is_dir(), f"missing output {folder}"
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            data = path.read_bytes()
            if path.suffix == ".json":
                data = data.replace(str(home).encode(), b"$AFM_HOME")
            out[str(path.relative_to(home))] = data
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSparkCluster]:
    """The two-worker cluster on free ports (master port, and the master's + workers' UI ports)."""
    home = tmp_path_factory.mktemp("spark-cluster")
    master_port, ui_port = _free_port(), _free_port(3)
    while ui_port <= master_port < ui_port + 3:
        ui_port = _free_port(3)
    cluster = LocalSparkCluster(Layout(home), master_port=master_port, ui_port=ui_port)
    try:
        cluster.up(timeout_s=240)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def runs(cluster: LocalSparkCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The demo day's feature steps on ``local[*]`` and on the cluster: {mode: {home, times, stdout}}."""
    outside = tmp_path_factory.mktemp("cwd")  # the drivers run outside the repository
    out = {}
    for mode, master in (("local", "local[*]"), ("cluster", cluster.master_url)):
        home = tmp_path_factory.mktemp(f"home-{mode}")
        _afm("data", "synth", "--size", "demo", "--days", "1", "--start", DS, home=home, cwd=outside)
        started = time.time()
        proc = _afm("features", "run-day", "--ds", DS, "--master", master, home=home, cwd=outside)
        finished = time.time()
        times = _step_times(proc.stderr, started, finished)
        print(f"\nrun-day ds={DS} on {master}: {json.dumps(times)}")
        out[mode] = {"home": home, "times": times, "stdout": proc.stdout, "stderr": proc.stderr}
    return out


def test_cluster_is_up_with_two_alive_workers(cluster: LocalSparkCluster) -> None:
    status = cluster.status()
    assert status["master_status"] == "ALIVE" and status["alive_workers"] == 2
    assert all(status["daemons"].values()), status["daemons"]
    state = cluster.master_state()
    assert sorted(w["cores"] for w in state["workers"]) == [1, 1]
    assert sorted(w["memory"] for w in state["workers"]) == [1024, 1024]


def test_a_second_cluster_on_the_same_ports_is_refused(cluster: LocalSparkCluster, tmp_path: Path) -> None:
    other = LocalSparkCluster(Layout(tmp_path), master_port=cluster.master_port, ui_port=_free_port(3))
    with pytest.raises(SparkClusterError, match=rf"the master port, {cluster.master_port} on 127.0.0.1, is in use"):
        other.up(timeout_s=5)
    assert all(pid is None for pid in other.status()["daemons"].values())


def test_the_day_on_the_cluster_equals_local_byte_for_byte(runs: dict[str, dict]) -> None:
    local, cluster = _files(runs["local"]["home"]), _files(runs["cluster"]["home"])
    assert sorted(local) == sorted(cluster)
    parts = [name for name in local if name.endswith(".parquet")]
    assert len(parts) == len(OUTPUTS) - 1  # one part file per table (the reports folder has none)
    assert all(Path(name).name == "part-00000-c000.snappy.parquet" for name in parts)
    different = [name for name in local if local[name] != cluster[name]]
    assert not different, f"outputs differ between local[*] and the cluster: {different}"
    summary = json.loads(runs["cluster"]["stdout"])
    assert summary["gate"]["rows_valid"] > 10_000 and summary["examples"]["examples"] > 10_000


def test_the_cluster_run_ran_on_both_executors_with_the_shipped_code(
    runs: dict[str, dict], cluster: LocalSparkCluster
) -> None:
    assert "master spark://127.0.0.1:" in runs["cluster"]["stderr"]
    name = re.search(r"code shipped as (features-[0-9a-f]{16}\.zip)", runs["cluster"]["stderr"]).group(1)
    assert (runs["cluster"]["home"] / "cache" / "pyfiles" / name).read_bytes() == zip_bytes()
    fetched = {p.parts[-4] for p in cluster.root.glob(f"work/worker-*/app-*/*/{name}")}
    assert fetched == {"worker-1", "worker-2"}  # each worker's executor fetched the zip
    assert "code shipped" not in runs["local"]["stderr"]  # local[*] executors share the driver's Python


def test_executors_import_the_project_from_the_shipped_zip(
    cluster: LocalSparkCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home, outside = tmp_path_factory.mktemp("home-probe"), tmp_path_factory.mktemp("cwd-probe")
    cmd = [sys.executable, "-c", PROBE, cluster.master_url, "2", "2026-01-02"]
    proc = subprocess.run(cmd, env=_env(home), cwd=outside, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    (name,) = report["includes"]
    assert re.fullmatch(r"features-[0-9a-f]{16}\.zip", name)
    assert [f.rsplit("/", 1)[-1] for f in report["files"]] == [name]
    workers = set()
    for task in report["tasks"]:
        assert task["hooks_removed"] == 1  # the editable install's hook was there, and was taken away
        assert task["features_dirs"] == []  # and no folder on the worker's sys.path holds a features package
        assert task["previous_ds"] == "2026-01-01"
        assert task["file"] == f"./{name}/features/config.py"  # imported from the zip in the executor's folder
        cwd = Path(task["cwd"])
        assert cwd.is_relative_to(cluster.root / "work") and not cwd.is_relative_to(REPO)
        assert str(REPO) not in task["pythonpath"].split(os.pathsep)
        workers.add(cwd.relative_to(cluster.root / "work").parts[0])
    assert workers == {"worker-1", "worker-2"}
