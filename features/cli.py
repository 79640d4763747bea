"""``afm data …`` and ``afm features …``: raw data, the Spark feature jobs, data quality and the Feast store.

Each command is one pipeline step (what a DAG task runs), importing its module lazily so
``afm --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from features.cli_options import ds_callback, ds_option, echo_json, home_option, layout_of, master_option


# --------------------------------------------------------------------------- data
@click.group()
def data() -> None:
    """Raw data: the synthetic world and importers for real data sets."""


@data.command("synth")
@home_option
@click.option("--users", default=None, type=int, help="Number of users.")
@click.option("--items", default=None, type=int, help="Items at the start.")
@click.option("--days", default=None, type=int, help="Days of activity.")
@click.option("--start", "start_ds", default=None, callback=ds_callback, help="First day, YYYY-MM-DD.")
@click.option("--seed", default=None, type=int, help="Random seed (same seed, same bytes).")
@click.option("--size", type=click.Choice(["tiny", "demo", "large"]), default="demo", show_default=True)
def data_synth(home, users, items, days, start_ds, seed, size) -> None:
    """Generate the synthetic world (raw events by ds, items, ground truth)."""
    from features.synth import SynthConfig, generate_world

    cfg = SynthConfig.preset(size)
    overrides = {"n_users": users, "n_items": items, "n_days": days, "start_ds": start_ds, "seed": seed}
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    summary = generate_world(layout_of(home), cfg)
    echo_json(summary)


@data.command("import")
@home_option
@click.option("--format", "fmt", type=click.Choice(["movielens", "sasrec", "taobao"]), required=True)
@click.option("--src", required=True, type=click.Path(exists=True), help="File or folder to import.")
@click.option(
    "--start", "start_ds", default="2026-01-01", callback=ds_callback, help="sasrec only: day of the first event."
)
def data_import(home, fmt, src, start_ds) -> None:
    """Import a real data set into the event contract (raw events by ds + items)."""
    from features import importers

    layout = layout_of(home)
    if fmt == "movielens":
        summary = importers.import_movielens(Path(src), layout)
    elif fmt == "sasrec":
        summary = importers.import_sasrec(Path(src), layout, start_ds=start_ds)
    else:
        summary = importers.import_taobao(Path(src), layout)
    echo_json(summary)


@data.command("best-auc")
@home_option
@ds_option
def data_best_auc(home, ds) -> None:
    """Best per-action AUC the synthetic generator allows on day DS (scoring with the true probabilities)."""
    from features.synth import best_auc

    echo_json(best_auc(layout_of(home), ds))


# ----------------------------------------------------------------------- features
@click.group()
def features() -> None:
    """Spark feature jobs, data-quality gates and the Feast store."""


@features.command("gate")
@home_option
@ds_option
@master_option
def features_gate(home, ds, master) -> None:
    """Validate raw events of DS with GX; write valid/ and quarantine/ (in = valid + quarantined)."""
    from features.gate import run_gate
    from features.spark import spark_session

    with spark_session(master, keep_alive=True) as spark:
        echo_json(run_gate(spark, layout_of(home), ds))


@features.command("sequences")
@home_option
@ds_option
@master_option
def features_sequences(home, ds, master) -> None:
    """Build the user_sequences snapshot of DS from DS-1's snapshot plus DS's valid events."""
    from features.sequences import build_user_sequences
    from features.spark import spark_session

    with spark_session(master, keep_alive=True) as spark:
        echo_json(build_user_sequences(spark, layout_of(home), ds))


@features.command("examples")
@home_option
@ds_option
@master_option
def features_examples(home, ds, master) -> None:
    """Build ranking examples of DS (one row per impression; sequence as of the request time)."""
    from features.examples import build_ranking_examples
    from features.spark import spark_session

    with spark_session(master, keep_alive=True) as spark:
        echo_json(build_ranking_examples(spark, layout_of(home), ds))


@features.command("corpus")
@home_option
@ds_option
@master_option
def features_corpus(home, ds, master) -> None:
    """Build the pretraining corpus of DS from the user_sequences snapshot."""
    from features.corpus import build_pretrain_corpus
    from features.spark import spark_session

    with spark_session(master, keep_alive=True) as spark:
        echo_json(build_pretrain_corpus(spark, layout_of(home), ds))


@features.command("run-day")
@home_option
@ds_option
@master_option
def features_run_day(home, ds, master) -> None:
    """All Spark steps of one day in one Spark session: gate → sequences → examples → corpus → Feast sources."""
    from features.pipeline import run_day

    echo_json(run_day(layout_of(home), ds, master=master))


@features.command("feast-export")
@home_option
@ds_option
@master_option
def features_feast_export(home, ds, master) -> None:
    """Write DS's user sequences and the item catalogue as Feast offline sources."""
    from features.spark import spark_session
    from features.store import export_feast_sources

    with spark_session(master, keep_alive=True) as spark:
        echo_json(export_feast_sources(spark, layout_of(home), ds))


@features.command("docs")
@home_option
def features_docs(home) -> None:
    """Rebuild the Great Expectations data docs and print where they are."""
    from features.quality import build_data_docs

    click.echo(build_data_docs(layout_of(home)))


@features.command("register")
@home_option
def features_register(home) -> None:
    """Register entities and feature views in the Feast registry (feast apply)."""
    from features.store import register

    echo_json(register(layout_of(home)))


@features.command("materialize")
@home_option
@click.option("--end", "end_ds", default=None, callback=ds_callback, help="Materialize up to the end of this day.")
def features_materialize(home, end_ds) -> None:
    """Copy the latest feature values from the offline parquet sources to the online store."""
    from features.store import materialize

    echo_json(materialize(layout_of(home), end_ds=end_ds))
