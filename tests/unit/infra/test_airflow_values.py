"""The values for the official Airflow Helm chart and the worker RBAC, checked statically (no cluster, no helm).

``infra/k8s/airflow/values.yaml`` is installed with the chart ``apache-airflow/airflow`` 1.22.0.
The key names below were read from the chart's ``chart/values.yaml`` in apache/airflow (commit
d6ba4817823e8ffd2d3f676fc92aa7381e7d30f0, the 1.19 development line, Airflow 3.1.3 default): later
1.x charts keep these keys (they add keys; removals wait for 2.0), and the chart's
values.schema.json refuses unknown top-level keys at install, so a key missing here would fail
there too. Nothing of the chart is copied into the repository; these sets are test data.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
AIRFLOW_DIR = ROOT / "infra" / "k8s" / "airflow"
VALUES = AIRFLOW_DIR / "values.yaml"
RBAC = AIRFLOW_DIR / "rbac.yaml"
BASE = ROOT / "infra" / "k8s" / "base"
DOCKERFILE = ROOT / "infra" / "Dockerfile"

CHART_VERSION = "1.22.0"

# Top-level keys of the chart's values.yaml (see the module docstring for the version).
CHART_TOP_LEVEL_KEYS = frozenset(
    """
    fullnameOverride nameOverride useStandardNaming revisionHistoryLimit uid gid securityContext
    securityContexts containerLifecycleHooks airflowHome defaultAirflowRepository defaultAirflowTag
    defaultAirflowDigest airflowVersion images nodeSelector affinity tolerations topologySpreadConstraints
    schedulerName labels imagePullSecrets ingress networkPolicies airflowPodAnnotations
    airflowConfigAnnotations airflowLocalSettings rbac executor allowPodLaunching allowJobLaunching env
    volumes volumeMounts secret enableBuiltInSecretEnvVars priorityClasses extraSecrets extraConfigMaps
    extraEnv extraEnvFrom data fernetKey fernetKeySecretName fernetKeySecretAnnotations apiSecretKey
    apiSecretAnnotations apiSecretKeySecretName jwtSecret jwtSecretAnnotations jwtSecretName
    webserverSecretKey webserverSecretAnnotations webserverSecretKeySecretName kerberos workers scheduler
    createUserJob migrateDatabaseJob apiServer webserver triggerer dagProcessor flower statsd pgbouncer
    redis registry elasticsearch opensearch ports quotas limits cleanup databaseCleanup postgresql config
    multiNamespaceMode podTemplate dags logs
    """.split()
)

_POD_COMMON = """
    command args env resources securityContext securityContexts containerLifecycleHooks serviceAccount
    extraContainers extraInitContainers extraVolumes extraVolumeMounts nodeSelector affinity tolerations
    topologySpreadConstraints priorityClassName annotations podAnnotations labels
