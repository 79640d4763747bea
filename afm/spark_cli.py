"""``afm spark up | down | status``: the local Spark standalone cluster (:mod:`afm.spark_cluster`)."""

from __future__ import annotations

import json
import logging

import click

from features.cli_options import home_option, layout_of

master_port_option = click.option(
    "--master-port", envvar="AFM_SPARK_MASTER_PORT", default=7077, show_default=True, type=int,
    help="The master's port (spark://127.0.0.1:PORT).",
)  # fmt: skip
ui_port_option = click.option(
    "--ui-port", envvar="AFM_SPARK_UI_PORT", default=8090, show_default=True, type=int,
    help="The master's web UI port; worker i uses UI_PORT + i.",
)  # fmt: skip


def _cluster(home: str | None, master_port: int, ui_port: int, **sizes):
    from afm.spark_cluster import LocalSparkCluster

    return LocalSparkCluster(layout_of(home), master_port=master_port, ui_port=ui_port, **sizes)


def _started(home: str | None, master_port: int, ui_port: int):
    """The cluster ``up`` recorded under this home (its ports and workers), else one from the options."""
    from afm.spark_cluster import LocalSparkCluster

    return LocalSparkCluster.recorded(layout_of(home)) or _cluster(home, master_port, ui_port)


@click.group("spark")
def spark() -> None:
    """The local Spark standalone cluster: a master and workers on 127.0.0.1, from the PySpark distribution."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


@spark.command("up")
@home_option
@master_port_option
@ui_port_option
@click.option("--workers", envvar="AFM_SPARK_WORKERS", default=2, show_default=True, type=int)
@click.option("--worker-cores", default=1, show_default=True, type=int, help="Cores each worker offers.")
@click.option("--worker-memory", default="1g", show_default=True, help="Memory each worker offers to executors.")
@click.option("--timeout", default=120, show_default=True, type=int, help="Seconds to wait for the workers.")
def up(home, master_port, ui_port, workers, worker_cores, worker_memory, timeout) -> None:
    """Start the master and the workers; wait until every worker is ALIVE; print the master URL."""
    from afm.spark_cluster import SparkClusterError

    cluster = _cluster(home, master_port, ui_port, workers=workers, worker_cores=worker_cores,
                       worker_memory=worker_memory)  # fmt: skip
    try:
        cluster.up(timeout_s=timeout, echo=lambda msg: click.echo(f"[spark] {msg}"))
    except SparkClusterError as exc:
        raise click.ClickException(f"{exc}\n(stop what started with: afm spark down)") from exc
    click.echo(f"[spark] run the feature steps on it: afm features run-day --ds DS --master {cluster.master_url}")
    click.echo(f"[spark]   (or export AFM_SPARK_MASTER={cluster.master_url}); logs in {cluster.root / 'logs'}")


@spark.command("down")
@home_option
@master_port_option
@ui_port_option
def down(home, master_port, ui_port) -> None:
    """Stop the workers (and their executors) and the master; logs and work folders stay."""
    _started(home, master_port, ui_port).down()
    click.echo("[spark] stopped")


@spark.command("status")
@home_option
@master_port_option
@ui_port_option
def status(home, master_port, ui_port) -> None:
    """One JSON line: the master URL, each daemon's pid (null = not running), the ALIVE workers."""
    click.echo(json.dumps(_started(home, master_port, ui_port).status(), sort_keys=True))
