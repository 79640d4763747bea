"""The image is checked statically (no Docker engine runs here): pinned bases, the lock, the entrypoint."""

from __future__ import annotations

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
    (entrypoint,) = [a for kind, a in _instructions() if kind == "ENTRYPOINT"]
    assert shlex.split(entrypoint.strip("[]").replace(",", " "))[-1] == "afm"
    user = [a for kind, a in _instructions() if kind == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert CliRunner().invoke(cli, ["--help"]).exit_code == 0


def test_every_copied_path_exists_and_local_state_stays_out() -> None:
    for kind, args in _instructions():
        if kind == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"var", ".venv", ".git"} <= set(ignored)
