"""The kubernetes profile's pieces without a cluster: names, template filling, and the TrainJob watch."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest

from afm import kubernetes_profile as kp


def test_the_profile_is_local_unless_asked_and_a_typo_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFM_EXECUTION", raising=False)
    assert kp.execution() == "local"
    monkeypatch.setenv("AFM_EXECUTION", "Kubernetes")
    assert kp.execution() == "kubernetes"
    monkeypatch.setenv("AFM_EXECUTION", "k8s")
    with pytest.raises(ValueError, match="AFM_EXECUTION must be one of"):
        kp.execution()


def test_names_are_rfc_1035_labels_and_tags_replace_only_the_tag() -> None:
    assert kp.resource_name("user_sequences", "2026-01-05") == "afm-user-sequences-2026-01-05"
    long = kp.resource_name("x" * 80, "2026-01-05", "t3")
    assert len(long) <= 63 and not long.endswith("-")
    assert (
        kp.with_tag("registry.example.com:5000/activityfm:0.1.0", "0.2.0")
        == "registry.example.com:5000/activityfm:0.2.0"
    )
    assert kp.with_tag("activityfm", "dev") == "activityfm:dev"
    assert kp.with_tag("activityfm:1", None) == "activityfm:1"


def test_the_dag_gives_the_command_and_the_template_the_cluster_options() -> None:
    template = ["train", "pretrain", "--ds", "DS", "--size", "base", "--device", "cuda", "--promote"]
    argv = ["train", "pretrain", "--ds", "2026-01-04", "--size", "tiny"]
    assert kp.with_template_options(argv, template) == [*argv, "--device", "cuda", "--promote"]


def test_an_unknown_overlay_names_where_it_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFM_K8S_OVERLAY", "staging")
    with pytest.raises(FileNotFoundError, match="overlay 'staging'"):
        kp.overlay_dir()


class _NotFound(Exception):
    status = 404


class FakeHook:
    """The two KubernetesHook calls the TrainJob watch makes, over a dict (no cluster here)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.exit_codes: list[int] = []
        self.core_v1_client = SimpleNamespace(list_namespaced_pod=self._pods)

    def get_custom_object(self, group: str, version: str, plural: str, name: str, namespace: str) -> dict[str, Any]:
        if name not in self.objects:
            raise _NotFound(name)
        return self.objects[name]

    def create_custom_object(self, group: str, version: str, plural: str, body: dict, namespace: str) -> None:
        assert plural == "trainjobs" and body["kind"] == "TrainJob"
        self.objects[body["metadata"]["name"]] = body

    def finish(self, name: str, condition: str) -> None:
        self.objects[name]["status"] = {"conditions": [{"type": condition, "status": "True"}]}

    def _pods(self, namespace: str, label_selector: str) -> Any:
        terminated = [
            SimpleNamespace(state=SimpleNamespace(terminated=SimpleNamespace(exit_code=c))) for c in self.exit_codes
        ]
        return SimpleNamespace(items=[SimpleNamespace(status=SimpleNamespace(container_statuses=terminated))])


def _operator(**kwargs: Any) -> Any:
    cls = kp.operators()["train"]
    return cls(
        task_id="pretrain", afm_args=["train", "pretrain", "--ds", "{prev_ds}"], template_name="afm-pretrain", **kwargs
    )


def _context(try_number: int = 1) -> dict[str, Any]:
    return {
        "logical_date": dt.datetime(2026, 1, 5, tzinfo=dt.UTC),
        "ti": SimpleNamespace(try_number=try_number),
        "outlet_events": defaultdict(lambda: SimpleNamespace(extra=None)),
    }


def test_the_trainjob_is_created_once_per_try_and_watched_until_complete() -> None:
    op, hook = _operator(), FakeHook()
    op.hook = lambda: hook
    ctx = _context()
    assert op.poke(ctx) is False  # created
    assert list(hook.objects) == ["afm-pretrain-2026-01-05-t1"]
    assert hook.objects["afm-pretrain-2026-01-05-t1"]["spec"]["trainer"]["args"][:4] == [
        "train",
        "pretrain",
        "--ds",
        "2026-01-04",
    ]
    assert op.poke(ctx) is False and len(hook.objects) == 1  # a rescheduled poke finds it, creates nothing
    hook.finish("afm-pretrain-2026-01-05-t1", "Complete")
    assert op.poke(ctx) is True
    op.poke(_context(try_number=2))  # a retry is a new TrainJob (it resumes from the checkpoint)
    assert "afm-pretrain-2026-01-05-t2" in hook.objects


def test_a_failed_trainjob_fails_the_task_or_skips_it_when_its_input_is_missing() -> None:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    for skip, codes, expected in ((False, [1], AirflowFailException), (True, [kp.EXIT_NOTHING_TO_DO], AirflowSkipException),
                                  (True, [1], AirflowFailException)):  # fmt: skip
        op, hook = _operator(skip_when_missing=skip), FakeHook()
        op.hook = lambda hook=hook: hook
        op.poke(_context())
        hook.finish("afm-pretrain-2026-01-05-t1", "Failed")
        hook.exit_codes = codes
        with pytest.raises(expected):
            op.poke(_context())
