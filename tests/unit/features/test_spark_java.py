"""Spark without Java fails with one sentence that says what to install."""

import pytest


def test_missing_java_is_one_sentence(monkeypatch) -> None:
    from features import spark

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(spark.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="Spark needs Java 17"):
        spark.require_java()
