"""On a new ranker: user embeddings of CURRENT → Feast; the running service loads it, checked by a smoke request.

Scheduled on the ``ranker`` asset. ``roll_out`` tells the service at ``$AFM_SERVICE_URL`` to
reload (Bearer ``$AFM_ADMIN_TOKEN``) and ranks for one published user: the answer must come
from CURRENT with ``embedding_source: precomputed``. When it does not, the task rolls the
registry back to the previous ranker, reloads the service with it, and fails with a message
saying so (and an alert). Without ``$AFM_SERVICE_URL`` the roll-out is skipped.
"""

from airflow.sdk import DAG, chain

from afm.assets import RANKER, SERVED_MODEL
from afm.orchestration import DEFAULT_ARGS, START_DATE, afm_step

with DAG(
    dag_id="publish_serving",
    schedule=[RANKER],
    start_date=START_DATE,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["activityfm", "serving"],
    doc_md=__doc__,
):
    chain(
        afm_step("feast_register", "features", "register"),
        afm_step("publish_user_embeddings", "publish-embeddings"),
        afm_step("roll_out", "roll-out", retries=0, needs_env="AFM_SERVICE_URL", outlets=[SERVED_MODEL]),
    )
