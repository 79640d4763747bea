"""On new corpus: pretrain the PinFM backbone on the corpus of the day before the newest.

Scheduled on the ``pretrain_corpus`` asset. A run triggered by day D's corpus trains on the
corpus of D-1, so the ranker fine-tuned next (evaluated on D, the newest examples) is judged
on a day its backbone never saw. On the first day there is no D-1 corpus and the task is
skipped. Next-, multi- and future-token losses through the shared trainer; the run
checkpoints under $AFM_HOME/runs, so a retried task resumes where the failed try stopped.
"""

from airflow.sdk import DAG

from afm.assets import PINFM_BACKBONE, PRETRAIN_CORPUS
from afm.orchestration import DEFAULT_ARGS, START_DATE, afm_step

with DAG(
    dag_id="foundation_pretrain",
    schedule=[PRETRAIN_CORPUS],
    start_date=START_DATE,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["activityfm", "training"],
    doc_md=__doc__,
):
    afm_step("pretrain", "train", "pretrain", "--ds", "{prev_ds}", outlets=[PINFM_BACKBONE], skip_when_missing=True,
             trainjob="afm-pretrain")  # fmt: skip
