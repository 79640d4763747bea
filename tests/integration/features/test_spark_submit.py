"""Under spark-submit (how the Spark Operator starts the driver) the session keeps spark-submit's master."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
from features.spark import spark_session
with spark_session() as spark:
    print("MASTER", spark.sparkContext.master, spark.conf.get("spark.sql.session.timeZone"))
"""


@pytest.mark.spark
def test_a_submitted_driver_keeps_the_master_spark_submit_gave(tmp_path: Path) -> None:
    import pyspark

    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    (tmp_path / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "AFM_SPARK_MASTER"}
    env["PYSPARK_PYTHON"] = sys.executable
    out = subprocess.run(
        [str(submit), "--master", "local[2]", str(tmp_path / "probe.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    # not the project's default local[*]; and the project's session settings still apply
    assert "MASTER local[2] UTC" in out.stdout, out.stdout
