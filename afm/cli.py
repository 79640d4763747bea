"""``afm`` — one command per pipeline step, grouped by the package that owns the step.

Every step a DAG task runs is a command here, so on-call runs exactly the same step by
hand (``afm features run-day --ds 2026-01-05``). Each package owns its command group
(``features.cli``, ``training.cli``, ``serving.cli``); this module mounts them under one
root and adds what spans them all (``afm demo``, ``afm report``). Commands import their
modules lazily, so ``afm --help`` stays fast.

Common options: ``--home`` (or ``AFM_HOME``) picks the data root, default ``./var``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from afm.airflow_cli import airflow as airflow_group
from afm.events_cli import events as events_group
from afm.k8s_cli import k8s as k8s_group
from afm.kubernetes_profile import EXIT_NOTHING_TO_DO
from afm.spark_cli import spark as spark_group
from features import cli as features_cli
from features.cli_options import home_option, layout_of
from serving import cli as serving_cli
from training import cli as training_cli


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """ActivityFM: activity sequences → foundation model → rankings."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


for _command in (
    features_cli.data,
    features_cli.features,
    training_cli.train,
    training_cli.bench,
    training_cli.eval_,
    training_cli.model,
    serving_cli.serve,
    serving_cli.publish_embeddings,
    serving_cli.roll_out,
    events_group,
    airflow_group,
    k8s_group,
    spark_group,
):
    cli.add_command(_command)


def _concurrencies(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected a comma-separated list of client counts ≥ 1, e.g. 1,4,16; got {value!r}")
    return out


@training_cli.bench.command("serving")
@home_option
@click.option(
    "--world",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="The demo world to serve (default $AFM_HOME/bench/serving-world; built there on first use).",
)
@click.option("--store", type=click.Choice(["sqlite", "redis"]), default="sqlite", show_default=True)
@click.option("--candidates", default=500, show_default=True, type=click.IntRange(min=1), help="Per request.")
@click.option("--concurrency", default="1,4,16", show_default=True, callback=_concurrencies, help="Clients per run.")
@click.option("--seconds", default=30.0, show_default=True, type=click.FloatRange(min=0.5), help="Per run.")
@click.option("--drill/--no-drill", default=True, show_default=True, help="Promote and reload under load.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Also append the lines here.")
@click.option(
    "--out-dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the latency histogram (PNG) and the service's log go (default <world>/bench).",
)
def bench_serving(home, world, store, candidates, concurrency, seconds, drill, out_path, out_dir) -> None:
    """The service under HTTP load on the demo world: one JSON line per concurrency, a latency histogram.

    Judged by ratio = candidates_per_s / offline_candidates_per_s (the same model in-process,
    no HTTP), beside p50/p99 latency, the time inside the model (overhead_share) and Feast's
    read against a raw read of the same keys (fetch_overhead_ratio). The roll-out drill
    promotes a copy of the ranker and reloads the service halfway through one run.
    """
    import json

    from afm.bench_serving import bench_serving as run

    world = world or layout_of(home).root / "bench" / "serving-world"
    lines = run(world, store, candidates, concurrency, seconds, out_dir=out_dir, drill=drill)
    for line in lines:
        click.echo(json.dumps(line, sort_keys=True))
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        with Path(out_path).open("a", encoding="utf-8") as out:
            out.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)


@cli.command("demo")
@home_option
@click.option("--size", type=click.Choice(["tiny", "demo"]), default="demo", show_default=True)
def demo(home, size) -> None:
    """Run the whole pipeline on a fresh synthetic world through the Airflow DAGs and query the service."""
    from afm.demo import run_demo

    sys.exit(run_demo(layout_of(home), size=size))


@cli.command("report")
@click.option("--check", is_flag=True, help="Write nothing; fail when a table is out of date with its JSON lines.")
@click.argument("directory", default="docs/experiments", type=click.Path(file_okay=False, path_type=Path))
def report(check: bool, directory: Path) -> None:
    """Regenerate the result tables of docs/experiments/*.md from their results/*.jsonl."""
    from afm.report import main as report_main

    sys.exit(report_main([*(["--check"] if check else []), str(directory)]))


def run_afm(*args: str) -> None:
    """Run one ``afm`` command in this process (what DAG tasks call); raises when it fails.

    Example: ``run_afm("features", "gate", "--ds", "2026-01-05")``.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    logging.getLogger(__name__).info("afm %s", " ".join(args))
    try:
        cli.main(list(args), prog_name="afm", standalone_mode=False)
    except SystemExit as exc:  # `afm demo` and click's own exits
        if exc.code not in (0, None):
            raise RuntimeError(f"afm {' '.join(args)} exited with {exc.code}") from exc


#: Errors that carry a complete, user-facing message: printed as one line (traceback with -v).
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, KeyError)


def main() -> None:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    try:
        cli.main(prog_name="afm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("afm: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        from features.spark import SparkJobError, is_spark_error, spark_failure

        spark_failed = is_spark_error(exc)
        if not (spark_failed or isinstance(exc, USER_ERRORS)) or "-v" in sys.argv or "--verbose" in sys.argv:
            raise
        message = f"{SparkJobError.__name__}: {spark_failure(exc)}" if spark_failed else f"{type(exc).__name__}: {exc}"
        click.echo(f"afm: error: {message}", err=True)
        # a missing input says "nothing to do yet" to whoever runs the command (a DAG's pod or TrainJob)
        sys.exit(EXIT_NOTHING_TO_DO if isinstance(exc, FileNotFoundError) else 1)


if __name__ == "__main__":
    main()
