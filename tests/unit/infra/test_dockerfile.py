"""The images are checked statically (no Docker engine runs here): pinned bases, the lock, the entrypoints.

One Dockerfile builds the ``afm`` image (the default target: the last stage) and, with
``--target airflow``, the image the official Airflow Helm chart runs. Stages inherit from the
stage they start ``FROM``, so the checks below resolve ENTRYPOINT, CMD, USER and ENV along that chain.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from click.testing import CliRunner

from afm.cli import cli

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "infra" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, dict]:
    """Each stage by name (in file order): its base and the instructions written in it."""
    stages: dict[str, dict] = {}
    current: dict | None = None
    for kind, args in _instructions():
        if kind == "FROM":
            words = args.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = {"base": words[0], "instructions": []}
        elif current is not None:
            current["instructions"].append((kind, args))
    return stages


def _chain(stage: str) -> list[list[tuple[str, str]]]:
    """The instruction lists from the first stage of ``stage``'s FROM chain to ``stage`` itself."""
    stages = _stages()
    out = []
    while stage in stages:
        out.insert(0, stages[stage]["instructions"])
        stage = stages[stage]["base"]
    return out


def _effective(stage: str, instruction: str) -> str | None:
    """The last ``instruction`` (ENTRYPOINT, CMD, USER, WORKDIR) in force in ``stage``.

    Docker drops an inherited CMD when a stage sets its own ENTRYPOINT (a CMD of that stage stays): so does this.
    """
    value = None
    for instructions in _chain(stage):
        cmd_here = False
        for kind, args in instructions:
            if kind == instruction:
                value, cmd_here = args, kind == "CMD"
            elif kind == "ENTRYPOINT" and instruction == "CMD" and not cmd_here:
                value = None
    return value


def _env(stage: str) -> dict[str, str]:
    """The ENV of ``stage`` (``KEY=VALUE`` pairs; values without spaces or quotes here)."""
    env: dict[str, str] = {}
    for instructions in _chain(stage):
        for kind, args in instructions:
            if kind == "ENV":
                env.update(pair.split("=", 1) for pair in shlex.split(args) if "=" in pair)
    return env


def _exec_form(args: str | None) -> list[str]:
    assert args and args.startswith("["), f"exec form expected, got {args!r}"
    return json.loads(args)


def _arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in _instructions() if kind == "ARG" and "=" in a)


def test_base_images_are_pinned_by_version() -> None:
    defaults = _arg_defaults()
    froms = [a for kind, a in _instructions() if kind == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    for spec in froms:
        image = spec.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        if image in {s.split()[-1] for s in froms}:  # FROM an earlier stage
            continue
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{image} is not pinned to a version"


def test_dependencies_come_from_the_lock_file() -> None:
    copied = " ".join(a for kind, a in _instructions() if kind == "COPY")
    assert "constraints.txt" in copied
    installs = [a for kind, a in _instructions() if kind == "RUN" and "pip install" in a]
    project_installs = [
        cmd for a in installs for cmd in a.split("&&") if "pip install" in cmd and "--upgrade pip" not in cmd
    ]
    assert project_installs and all("-c constraints.txt" in cmd for cmd in project_installs), project_installs
    torch_pin = re.search(r"torch==([\d.]+)", (ROOT / "constraints.txt").read_text())
    assert torch_pin and f"torch=={torch_pin.group(1)}" in DOCKERFILE.read_text()


def test_a_cpu_and_a_cuda_variant_through_one_build_argument() -> None:
    text = DOCKERFILE.read_text()
    assert _arg_defaults()["TORCH_VARIANT"] == "cpu"
    assert re.search(r"\bcpu\)", text) and re.search(r"\bcuda\)", text) and "download.pytorch.org/whl/cpu" in text


def test_the_runtime_has_java_for_spark_and_runs_afm_as_a_user() -> None:
    runs = " ".join(a for kind, a in _instructions() if kind == "RUN")
    assert "openjdk-17-jre-headless" in runs
    assert _exec_form(_effective("afm", "ENTRYPOINT"))[-1] == "afm"
    for stage in ("afm", "airflow"):
        user = _effective(stage, "USER")
        assert user and user not in ("root", "0"), f"{stage} runs as {user}"
    assert CliRunner().invoke(cli, ["--help"]).exit_code == 0


def test_the_default_target_is_the_afm_image() -> None:
    """``docker build`` without --target builds the last stage: it must be the afm one."""
    stages = list(_stages())
    assert stages[-1] == "afm", f"the last stage is {stages[-1]}, so a plain build is not the afm image"
    assert _exec_form(_effective("afm", "ENTRYPOINT")) == ["tini", "--", "afm"]
    assert _exec_form(_effective("afm", "CMD")) == ["--help"]
    assert _stages()["afm"]["base"] == "runtime"


def test_the_airflow_image_runs_its_arguments_as_a_command() -> None:
    """The official chart passes `bash -c "exec airflow scheduler"` etc. as args: no afm in front."""
    stages = _stages()
    assert "airflow" in stages and stages["airflow"]["base"] == "runtime"
    assert _exec_form(_effective("airflow", "ENTRYPOINT")) == ["tini", "--"]
    cmd = _exec_form(_effective("airflow", "CMD"))
    assert cmd and cmd[0] == "airflow", cmd
    env = _env("airflow")
    assert env["AIRFLOW_HOME"] == "/opt/airflow"  # where the chart mounts airflow.cfg (its airflowHome)
    runs = " ".join(a for kind, a in stages["airflow"]["instructions"] if kind == "RUN")
    # the chart's liveness probes call `/entrypoint airflow jobs check ...`; AIRFLOW_HOME is writable
    assert "/entrypoint" in runs and 'exec "$@"' in runs and "mkdir -p /opt/airflow" in runs
    assert "afm" not in _exec_form(_effective("airflow", "ENTRYPOINT"))


def test_both_images_carry_the_dags_and_the_kubernetes_manifests() -> None:
    copies = [a.split() for kind, a in _stages()["runtime"]["instructions"] if kind == "COPY"]
    assert ["dags", "/opt/activityfm/dags"] in copies
    assert ["infra/k8s", "/opt/activityfm/k8s"] in copies
    for stage in ("afm", "airflow"):
        env = _env(stage)
        assert env["AFM_K8S_DIR"] == "/opt/activityfm/k8s"
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/activityfm/dags"
        assert env["AFM_HOME"] == "/data"
    assert (ROOT / "infra" / "k8s" / "base" / "kustomization.yaml").is_file()
    ignored = {line.strip("/").split("/")[0] for line in (ROOT / ".dockerignore").read_text().split()}
    assert not {"dags", "infra"} & ignored, "the build context must keep dags/ and infra/k8s/"


def test_the_header_documents_the_three_images() -> None:
    header = DOCKERFILE.read_text().split("ARG ", 1)[0]
    builds = [line for line in header.splitlines() if "docker build" in line]
    assert any("REGISTRY/activityfm:" in b and "--target" not in b and "TORCH_VARIANT" not in b for b in builds)
    assert any("REGISTRY/activityfm-cuda:" in b and "TORCH_VARIANT=cuda" in b for b in builds)
    assert any("REGISTRY/activityfm-airflow:" in b and "--target airflow" in b for b in builds)


def test_every_copied_path_exists_and_local_state_stays_out() -> None:
    for kind, args in _instructions():
        if kind == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"var", ".venv", ".git"} <= set(ignored)
