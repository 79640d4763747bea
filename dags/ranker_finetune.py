"""On a new backbone: fine-tune the ranker on the newest examples; promote it if it passes the gate.

Scheduled on the ``pinfm_backbone`` asset. Evaluates on the newest ``ranking_examples`` day
(all earlier days train) with the newest backbone; the run checkpoints under $AFM_HOME/runs,
so a retried task resumes.
"""

from airflow.sdk import DAG

from afm.assets import PINFM_BACKBONE, RANKER
from afm.orchestration import DEFAULT_ARGS, START_DATE, afm_step

with DAG(
    dag_id="ranker_finetune",
    schedule=[PINFM_BACKBONE],
    start_date=START_DATE,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["activityfm", "training"],
    doc_md=__doc__,
):
    # with examples of one day only there is nothing to train on yet: skipped
    afm_step("finetune", "train", "finetune", "--backbone", "latest", "--promote", outlets=[RANKER],
             skip_when_missing=True, trainjob="afm-finetune")  # fmt: skip
