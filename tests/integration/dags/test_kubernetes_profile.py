"""The same DAG files in the kubernetes profile: same task ids and order, and each task's resource for a day validates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from afm.k8s_validate import validate

DAGS = Path(__file__).resolve().parents[3] / "dags"
CRDS = Path(__file__).resolve().parents[4] / "shared" / "k8s" / "crds"
DAY = "2026-01-05"
SPARK_STEPS = {"gate", "user_sequences", "ranking_examples", "pretrain_corpus", "feast_export"}
TRAIN_STEPS = {"pretrain": "afm-pretrain", "finetune": "afm-finetune"}


def _dagbag(profile: str, airflow_home: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    before = os.environ.get("AFM_EXECUTION")
    os.environ["AFM_EXECUTION"] = profile
    os.environ.setdefault("AIRFLOW_HOME", str(airflow_home))
    try:
        return DagBag(str(DAGS))
    finally:
        os.environ.pop("AFM_EXECUTION") if before is None else os.environ.__setitem__("AFM_EXECUTION", before)


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("airflow")
    return {p: _dagbag(p, home) for p in ("local", "kubernetes")}


def _shape(dag: Any) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    return [
        (t.task_id, tuple(sorted(t.upstream_task_ids)), tuple(sorted(o.name for o in t.outlets)))
        for t in dag.topological_sort()
    ]


def test_both_profiles_parse_with_the_same_tasks_in_the_same_order(bags: dict[str, Any]) -> None:
    local, kube = bags["local"], bags["kubernetes"]
    assert local.import_errors == {} and kube.import_errors == {}
    assert (
        set(local.dag_ids)
        == set(kube.dag_ids)
        == {"activity_features", "foundation_pretrain", "ranker_finetune", "publish_serving"}
    )
    for dag_id in local.dag_ids:
        assert _shape(kube.dags[dag_id]) == _shape(local.dags[dag_id]), dag_id


def test_each_step_runs_where_its_kind_of_work_belongs(bags: dict[str, Any]) -> None:
    kinds: dict[str, str] = {}
    for dag in bags["kubernetes"].dags.values():
        for task in dag.tasks:
            kinds[f"{dag.dag_id}.{task.task_id}"] = type(task).__name__
    for dag in bags["local"].dags.values():
        assert {type(t).__name__ for t in dag.tasks} <= {"PythonOperator", "PythonSensor"}
    for name, kind in kinds.items():
        task_id = name.split(".", 1)[1]
        expected = (
            "PythonSensor" if task_id == "raw_events_arrived"
            else "SparkStepOperator" if task_id in SPARK_STEPS
            else "TrainJobOperator" if task_id in TRAIN_STEPS
            else "AfmPodOperator"
        )  # fmt: skip
        assert kind == expected, name
    train = bags["kubernetes"].dags["foundation_pretrain"].get_task("pretrain")
    assert train.mode == "reschedule" and train.template_name == "afm-pretrain"
    assert bags["kubernetes"].dags["publish_serving"].get_task("roll_out").retries == 0


def _resources(bags: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for dag in bags["kubernetes"].dags.values():
        for task in dag.tasks:
            if hasattr(task, "resource"):
                out.append((task.task_id, task.resource(DAY)))
    return out


def test_the_day_and_the_image_tag_fill_the_templates(bags: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFM_IMAGE_TAG", "1.2.3")
    resources = dict(_resources(bags))
    assert set(resources) == SPARK_STEPS | set(TRAIN_STEPS)
    pretrain = resources["pretrain"]["spec"]["trainer"]
    # the DAG gives the command and the day (the corpus of the day before), the template the cluster's options
    assert pretrain["args"] == ["train", "pretrain", "--ds", "2026-01-04", "--size", "base", "--device", "cuda"]
    assert pretrain["command"] == ["torchrun", "--no-python", "afm"]
    assert pretrain["image"].endswith("/activityfm-cuda:1.2.3")
    assert resources["pretrain"]["metadata"]["name"] == "afm-pretrain-2026-01-05-t1"
    assert resources["finetune"]["spec"]["trainer"]["args"][-2:] == ["--device", "cuda"]
    sequences = resources["user_sequences"]
    assert sequences["spec"]["arguments"] == ["features", "sequences", "--ds", DAY]
    assert sequences["spec"]["image"].endswith("/activityfm:1.2.3")
    assert sequences["metadata"] == {
        **sequences["metadata"],
        "name": "afm-user-sequences-2026-01-05",
        "namespace": "activityfm",
    }


@pytest.mark.skipif(not CRDS.exists(), reason="../shared/k8s/crds is not present")
def test_every_task_resource_for_a_day_validates_against_its_crd(bags: dict[str, Any]) -> None:
    resources = _resources(bags)
    assert len(resources) == len(SPARK_STEPS) + len(TRAIN_STEPS)
    for task_id, doc in resources:
        validate(doc, CRDS)  # raises naming the field
        assert all("DS" != a for a in doc["spec"].get("arguments", doc["spec"].get("trainer", {}).get("args", []))), (
            task_id
        )


def test_every_pod_task_builds_a_valid_pod(bags: dict[str, Any]) -> None:
    from kubernetes.client import ApiClient

    pods = [t for dag in bags["kubernetes"].dags.values() for t in dag.tasks if type(t).__name__ == "AfmPodOperator"]
    assert {t.task_id for t in pods} == {
        "feast_register",
        "feast_materialize",
        "data_docs",
        "publish_user_embeddings",
        "roll_out",
    }
    for task in pods:
        task.arguments = task.afm_args  # what execute() sets for the run's day
        pod = ApiClient().sanitize_for_serialization(task.build_pod_request_obj(dry_run=True))
        validate(pod, CRDS)  # a built-in kind: kubernetes-validate, strict
        (container,) = pod["spec"]["containers"]
        assert container["command"] == ["afm"] and container["args"] == task.afm_args
        assert pod["metadata"]["namespace"] == "activityfm"
        env = {e["name"]: e for e in container["env"]}
        assert env["AFM_FEAST_REGISTRY"]["valueFrom"]["secretKeyRef"] == {
            "name": "afm-secrets",
            "key": "feast-registry-url",
        }
        assert {"name": "data", "mountPath": "/data"}.items() <= container["volumeMounts"][0].items()