"""
_JOB = _POD_COMMON + " enabled ttlSecondsAfterFinished jobAnnotations restartPolicy useHelmHooks applyCustomEnv"

# Second-level keys of the sections the values set (same chart values.yaml).
CHART_SECTION_KEYS: dict[str, frozenset[str]] = {
    "images": frozenset(
        "airflow useDefaultImageForMigration migrationsWaitTimeout pod_template flower statsd redis pgbouncer "
        "pgbouncerExporter gitSync".split()
    ),
    "dags": frozenset("mountPath persistence gitSync".split()),
    "data": frozenset(
        "metadataSecretName resultBackendSecretName brokerUrlSecretName metadataConnection resultBackendConnection "
        "resultBackendConnectionSecretAnnotations brokerUrl brokerUrlSecretAnnotations".split()
    ),
    "workers": frozenset(
        (
            _POD_COMMON
            + """ replicas revisionHistoryLimit livenessProbe updateStrategy strategy keda hpa persistence
            kerberosSidecar kerberosInitContainer terminationGracePeriodSeconds safeToEvict extraPorts
            runtimeClassName hostAliases logGroomerSidecar waitForMigrations volumeClaimTemplates
            useWorkerDedicatedServiceAccounts celery kubernetes"""
        ).split()
    ),
    "scheduler": frozenset(
        (
            _POD_COMMON
            + """ enabled hostAliases livenessProbe startupProbe replicas revisionHistoryLimit updateStrategy
            strategy terminationGracePeriodSeconds podDisruptionBudget safeToEvict logGroomerSidecar
            waitForMigrations"""
        ).split()
    ),
    "dagProcessor": frozenset(
        (
            _POD_COMMON
            + """ enabled replicas revisionHistoryLimit strategy livenessProbe terminationGracePeriodSeconds
            safeToEvict logGroomerSidecar waitForMigrations"""
        ).split()
    ),
    "triggerer": frozenset(
        (
            _POD_COMMON
            + """ enabled replicas revisionHistoryLimit updateStrategy strategy livenessProbe persistence
            terminationGracePeriodSeconds safeToEvict hostAliases logGroomerSidecar waitForMigrations keda"""
        ).split()
    ),
    "apiServer": frozenset(
        (
            _POD_COMMON
            + """ enabled replicas revisionHistoryLimit allowPodLogReading hpa service podDisruptionBudget
            strategy waitForMigrations hostAliases networkPolicy configMapAnnotations apiServerConfig
            apiServerConfigConfigMapName livenessProbe readinessProbe startupProbe"""
        ).split()
    ),
    "redis": frozenset(
        """enabled terminationGracePeriodSeconds annotations serviceAccount service persistence resources
        passwordSecretName password passwordSecretAnnotations safeToEvict nodeSelector affinity tolerations
        topologySpreadConstraints priorityClassName uid securityContext securityContexts containerLifecycleHooks
        labels podAnnotations""".split()
    ),
    "postgresql": frozenset("enabled image auth".split()),
    "createUserJob": frozenset(_JOB.split()),
    "migrateDatabaseJob": frozenset(_JOB.split()),
}
SERVICE_ACCOUNT_KEYS = frozenset("automountServiceAccountToken create name annotations".split())

# Keys whose name says they hold a secret (password, pass, secret, token, key) ...
SECRETISH = re.compile(r"pass|secret|token|key", re.IGNORECASE)
# ... may hold only a Kubernetes object name (a Secret's name, or the key inside a named Secret).
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# Values that are YAML in a string (the chart templates them): checked as YAML too.
TEMPLATED_YAML_KEYS = {"extraEnv", "extraEnvFrom"}


def _values() -> dict[str, Any]:
    values = yaml.safe_load(VALUES.read_text())
    assert isinstance(values, dict)
    return values


def _rbac() -> list[dict]:
    return [d for d in yaml.safe_load_all(RBAC.read_text()) if d]


def _env_list(values: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in values["env"]}


def _config_map() -> dict[str, str]:
    (cm,) = [d for d in yaml.safe_load_all((BASE / "config.yaml").read_text()) if d and d["kind"] == "ConfigMap"]
    return cm


def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions of each named stage (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            words = rest.split()
            current = stages.setdefault(words[-1] if len(words) >= 3 else rest, [("FROM", rest)])
        else:
            current.append((word.upper(), rest.strip()))
    return stages


def _dockerfile_env(*stages: str) -> dict[str, str]:
    env: dict[str, str] = {}
    all_stages = _dockerfile_stages()
    for stage in stages:
        for kind, args in all_stages[stage]:
            if kind == "ENV":
                env.update(pair.split("=", 1) for pair in shlex.split(args) if "=" in pair)
    return env


def literal_secrets(node: Any, path: tuple[str, ...] = ()) -> list[str]:
    """The paths under ``node`` where a secret value is written instead of a reference by name.

    A key named like a secret (password/pass/secret/token/key) may hold nothing, a boolean, or
    a Kubernetes name in a slot that names a Secret (``...Name``) or a key of a named Secret
    (``secretKey``/``key`` beside ``secretName``/``name``). An environment entry named like a
    secret (``{name: ..._TOKEN, value: ...}``) may not carry a value. Templated YAML strings
    (extraEnv, extraEnvFrom) are parsed and checked the same way.
    """
    found: list[str] = []
    if isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_secrets(item, (*path, str(i)))
        return found
    if not isinstance(node, dict):
        return found
    if SECRETISH.search(str(node.get("name", ""))) and node.get("value") not in (None, ""):
        found.append(".".join((*path, str(node["name"]))))
    for key, value in node.items():
        here = (*path, str(key))
        if key in TEMPLATED_YAML_KEYS and isinstance(value, str):
            found += literal_secrets(yaml.safe_load(value), here)
        elif isinstance(value, (dict, list)):
            found += literal_secrets(value, here)
        elif SECRETISH.search(str(key)) and value not in (None, "") and not isinstance(value, bool):
            names_a_secret = str(key).endswith("Name")
            key_of_named_secret = key in ("secretKey", "key") and bool({"secretName", "name"} & node.keys())
            if not (isinstance(value, str) and K8S_NAME.match(value) and (names_a_secret or key_of_named_secret)):
                found.append(".".join(here))
    return found


def test_the_values_parse_and_use_only_keys_the_chart_knows() -> None:
    values = _values()
    unknown = set(values) - CHART_TOP_LEVEL_KEYS
    assert not unknown, f"not keys of the airflow chart: {sorted(unknown)}"
    for section, known in CHART_SECTION_KEYS.items():
        if isinstance(values.get(section), dict):
            assert not set(values[section]) - known, f"{section}: unknown {sorted(set(values[section]) - known)}"
    workers = values["workers"]
    for account in (workers["serviceAccount"], workers["kubernetes"]["serviceAccount"]):
        assert set(account) <= SERVICE_ACCOUNT_KEYS
    assert set(workers["kubernetes"]) <= {"serviceAccount"}
    assert f"--version {CHART_VERSION}" in VALUES.read_text()  # the install command pins the chart checked here


def test_the_kubernetes_executor_runs_our_airflow_image() -> None:
    values = _values()
    assert values["executor"] == "KubernetesExecutor"
    images = values["images"]
    refs = [
        (values["defaultAirflowRepository"], values["defaultAirflowTag"]),
        (images["airflow"]["repository"], images["airflow"]["tag"]),
        (images["pod_template"]["repository"], images["pod_template"]["tag"]),  # the worker pods
    ]
    assert all(repo.endswith("/activityfm-airflow") for repo, _ in refs), refs
    assert len(set(refs)) == 1, f"the components and the worker pods run different images: {refs}"
    stages = _dockerfile_stages()
    assert "airflow" in stages, "infra/Dockerfile has no `airflow` stage for --target airflow"
    (entrypoint,) = [a for k, a in stages["airflow"] if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["tini", "--"]
    # the image's Airflow is the version the chart renders for
    lock = (ROOT / "constraints.txt").read_text()
    assert re.search(rf"^apache-airflow=={re.escape(values['airflowVersion'])}$", lock, re.M)
    # the chart mounts airflow.cfg under airflowHome, the image's AIRFLOW_HOME; pods run as the image's user
    assert values["airflowHome"] == _dockerfile_env("runtime", "airflow")["AIRFLOW_HOME"]
    useradd = next(a for k, a in stages["runtime"] if k == "RUN" and "useradd" in a)
    assert f"--uid {values['uid']} " in useradd


def test_the_dags_come_from_the_image() -> None:
    values = _values()
    dags = values["dags"]
    assert dags["persistence"]["enabled"] is False and dags["gitSync"]["enabled"] is False
    image_folder = _dockerfile_env("runtime")["AIRFLOW__CORE__DAGS_FOLDER"]
    assert values["config"]["core"]["dags_folder"] == dags["mountPath"] == image_folder
    assert _config_map()["data"]["AIRFLOW__CORE__DAGS_FOLDER"] == image_folder
    copies = [a.split() for k, a in _dockerfile_stages()["runtime"] if k == "COPY"]
    assert ["dags", image_folder] in copies and list((ROOT / "dags").glob("*.py"))


def test_the_dags_run_their_kubernetes_profile_with_release_images() -> None:
    values = _values()
    env = _env_list(values)
    assert env["AFM_EXECUTION"] == "kubernetes"
    assert env["AFM_K8S_OVERLAY"] == "prod"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert env["AFM_IMAGE_TAG"] == version
    assert values["images"]["airflow"]["tag"] == version
    # every Airflow container reads the shared ConfigMap, which the base defines
    env_from = yaml.safe_load(values["extraEnvFrom"])
    assert {"configMapRef": {"name": "afm-config"}} in env_from
    assert _config_map()["metadata"]["name"] == "afm-config"


@pytest.mark.parametrize("component", ["workers", "dagProcessor"])
def test_the_data_volume_is_mounted_at_afm_home(component: str) -> None:
    """Worker pods run the raw-events sensor and in-process steps; the dag-processor runs DAG callbacks."""
    section = _values()[component]
    afm_home = _config_map()["data"]["AFM_HOME"]
    assert afm_home == _dockerfile_env("runtime")["AFM_HOME"]
    (claim,) = [
        d for d in yaml.safe_load_all((BASE / "config.yaml").read_text()) if d["kind"] == "PersistentVolumeClaim"
    ]
    volumes = {v["name"]: v for v in section["extraVolumes"]}
    mounts = {m["mountPath"]: m["name"] for m in section["extraVolumeMounts"]}
    assert afm_home in mounts, f"{component} does not mount {afm_home}"
    assert volumes[mounts[afm_home]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_the_image_is_not_the_apache_airflow_image() -> None:
    """What the chart takes from apache/airflow by default, and our image does not have, is switched off."""
    values = _values()
    for component in ("scheduler", "dagProcessor", "triggerer"):
        assert values[component]["logGroomerSidecar"]["enabled"] is False, f"{component}: /clean-logs is not there"
    if not re.search(r"^apache-airflow-providers-fab==", (ROOT / "constraints.txt").read_text(), re.M):
        assert values["createUserJob"]["enabled"] is False  # `airflow users create` is FAB's
        assert values["config"]["core"]["auth_manager"].endswith(".SimpleAuthManager")
    assert values["redis"]["enabled"] is False  # no Celery


def test_no_secret_values_only_references_by_name() -> None:
    values = _values()
    assert literal_secrets(values) == []
    assert values["fernetKeySecretName"].startswith("afm-airflow-")
    assert values["apiSecretKeySecretName"].startswith("afm-airflow-")
    assert values["jwtSecretName"].startswith("afm-airflow-")
    for path in AIRFLOW_DIR.glob("*.yaml"):
        assert all(d.get("kind") != "Secret" for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict))


@pytest.mark.parametrize(
    ("doc", "flagged"),
    [
        ({"fernetKey": "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmE="}, ["fernetKey"]),
        ({"apiSecretKey": "s3cret"}, ["apiSecretKey"]),
        ({"jwtSecret": "abc"}, ["jwtSecret"]),
        ({"data": {"metadataConnection": {"user": "airflow", "pass": "hunter2"}}}, ["data.metadataConnection.pass"]),
        ({"webserverSecretKeySecretName": "Not A Name!"}, ["webserverSecretKeySecretName"]),
        ({"env": [{"name": "AFM_ADMIN_TOKEN", "value": "t0ken"}]}, ["env.0.AFM_ADMIN_TOKEN"]),
        ({"extraEnv": "- name: REDIS_PASSWORD\n  value: s3cret\n"}, ["extraEnv.0.REDIS_PASSWORD"]),
        ({"config": {"api": {"secret_key": "abc"}}}, ["config.api.secret_key"]),
        ({"redis": {"password": 1234}}, ["redis.password"]),
        ({"fernetKeySecretName": "afm-airflow-fernet-key", "fernetKey": None}, []),
        ({"secret": [{"envName": "AFM_ADMIN_TOKEN", "secretName": "afm-secrets", "secretKey": "admin-token"}]}, []),
        ({"enableBuiltInSecretEnvVars": {"AIRFLOW__CORE__FERNET_KEY": True}}, []),
        ({"env": [{"name": "AFM_EXECUTION", "value": "kubernetes"}]}, []),
    ],
)
def test_a_literal_secret_would_fail(doc: dict, flagged: list[str]) -> None:
    assert literal_secrets(doc) == flagged


def test_the_worker_service_account_may_create_what_the_dags_submit() -> None:
    values = _values()
    docs = {d["kind"]: d for d in _rbac()}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding"}
    account = docs["ServiceAccount"]["metadata"]["name"]
    for sa in (values["workers"]["kubernetes"]["serviceAccount"], values["workers"]["serviceAccount"]):
        assert sa == {"create": False, "name": account}
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": docs["Role"]["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    granted = {
        (group, resource, verb)
        for rule in docs["Role"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    submit = {"create", "get", "list", "watch", "delete"}
    needed = {("sparkoperator.k8s.io", "sparkapplications", v) for v in submit}
    needed |= {("trainer.kubeflow.org", "trainjobs", v) for v in submit}
    needed |= {("", "pods", v) for v in submit} | {("", "pods/log", "get"), ("", "events", "list")}
    assert needed <= granted, sorted(needed - granted)
    assert not any(v == "*" or r == "*" or g == "*" for g, r, v in granted)  # nothing wider than that
    # the API groups are those of the custom resources in the base
    resources = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    base_groups = {
        d["apiVersion"].split("/")[0] for f in resources for d in yaml.safe_load_all((BASE / f).read_text()) if d
    }
    assert {"sparkoperator.k8s.io", "trainer.kubeflow.org"} <= base_groups


@pytest.mark.parametrize("doc", _rbac(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_the_rbac_manifest_matches_the_kubernetes_schema(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_airflow_kustomization_lists_the_rbac() -> None:
    kustomization = yaml.safe_load((AIRFLOW_DIR / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["rbac.yaml"]
    assert all((AIRFLOW_DIR / r).is_file() for r in kustomization["resources"])
