"""Daily, once day D is over: wait for its raw events → GX gate → user sequences → ranking examples → corpus → Feast.

Produces the feature assets of day D (afm/assets.py), on which the training DAGs are
scheduled. Backfill a range with ``airflow backfill create --dag-id activity_features
--from-date D1 --to-date D2 --reprocess-behavior failed`` (docs/runbook.md). A run must be
done 3 hours after it starts (03:00 UTC the next day for a scheduled run), waiting for late
raw data included; later it fails with a deadline alert. (Airflow 3.3.2's experimental
deadline alerts break ``dag.test()`` and ``airflow tasks clear``, so the DAG uses
``dagrun_timeout``.)
"""

import datetime as dt

from airflow.sdk import DAG, chain

from afm.alerts import run_failed
from afm.assets import FEAST_ONLINE, PRETRAIN_CORPUS, RANKING_EXAMPLES, USER_SEQUENCES
from afm.orchestration import DEFAULT_ARGS, START_DATE, afm_step, daily_after_midnight, raw_events_arrived

with DAG(
    dag_id="activity_features",
    schedule=daily_after_midnight(),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    # every step waits for the same step of the day before: days stay in order in a backfill too
    default_args={**DEFAULT_ARGS, "depends_on_past": True},
    # the deadline: a run not done 3 hours after it started (D+1 03:00 UTC for a scheduled run) fails, alerting
    dagrun_timeout=dt.timedelta(hours=3),
    on_failure_callback=run_failed,
    tags=["activityfm", "features"],
    doc_md=__doc__,
):
    chain(
        raw_events_arrived(),
        afm_step("gate", "features", "gate", "--ds", "{ds}", spark=True),
        # the D snapshot is built from D-1's
        afm_step("user_sequences", "features", "sequences", "--ds", "{ds}", outlets=[USER_SEQUENCES], spark=True),
        afm_step("ranking_examples", "features", "examples", "--ds", "{ds}", outlets=[RANKING_EXAMPLES], spark=True),
        afm_step("pretrain_corpus", "features", "corpus", "--ds", "{ds}", outlets=[PRETRAIN_CORPUS], spark=True),
        afm_step("feast_export", "features", "feast-export", "--ds", "{ds}", spark=True),
        afm_step("feast_register", "features", "register"),
        afm_step("feast_materialize", "features", "materialize", "--end", "{ds}", outlets=[FEAST_ONLINE]),
        afm_step("data_docs", "features", "docs"),
    )  # fmt: skip
