"""Daily: user embeddings from the CURRENT ranker (tagged with its version) → Feast online store."""

import datetime as dt

from airflow.sdk import DAG, chain

from afm.orchestration import START_DATE, afm_step, daily_after_midnight

with DAG(
    dag_id="publish_serving",
    schedule=daily_after_midnight(hour=6),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": dt.timedelta(minutes=1)},
    tags=["activityfm", "serving"],
    doc_md=__doc__,
):
    chain(
        afm_step("feast_register", "features", "register"),
        afm_step("publish_user_embeddings", "publish-embeddings"),
    )
