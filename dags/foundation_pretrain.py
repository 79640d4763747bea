"""Weekly: pretrain the PinFM backbone on the corpus of the week's first day (next-token InfoNCE)."""

from airflow.sdk import DAG, CronDataIntervalTimetable

from serving.orchestration import START_DATE, afm_step

with DAG(
    dag_id="foundation_pretrain",
    schedule=CronDataIntervalTimetable("0 3 * * 1", timezone="UTC"),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    tags=["activityfm", "training"],
    doc_md=__doc__,
):
    afm_step("pretrain", "train", "pretrain", "--ds", "{ds}")
