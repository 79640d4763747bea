"""Daily: fine-tune the ranker from the latest backbone; evaluate on day D; promote if it passes the gate."""

from airflow.sdk import DAG

from afm.orchestration import START_DATE, afm_step, daily_after_midnight

with DAG(
    dag_id="ranker_finetune",
    schedule=daily_after_midnight(hour=4),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    tags=["activityfm", "training"],
    doc_md=__doc__,
):
    afm_step("finetune", "train", "finetune", "--ds", "{ds}", "--backbone", "latest", "--promote")
