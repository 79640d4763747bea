"""Weekly: pretrain the PinFM backbone on the corpus of the week's first day.

Next-, multi- and future-token losses (training/model/objectives.py) through the shared trainer
(training/trainer.py): the run checkpoints under $AFM_HOME/runs, so a retried task resumes
where the failed try stopped instead of starting over.
"""

from airflow.sdk import DAG, CronDataIntervalTimetable

from afm.orchestration import START_DATE, afm_step

with DAG(
    dag_id="foundation_pretrain",
    schedule=CronDataIntervalTimetable("0 3 * * 1", timezone="UTC"),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    tags=["activityfm", "training"],
    doc_md=__doc__,
):
    afm_step("pretrain", "train", "pretrain", "--ds", "{ds}", retries=2)
