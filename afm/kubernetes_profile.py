"""The DAGs' kubernetes profile (``AFM_EXECUTION=kubernetes``): each task runs its ``afm`` command on the cluster.

* Feature steps (Spark): a Spark Operator ``SparkApplication`` (:class:`SparkStepOperator`).
* Training steps: a Kubeflow Trainer ``TrainJob``, created and then watched until its
  ``Complete`` or ``Failed`` condition (:class:`TrainJobOperator`; the provider has no
  TrainJob operator, so this one polls ``status.conditions`` through ``KubernetesHook``).
* Light steps: a pod of the CPU image (:class:`AfmPodOperator`).

The resources are the kustomize templates of ``infra/k8s`` (rendered with
:mod:`afm.kustomize` for the overlay ``AFM_K8S_OVERLAY``, default ``prod``), filled per run:
the task's ``afm`` arguments for the run's day, a name with the task and the day, and the
image tag ``AFM_IMAGE_TAG`` when set (else the overlay's). ``kubectl`` users apply the same
templates (``afm k8s render``). The templates are found under ``AFM_K8S_DIR`` (the image sets
it), else in this checkout's ``infra/k8s``.

A command that finds its input missing exits with :data:`EXIT_NOTHING_TO_DO` (see
``afm.cli.main``); a step with ``skip_when_missing`` is then skipped, as in the local profile.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from afm.kustomize import find, render

EXECUTIONS = ("local", "kubernetes")
#: the Spark template every feature step fills
SPARK_TEMPLATE = "afm-features"
#: the labels kubernetes gives a TrainJob's pods (JobSet names its jobs after the TrainJob)
TRAINJOB_POD_LABEL = "jobset.sigs.k8s.io/jobset-name"
DS_PLACEHOLDER = "DS"
#: ``afm`` exits with this status when its input is missing (sysexits' EX_NOINPUT): nothing to do yet
EXIT_NOTHING_TO_DO = 66


def execution() -> str:
    """``AFM_EXECUTION``: ``local`` (default, tasks run in-process) or ``kubernetes``."""
    value = os.environ.get("AFM_EXECUTION", "local").strip().lower() or "local"
    if value not in EXECUTIONS:
        raise ValueError(f"AFM_EXECUTION must be one of {EXECUTIONS}, got {value!r}")
    return value


def k8s_dir() -> Path:
    """The kustomize tree: ``AFM_K8S_DIR``, else ``infra/k8s`` of this checkout."""
    return Path(os.environ.get("AFM_K8S_DIR") or Path(__file__).resolve().parents[1] / "infra" / "k8s")


def overlay_dir(overlay: str | None = None) -> Path:
    """The folder of ``overlay`` (``AFM_K8S_OVERLAY``, default ``prod``); ``base`` is the base."""
    name = overlay or os.environ.get("AFM_K8S_OVERLAY") or "prod"
    folder = k8s_dir() / "base" if name == "base" else k8s_dir() / "overlays" / name
    if not (folder / "kustomization.yaml").exists():
        raise FileNotFoundError(
            f"no kustomization for overlay {name!r} at {folder} (set AFM_K8S_DIR / AFM_K8S_OVERLAY)"
        )
    return folder


@cache
def _rendered(folder: Path) -> tuple[dict[str, Any], ...]:
    return tuple(render(folder))


def template(kind: str, name: str, overlay: str | None = None) -> dict[str, Any]:
    """A copy of the rendered resource ``kind``/``name`` of the overlay, free to fill."""
    return find(list(_rendered(overlay_dir(overlay))), kind, name)


def resource_name(task_id: str, ds: str | None, suffix: str = "") -> str:
    """``afm-<task>[-<day>][-suffix]``: an RFC 1035 label (lower case, digits, dashes; ≤ 63 characters)."""
    raw = "-".join(p for p in ("afm", task_id, ds, suffix) if p)
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    return name[:63].rstrip("-")


def with_tag(image: str, tag: str | None) -> str:
    """``image`` with its tag replaced by ``tag`` (unchanged when ``tag`` is empty)."""
    if not tag:
        return image
    name = image.split("@")[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    return f"{name[:colon] if colon > slash else name}:{tag}"


def with_template_options(argv: Sequence[str], template_args: Sequence[Any]) -> list[str]:
    """The task's ``afm`` arguments, then the template's options that the task does not set.

    The DAG gives the command and the day; the template gives what depends on the cluster
    (``--device cuda``, ``--size base``). An option is ``--name`` with the next word as its value
    unless that word is another option.
    """
    given = {a for a in argv if a.startswith("--")}
    words = [str(a) for a in template_args]
    extra: list[str] = []
    for i, word in enumerate(words):
        if word.startswith("--") and word not in given:
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            extra += [word, words[i + 1]] if has_value else [word]
    return [*argv, *extra]


def spark_application(task_id: str, argv: Sequence[str], ds: str | None, overlay: str | None = None) -> dict[str, Any]:
    """The ``SparkApplication`` that runs ``afm ARGV`` for day ``ds``, from the ``afm-features`` template."""
    doc = template("SparkApplication", SPARK_TEMPLATE, overlay)
    doc["metadata"]["name"] = resource_name(task_id, ds)
    doc["spec"]["arguments"] = with_template_options(argv, doc["spec"].get("arguments", []))
    doc["spec"]["image"] = with_tag(doc["spec"]["image"], os.environ.get("AFM_IMAGE_TAG"))
    return doc


def train_job(
    template_name: str, task_id: str, argv: Sequence[str], ds: str | None, try_number: int = 1,
    overlay: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The ``TrainJob`` that runs ``afm ARGV`` for day ``ds``, from the TrainJob template ``template_name``.

    The try number is part of the name: a retried task makes a new TrainJob, which resumes from
    the checkpoint the failed one left on the data volume.
    """
    doc = template("TrainJob", template_name, overlay)
    trainer = doc["spec"]["trainer"]
    doc["metadata"]["name"] = resource_name(task_id, ds, f"t{try_number}")
    trainer["args"] = with_template_options(argv, trainer.get("args", []))
    trainer["image"] = with_tag(trainer["image"], os.environ.get("AFM_IMAGE_TAG"))
    return doc


