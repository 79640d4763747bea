"""``afm serve`` hands its options to the scoring service."""

from __future__ import annotations


def test_serve_passes_the_body_limit_to_the_app(tmp_path, monkeypatch) -> None:
    import uvicorn
    from click.testing import CliRunner

    import serving.app
    from serving.cli import serve

    built: list[dict] = []
    monkeypatch.setattr(serving.app, "create_app", lambda layout, **kw: built.append(kw) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    runner = CliRunner()
    assert runner.invoke(serve, ["--home", str(tmp_path), "--max-body-bytes", "4096"]).exit_code == 0
    monkeypatch.setenv("AFM_MAX_BODY_BYTES", "8192")
    assert runner.invoke(serve, ["--home", str(tmp_path)]).exit_code == 0
    monkeypatch.delenv("AFM_MAX_BODY_BYTES")
    assert runner.invoke(serve, ["--home", str(tmp_path)]).exit_code == 0
    assert [kw.get("max_body_bytes") for kw in built] == [4096, 8192, None]  # None: the app's default

    result = runner.invoke(serve, ["--home", str(tmp_path), "--max-body-bytes", "0"])
    assert result.exit_code == 2 and "--max-body-bytes" in result.output
