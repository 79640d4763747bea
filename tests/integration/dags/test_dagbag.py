"""The DAG folder parses without import errors and wires the afm steps as documented."""

from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[3] / "dags"
DATA_DAGS = ("foundation_pretrain", "ranker_finetune", "publish_serving")


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory):
    import os

    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(DAGS))


def test_no_import_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"activity_features", "foundation_pretrain", "ranker_finetune", "publish_serving"}


def test_activity_features_runs_steps_in_order(dagbag) -> None:
    dag = dagbag.dags["activity_features"]
    order = [t.task_id for t in dag.topological_sort()]
    assert order[:5] == ["raw_events_arrived", "gate", "user_sequences", "ranking_examples", "pretrain_corpus"]
    assert dag.get_task("raw_events_arrived").mode == "reschedule"
    assert dag.get_task("user_sequences").depends_on_past
    assert dag.max_active_runs == 1


def test_features_run_on_the_clock_and_the_rest_on_the_assets_before_them(dagbag) -> None:
    assert type(dagbag.dags["activity_features"].timetable).__name__ == "CronDataIntervalTimetable"
    schedules = {dag_id: dagbag.dags[dag_id].timetable.asset_condition for dag_id in DATA_DAGS}
    produced = {
        dag_id: {o.name for t in dagbag.dags[dag_id].tasks for o in t.outlets}
        for dag_id in ("activity_features", *DATA_DAGS)
    }
    assert {a.name for a in schedules["foundation_pretrain"].objects} == {"pretrain_corpus"}
    assert {a.name for a in schedules["ranker_finetune"].objects} == {"pinfm_backbone"}
    assert {a.name for a in schedules["publish_serving"].objects} == {"ranker"}
    assert {"user_sequences", "ranking_examples", "pretrain_corpus", "feast_online"} <= produced["activity_features"]
    assert produced["foundation_pretrain"] == {"pinfm_backbone"} and produced["ranker_finetune"] == {"ranker"}


def test_failures_alert_and_only_transient_ones_retry(dagbag) -> None:
    from afm.alerts import task_failed

    for dag in dagbag.dags.values():
        for task in dag.tasks:
            callbacks = task.on_failure_callback
            assert callbacks is task_failed or task_failed in (callbacks or []), task.task_id
    assert dagbag.dags["activity_features"].get_task("gate").retries == 2  # bad data fails at once, at run time
    assert dagbag.dags["publish_serving"].get_task("roll_out").retries == 0  # it rolls back: never twice
    features = dagbag.dags["activity_features"]
    assert features.dagrun_timeout.total_seconds() == 3 * 3600  # the deadline, alerting through run_failed
    from afm.alerts import run_failed

    callbacks = features.on_failure_callback
    assert callbacks is run_failed or run_failed in (callbacks or [])