def cpu_image(overlay: str | None = None) -> str:
    """The CPU image of the overlay (the Spark template's), with ``AFM_IMAGE_TAG`` applied."""
    return with_tag(
        template("SparkApplication", SPARK_TEMPLATE, overlay)["spec"]["image"], os.environ.get("AFM_IMAGE_TAG")
    )


def namespace(overlay: str | None = None) -> str:
    """The overlay's namespace (``default`` for the base)."""
    return template("SparkApplication", SPARK_TEMPLATE, overlay)["metadata"].get("namespace", "default")


def conditions(obj: dict[str, Any]) -> dict[str, str]:
    """``status.conditions`` of a resource as {type: status}."""
    return {c["type"]: c.get("status", "") for c in (obj.get("status") or {}).get("conditions", [])}


def trainjob_state(obj: dict[str, Any]) -> str:
    """``complete``, ``failed``, ``suspended`` or ``running``, from the TrainJob's conditions."""
    conds = conditions(obj)
    for state in ("Failed", "Complete", "Suspended"):
        if conds.get(state) == "True":
            return state.lower()
    return "running"


def _operators() -> dict[str, type]:
    """The operator classes (imported here: the provider is needed only in this profile)."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.operators.spark_kubernetes import SparkKubernetesOperator
    from airflow.sdk.bases.sensor import BaseSensorOperator
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
    from kubernetes.client import models as k8s

    from afm.alerts import run_day
    from afm.orchestration import fill_days

    def _set_outlets(context: Any, outlets: Sequence[Any], ds: str | None) -> None:
        for asset in outlets:
            context["outlet_events"][asset].extra = {"ds": ds}

    class AfmPodOperator(KubernetesPodOperator):
        """``afm ARGS`` for the run's day in a pod of the CPU image, with the data volume and ``afm-config``."""

        def __init__(self, *, afm_args: Sequence[str], needs_env: str | None = None, skip_when_missing: bool = False,
                     **kwargs: Any) -> None:  # fmt: skip
            self.afm_args = list(afm_args)
            self.needs_env = needs_env
            kwargs.setdefault("skip_on_exit_code", EXIT_NOTHING_TO_DO if skip_when_missing else None)
            super().__init__(
                name=resource_name(kwargs["task_id"], None), namespace=namespace(), image=cpu_image(),
                cmds=["afm"], arguments=fill_days(self.afm_args, None) if not _needs_day(self.afm_args) else [],
                env_from=[k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name="afm-config"))],
                env_vars=feast_env(k8s),
                volumes=[k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name="afm-data"))],
                volume_mounts=[k8s.V1VolumeMount(name="data", mount_path="/data")],
                container_resources=k8s.V1ResourceRequirements(
                    requests={"cpu": "1", "memory": "2Gi"}, limits={"memory": "4Gi"}),
                labels={"app.kubernetes.io/part-of": "activityfm"}, on_finish_action="delete_succeeded_pod",
                **kwargs,
            )  # fmt: skip

        def execute(self, context: Any) -> Any:
            if self.needs_env and not os.environ.get(self.needs_env):
                raise AirflowSkipException(
                    f"{self.needs_env} is not set: nothing to do for afm {' '.join(self.afm_args)}"
                )
            ds = run_day(context)
            self.arguments = fill_days(self.afm_args, ds)
            out = super().execute(context)
            _set_outlets(context, self.outlets, ds)
            return out

    class SparkStepOperator(SparkKubernetesOperator):
        """``afm ARGS`` for the run's day as the driver of a ``SparkApplication`` from the template."""

        def __init__(self, *, afm_args: Sequence[str], **kwargs: Any) -> None:
            self.afm_args = list(afm_args)
            template = spark_application(kwargs["task_id"], self.afm_args, None)
            super().__init__(namespace=namespace(), template_spec=template, **kwargs)

        def resource(self, ds: str | None) -> dict[str, Any]:
            return spark_application(self.task_id, fill_days(self.afm_args, ds) if ds else self.afm_args, ds)

        def execute(self, context: Any) -> Any:
            ds = run_day(context)
            self.template_spec = self.resource(ds)
            self.application_file = None
            out = super().execute(context)
            _set_outlets(context, self.outlets, ds)
            return out

    class TrainJobOperator(BaseSensorOperator):
        """Create the day's ``TrainJob`` (once per try) and wait for its ``Complete`` or ``Failed`` condition.

        Reschedule mode: no worker slot is held while training runs; every poke first makes sure
        the TrainJob of this try exists, so a rescheduled poke never creates a second one.
        """

        def __init__(self, *, afm_args: Sequence[str], template_name: str, skip_when_missing: bool = False,
                     kubernetes_conn_id: str = "kubernetes_default", **kwargs: Any) -> None:  # fmt: skip
            kwargs.setdefault("mode", "reschedule")
            kwargs.setdefault("poke_interval", 60)
            kwargs.setdefault("timeout", 24 * 3600)
            super().__init__(**kwargs)
            self.afm_args = list(afm_args)
            self.template_name = template_name
            self.skip_when_missing = skip_when_missing
            self.kubernetes_conn_id = kubernetes_conn_id

        def resource(self, ds: str | None, try_number: int = 1) -> dict[str, Any]:
            argv = fill_days(self.afm_args, ds) if ds else self.afm_args
            return train_job(self.template_name, self.task_id, argv, ds, try_number)

        def hook(self) -> Any:
            return KubernetesHook(conn_id=self.kubernetes_conn_id)

        def poke(self, context: Any) -> bool:
            ds = run_day(context)
            body = self.resource(ds, int(getattr(context["ti"], "try_number", 1) or 1))
            hook = self.hook()
            group, version = body["apiVersion"].split("/")
            ns, name = body["metadata"].get("namespace", "default"), body["metadata"]["name"]
            try:
                obj = hook.get_custom_object(group, version, "trainjobs", name, ns)
            except Exception as exc:  # 404: not created yet in this try
                if getattr(exc, "status", None) != 404:
                    raise
                self.log.info("creating TrainJob %s/%s: afm %s", ns, name, " ".join(body["spec"]["trainer"]["args"]))
                hook.create_custom_object(group, version, "trainjobs", body, ns)
                return False
            state = trainjob_state(obj)
            if state == "complete":
                _set_outlets(context, self.outlets, ds)
                return True
            if state == "failed":
                codes = _pod_exit_codes(hook, ns, name)
                if self.skip_when_missing and EXIT_NOTHING_TO_DO in codes:
                    raise AirflowSkipException(f"nothing to do yet: TrainJob {name} found its input missing")
                raise AirflowFailException(f"TrainJob {ns}/{name} failed (pod exit codes {sorted(codes)}): "
                                           f"kubectl -n {ns} describe trainjob {name}")  # fmt: skip
            if state == "suspended":
                self.log.info("TrainJob %s is suspended (a queue holds it); waiting", name)
            return False

    return {"pod": AfmPodOperator, "spark": SparkStepOperator, "train": TrainJobOperator}


