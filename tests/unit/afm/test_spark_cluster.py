"""``afm spark``: the daemons' command lines and environment, and what ``up`` refuses (no JVM is started).

The cluster itself runs in tests/integration/features/test_spark_cluster.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from afm.cli import cli
from afm.spark_cluster import LocalSparkCluster, SparkClusterError, spark_home
from features.config import Layout


def test_daemon_command_lines(tmp_path: Path) -> None:
    cluster = LocalSparkCluster(Layout(tmp_path), master_port=17077, ui_port=18090, worker_memory="2g")
    spark_class = str(spark_home() / "bin" / "spark-class")
    assert cluster.daemons == ("master", "worker-1", "worker-2")
    assert cluster.command("master") == [spark_class, "org.apache.spark.deploy.master.Master", "--host",
                                         "127.0.0.1", "--port", "17077", "--webui-port", "18090"]  # fmt: skip
    assert cluster.command("worker-2") == [
        spark_class, "org.apache.spark.deploy.worker.Worker", "spark://127.0.0.1:17077", "--host", "127.0.0.1",
        "--webui-port", "18092", "--cores", "1", "--memory", "2g",
        "--work-dir", str(tmp_path / "deploy" / "spark" / "work" / "worker-2"),
    ]  # fmt: skip


def test_the_daemons_environment_has_no_pythonpath(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    env = LocalSparkCluster(Layout(tmp_path)).environment()
    assert "PYTHONPATH" not in env
    assert env["SPARK_HOME"] == str(spark_home()) and env["SPARK_LOCAL_IP"] == "127.0.0.1"
    assert "-Dspark.master.rest.enabled=false" in env["SPARK_MASTER_OPTS"]


def test_a_busy_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cluster = LocalSparkCluster(Layout(tmp_path), master_port=port, ui_port=port + 1)
        refused = rf"the master port, {port} on 127.0.0.1, is in use by another program: .*AFM_SPARK_MASTER_PORT"
        with pytest.raises(SparkClusterError, match=refused):
            cluster.up(timeout_s=5)
    assert not (tmp_path / "deploy" / "spark" / "run").exists()


def test_no_java_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SparkClusterError, match="Spark needs Java 17"):
        LocalSparkCluster(Layout(tmp_path)).up(timeout_s=5)


def test_status_and_down_use_the_recorded_cluster(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["spark", "status", "--home", str(tmp_path)])
    assert out.exit_code == 0, out.output
    status = json.loads(out.output.strip().splitlines()[-1])
    assert status["master_url"] == "spark://127.0.0.1:7077"
    assert status["daemons"] == {"master": None, "worker-1": None, "worker-2": None}
    recorded = LocalSparkCluster(Layout(tmp_path), master_port=17177, ui_port=18190, workers=3)
    recorded.root.mkdir(parents=True)
    (recorded.root / "cluster.json").write_text(json.dumps(recorded.settings()))
    assert LocalSparkCluster.recorded(Layout(tmp_path)) == recorded
    out = runner.invoke(cli, ["spark", "status", "--home", str(tmp_path)])
    status = json.loads(out.output.strip().splitlines()[-1])
    assert status["master_url"] == "spark://127.0.0.1:17177" and len(status["daemons"]) == 4
    assert status["alive_workers"] is None
    assert runner.invoke(cli, ["spark", "down", "--home", str(tmp_path)]).output.strip() == "[spark] stopped"
