"""``afm serve``'s server settings: the address it binds, the graceful-shutdown bound, the Kubernetes pod's arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def served(monkeypatch) -> list[dict]:
    """What ``afm serve`` hands uvicorn, one dict per invocation (no app is built, no server started)."""
    import uvicorn

    import serving.app

    runs: list[dict] = []
    monkeypatch.setattr(serving.app, "create_app", lambda layout, **kw: "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append(kw))
    monkeypatch.delenv("AFM_GRACEFUL_SHUTDOWN_S", raising=False)
    return runs


def _serve(tmp_path, *args: str, env: dict[str, str] | None = None) -> None:
    from serving.cli import serve

    result = CliRunner().invoke(serve, ["--home", str(tmp_path), *args], env=env)
    assert result.exit_code == 0, result.output


def test_it_binds_the_loopback_address_by_default(tmp_path, served):
    from serving.cli import GRACEFUL_SHUTDOWN_S

    _serve(tmp_path)
    assert served == [
        {"host": "127.0.0.1", "port": 8080, "log_level": "info", "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S}
    ]
    assert 0 < GRACEFUL_SHUTDOWN_S < 30  # inside Kubernetes' default grace period before SIGKILL


def test_host_port_and_the_shutdown_bound_are_options(tmp_path, served):
    _serve(tmp_path, "--host", "0.0.0.0", "--port", "9000", "--timeout-graceful-shutdown", "5")
    _serve(tmp_path, env={"AFM_GRACEFUL_SHUTDOWN_S": "7"})
    assert [(r["host"], r["port"], r["timeout_graceful_shutdown"]) for r in served] == [
        ("0.0.0.0", 9000, 5),
        ("127.0.0.1", 8080, 7),
    ]


def test_the_shutdown_bound_must_be_positive(tmp_path, served):
    from serving.cli import serve

    result = CliRunner().invoke(serve, ["--home", str(tmp_path), "--timeout-graceful-shutdown", "0"])
    assert result.exit_code == 2 and "--timeout-graceful-shutdown" in result.output
    assert served == []


def test_the_kubernetes_pod_listens_on_every_interface(tmp_path, served):
    """The InferenceService passes ``--host 0.0.0.0`` itself: the loopback default must not reach the pod."""
    manifest = yaml.safe_load((ROOT / "infra/k8s/base/inferenceservice.yaml").read_text())
    (container,) = manifest["spec"]["predictor"]["containers"]
    command, *args = container["args"]
    assert command == "serve"
    _serve(tmp_path, *args)
    assert (served[0]["host"], served[0]["port"]) == ("0.0.0.0", container["ports"][0]["containerPort"])


def test_the_sigterm_handler_is_restored_after_serving(tmp_path, served):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    _serve(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before


def test_torch_threads_sets_the_model_pass_threads(tmp_path, served, monkeypatch):
    import torch

    monkeypatch.delenv("AFM_TORCH_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        _serve(tmp_path, "--torch-threads", "1")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        _serve(tmp_path)  # no option: torch's own setting stays
        assert torch.get_num_threads() == before
        from serving.cli import serve

        result = CliRunner().invoke(serve, ["--home", str(tmp_path), "--torch-threads", "0"])
        assert result.exit_code == 2 and "--torch-threads" in result.output
    finally:
        torch.set_num_threads(before)


def test_model_concurrency_bounds_the_passes_at_once(monkeypatch):
    from serving.state import model_concurrency

    monkeypatch.delenv("AFM_MODEL_CONCURRENCY", raising=False)
    assert model_concurrency() == 1
    monkeypatch.setenv("AFM_MODEL_CONCURRENCY", "3")
    assert model_concurrency() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("AFM_MODEL_CONCURRENCY", bad)
        with pytest.raises(ValueError, match="AFM_MODEL_CONCURRENCY must be a whole number"):
            model_concurrency()