def feast_env(k8s: Any) -> list[Any]:
    """What a pod needs to reach Feast on the cluster: the shared registry and Redis, secrets by reference."""

    def secret(name: str, key: str) -> Any:
        ref = k8s.V1SecretKeySelector(name="afm-secrets", key=key)
        return k8s.V1EnvVar(name=name, value_from=k8s.V1EnvVarSource(secret_key_ref=ref))

    return [
        secret("AFM_FEAST_REGISTRY", "feast-registry-url"),
        secret("REDIS_PASSWORD", "redis-password"),
        k8s.V1EnvVar(name="AFM_REDIS_URL", value="afm-redis:6379,password=$(REDIS_PASSWORD)"),
    ]


def _needs_day(args: Sequence[str]) -> bool:
    return any("{ds}" in a or "{prev_ds}" in a for a in args)


def _pod_exit_codes(hook: Any, ns: str, name: str) -> set[int]:
    """Exit codes of the terminated containers of a TrainJob's pods."""
    pods = hook.core_v1_client.list_namespaced_pod(ns, label_selector=f"{TRAINJOB_POD_LABEL}={name}").items
    return {
        s.state.terminated.exit_code
        for p in pods for s in (p.status.container_statuses or []) if s.state and s.state.terminated
    }  # fmt: skip


@cache
def operators() -> dict[str, type]:
    """{"pod", "spark", "train"}: the operator class of each kind of step (built once)."""
    return _operators()
