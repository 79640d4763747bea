"""Click options and output helpers that every ``afm`` command group shares.

The data root (``--home`` / ``AFM_HOME``), the partition day (``--ds``) and the Spark master
are the same option in every group; commands print their result as one JSON line.
"""

from __future__ import annotations

import json
from typing import Any

import click

from features.config import Layout, parse_ds


def layout_of(home: str | None) -> Layout:
    """The data root a command works on: ``--home``, else ``AFM_HOME``, else ``./var``."""
    return Layout.at(home)


def ds_callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Click callback: check a ``YYYY-MM-DD`` day, with the parser's message as the usage error."""
    if value is None:
        return None
    try:
        parse_ds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


home_option = click.option("--home", envvar="AFM_HOME", default=None, help="Data root (default: $AFM_HOME or ./var).")
ds_option = click.option("--ds", required=True, callback=ds_callback, help="Partition day, YYYY-MM-DD (UTC).")
master_option = click.option(
    "--master", envvar="AFM_SPARK_MASTER", default=None, help="Spark master (default local[*])."
)


def echo_json(obj: object) -> None:
    """Print ``obj`` as one JSON line (keys sorted; datetimes and paths as strings)."""
    click.echo(json.dumps(obj, default=str, sort_keys=True))


def rounded(obj: Any, digits: int = 6) -> Any:
    """``obj`` with every float (in nested dicts and lists too) rounded to ``digits``."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj
