"""Run several DAG runs with Airflow's ``dag.test()`` in one process.

``airflow dags test DAG DATE`` parses the DAG folder and calls ``dag.test(logical_date=…)``
for one run; each call is a new process that pays for importing Airflow, GX and Feast
and for starting Spark (~30 s here). This runner makes the same ``dag.test()`` calls for a
list of runs in one process, so the demo and the tests pay those costs once.

Usage (AIRFLOW_HOME and the DAG folder come from the environment, as for ``airflow``)::

    python -m afm.dag_runner activity_features=2026-01-01 activity_features=2026-01-02 …
"""

from __future__ import annotations

import datetime as dt
import sys
import time

from features.config import parse_ds


def parse_run(spec: str) -> tuple[str, dt.datetime]:
    """``DAG_ID=YYYY-MM-DD`` → (dag_id, logical date at 00:00 UTC)."""
    dag_id, sep, ds = spec.partition("=")
    if not sep or not dag_id:
        raise ValueError(f"a run is DAG_ID=YYYY-MM-DD, got {spec!r}")
    day = parse_ds(ds)
    return dag_id, dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def run_dag_tests(specs: list[str]) -> None:
    """Run each ``DAG_ID=DS`` with ``dag.test()`` in order; raise on the first failed run."""
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    runs = [parse_run(s) for s in specs]
    bag = DagBag(conf.get("core", "dags_folder"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    for dag_id, logical_date in runs:
        if dag_id not in bag.dags:
            raise KeyError(f"no DAG {dag_id!r} in {conf.get('core', 'dags_folder')} (have {sorted(bag.dag_ids)})")
        start = time.perf_counter()
        dag_run = bag.dags[dag_id].test(logical_date=logical_date)
        took = time.perf_counter() - start
        if dag_run is None or dag_run.state != DagRunState.SUCCESS:
            state = getattr(dag_run, "state", None)
            raise RuntimeError(f"DAG run {dag_id} {logical_date.date()} ended {state}")
        print(f"[dag] {dag_id} {logical_date.date()}: success ({took:.0f} s)", flush=True)


def main() -> None:
    try:
        run_dag_tests(sys.argv[1:])
    except Exception as exc:  # one clear line for the caller; the traceback is in the task logs
        print(f"[dag] FAILED: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
