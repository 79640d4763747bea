"""The DAG folder parses without import errors and wires the afm steps as documented."""

from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[3] / "dags"


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
    assert order[:4] == ["gate", "user_sequences", "ranking_examples", "pretrain_corpus"]
    assert dag.get_task("user_sequences").depends_on_past
    assert dag.max_active_runs == 1


def test_day_window_comes_from_data_interval_timetable(dagbag) -> None:
    for dag in dagbag.dags.values():
        assert type(dag.timetable).__name__ == "CronDataIntervalTimetable", dag.dag_id
