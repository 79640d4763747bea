"""The zip of the project's code for Spark executors, and the settings of a session on a cluster (no Spark)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from features.shipping import SHIPPED_PACKAGES, package_dir, project_zip, zip_bytes
from features.spark import cluster_conf, is_local_master

REPO = Path(__file__).resolve().parents[3]


def test_the_zip_holds_the_features_package_and_nothing_else() -> None:
    names = zipfile.ZipFile(io.BytesIO(zip_bytes())).namelist()
    assert SHIPPED_PACKAGES == ("features",)
    assert names == sorted(names)
    assert {"features/__init__.py", "features/config.py", "features/spark.py", "features/shipping.py"} <= set(names)
    assert any(n.startswith("features/feature_repo/") and n.endswith(".yaml") for n in names)
    assert all(n.startswith("features/") and "__pycache__" not in n for n in names)
    assert all(n.endswith((".py", ".yaml")) for n in names)


def test_the_zip_is_the_repository_files_with_fixed_times_and_modes() -> None:
    zf = zipfile.ZipFile(io.BytesIO(zip_bytes()))
    assert package_dir("features") == REPO / "features"
    for info in zf.infolist():
        assert info.date_time == (1980, 1, 1, 0, 0, 0) and info.external_attr == 0o644 << 16
        assert zf.read(info) == (REPO / info.filename).read_bytes()


def test_the_same_code_gives_the_same_zip_under_a_name_of_its_digest(tmp_path: Path, monkeypatch) -> None:
    assert zip_bytes() == zip_bytes()
    monkeypatch.setenv("AFM_HOME", str(tmp_path / "home"))
    path = project_zip()
    assert path.parent == tmp_path / "home" / "cache" / "pyfiles"
    assert path.name.startswith("features-") and len(path.stem) == len("features-") + 16
    assert path.read_bytes() == zip_bytes()
    mtime = path.stat().st_mtime_ns
    assert project_zip() == path and path.stat().st_mtime_ns == mtime  # cached: not written again
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_missing_package_is_named() -> None:
    with pytest.raises(ModuleNotFoundError, match="'no_such_pkg' to ship"):
        zip_bytes(("no_such_pkg",))


@pytest.mark.parametrize(
    ("url", "local"),
    [("local", True), ("local[2]", True), ("local[*]", True), ("spark://127.0.0.1:7077", False),
     ("local-cluster[2,1,1024]", False), ("yarn", False)],
)  # fmt: skip
def test_which_masters_are_local(url: str, local: bool) -> None:
    assert is_local_master(url) is local
    assert (cluster_conf(url) == {}) is local


def test_cluster_settings(monkeypatch) -> None:
    monkeypatch.delenv("AFM_SPARK_EXECUTOR_MEMORY", raising=False)
    assert cluster_conf("spark://127.0.0.1:7077") == {
        "spark.executor.memory": "768m",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
    }
    monkeypatch.setenv("AFM_SPARK_EXECUTOR_MEMORY", "4g")
    assert cluster_conf("spark://spark-master.example:7077") == {"spark.executor.memory": "4g"}
