"""Daily: raw events of day D → GX gate → user sequences → ranking examples → corpus → Feast."""

import datetime as dt

from airflow.sdk import DAG, chain

from afm.orchestration import START_DATE, afm_step, daily_after_midnight

with DAG(
    dag_id="activity_features",
    schedule=daily_after_midnight(hour=1),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": dt.timedelta(minutes=1)},
    tags=["activityfm", "features"],
    doc_md=__doc__,
):
    chain(
        afm_step("gate", "features", "gate", "--ds", "{ds}"),
        # the D snapshot is built from D-1's: days must run in order
        afm_step("user_sequences", "features", "sequences", "--ds", "{ds}", depends_on_past=True),
        afm_step("ranking_examples", "features", "examples", "--ds", "{ds}"),
        afm_step("pretrain_corpus", "features", "corpus", "--ds", "{ds}"),
        afm_step("feast_export", "features", "feast-export", "--ds", "{ds}"),
        afm_step("feast_register", "features", "register"),
        afm_step("feast_materialize", "features", "materialize", "--end", "{ds}"),
        afm_step("data_docs", "features", "docs"),
    )
