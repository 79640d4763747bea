"""``afm airflow up | down | status``: the local Airflow deployment (:mod:`afm.local_airflow`)."""

from __future__ import annotations

import json
import logging

import click

from features.cli_options import home_option, layout_of

api_port_option = click.option(
    "--api-port", envvar="AFM_AIRFLOW_PORT", default=8080, show_default=True, type=int, help="UI and REST API port."
)
pg_port_option = click.option(
    "--pg-port", envvar="AFM_PG_PORT", default=55432, show_default=True, type=int, help="PostgreSQL port."
)


def _deployment(home: str | None, api_port: int, pg_port: int):
    from afm.local_airflow import LocalAirflow

    return LocalAirflow(layout_of(home), api_port=api_port, pg_port=pg_port)


@click.group("airflow")
def airflow() -> None:
    """The local Airflow deployment: scheduler, API server, DAG processor, triggerer on PostgreSQL."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


@airflow.command("up")
@home_option
@api_port_option
@pg_port_option
@click.option("--timeout", default=300, show_default=True, type=int, help="Seconds to wait for health.")
def up(home, api_port, pg_port, timeout) -> None:
    """Start PostgreSQL and Airflow (LocalExecutor); print the UI's address and login."""
    from afm.local_airflow import ADMIN_USER, AirflowDeployError

    dep = _deployment(home, api_port, pg_port)
    try:
        dep.up(timeout_s=timeout, echo=lambda msg: click.echo(f"[airflow] {msg}"))
    except AirflowDeployError as exc:
        raise click.ClickException(f"{exc}\n(stop what started with: afm airflow down)") from exc
    click.echo(f"[airflow] UI: {dep.url}  login: {ADMIN_USER} / password in {dep.root / 'secrets.json'}")
    click.echo(f"[airflow] CLI: source {dep.env_file}  then e.g. airflow dags list")


@airflow.command("down")
@home_option
@api_port_option
@pg_port_option
def down(home, api_port, pg_port) -> None:
    """Stop Airflow's components and PostgreSQL (the metadata database and logs stay)."""
    _deployment(home, api_port, pg_port).down()
    click.echo("[airflow] stopped")


@airflow.command("status")
@home_option
@api_port_option
@pg_port_option
def status(home, api_port, pg_port) -> None:
    """One JSON line: PostgreSQL, each component's pid (null = not running), the health report."""
    click.echo(json.dumps(_deployment(home, api_port, pg_port).status(), sort_keys=True))
