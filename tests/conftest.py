"""Markers by rule, so that ``make quick`` (``-m "not slow and not spark"``) leaves out what needs Spark or time.

* ``spark``: every test that uses a fixture in ``SPARK_FIXTURES``, every other test in a module where
  one does (they share its module-scoped session), and tests/e2e (the demo runs Spark in a subprocess).
  A test that starts a session some other way carries ``@pytest.mark.spark`` itself; a test not
  marked ``spark`` that runs with a live SparkContext fails (``pytest_runtest_setup/call`` below).
* ``slow``: tests/e2e, tests using a fixture in ``SLOW_FIXTURES`` and the node ids in ``SLOW``: the tests
  that took more than ~10 s in a full run (``pytest tests --durations=40``; a module-scoped fixture's
  time counts on the first test that uses it, so a costly one is listed as a fixture).

``make test`` runs everything. The per-test limit is ``timeout`` in pyproject's [tool.pytest.ini_options]
(pytest-timeout); tests/e2e gets ``E2E_TIMEOUT_S``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator

import pytest

#: Fixtures that start Spark: a test using one, and every test of its module, is marked ``spark``.
SPARK_FIXTURES = {"spark", "pipeline_world"}
#: Fixtures whose setup takes minutes: every test using one is marked ``slow``.
SLOW_FIXTURES = {"trained"}  # tests/unit/training/jobs/test_pipeline.py: pretrain + finetune of the tiny model, 40-90 s
#: tests/e2e runs ``afm demo`` (Spark in a subprocess, several minutes): spark, slow, and a longer timeout.
E2E = "tests/e2e/"
E2E_TIMEOUT_S = 1500  # the demo subprocess's own limit is 1200 s, then the module's checks

#: Node ids measured over ~10 s (a parametrized test named without ``[…]`` covers every case).
SLOW = {
    "tests/unit/training/experiments/test_movielens_newitems.py::test_real_movielens_split_and_a_tiny_run",  # 60-100 s
    "tests/unit/training/experiments/test_movielens_newitems.py::test_end_to_end_on_tiny_data_returns_the_figures",
    "tests/unit/training/model/test_objectives.py::test_objective_learns_a_deterministic_cycle",  # 5-35 s each
    "tests/unit/training/test_trainer.py::test_resumed_run_continues_exactly",
    "tests/unit/training/test_trainer.py::test_ddp_two_cpu_processes_stay_in_sync",
    "tests/integration/training/test_torchrun.py::test_two_processes_take_the_single_process_steps_with_the_default_recipe",
    "tests/integration/training/test_torchrun.py::test_pretrain_on_two_processes_saves_one_model_and_prints_one_line",
    "tests/unit/training/bench/test_dcat.py::test_compiled_sequence_module_matches_eager",
    "tests/unit/training/bench/test_pretrain.py::test_bench_line_on_cpu",
    "tests/unit/training/bench/test_seqrec.py::test_bench_learns_the_chains_and_eval_reproduces_it",
    "tests/unit/training/experiments/test_ensemble.py::test_bench_members_trains_side_by_side_and_eval_reproduces_the_ensemble",
    "tests/unit/training/jobs/test_pipeline.py::test_pretrain_retrieval_scores_the_held_out_day_and_loads_earlier_artifacts",
    # Spark tests over 10 s (already left out of `make quick` as spark)
    "tests/integration/features/test_spark_pipeline.py::test_run_day_steps_and_reports",  # the module's pipeline
    "tests/integration/features/test_spark_pipeline.py::test_rerun_gives_identical_outputs",
    "tests/integration/features/test_gate_inputs.py::test_hidden_data_files_are_refused_and_markers_are_reported",
    "tests/integration/features/test_gate_inputs.py::test_a_failed_rerun_leaves_the_good_run_byte_identical",
    "tests/integration/features/test_gate_inputs.py::test_ids_outside_the_domain_are_quarantined_with_a_reason",
    "tests/integration/features/test_feast_store.py::test_round_trip_spark_to_online_and_point_in_time",
    "tests/integration/features/test_feast_store.py::test_export_before_inputs_names_the_missing_partition",
}


def _base(nodeid: str) -> str:
    return nodeid.partition("[")[0]


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    spark_modules = {item.path for item in items if SPARK_FIXTURES & set(getattr(item, "fixturenames", ()))}
    matched: set[str] = set()
    for item in items:
        nodeid, fixtures = item.nodeid, set(getattr(item, "fixturenames", ()))
        if item.path in spark_modules or nodeid.startswith(E2E):
            item.add_marker(pytest.mark.spark)
        listed = {nodeid, _base(nodeid)} & SLOW
        matched |= listed
        if listed or SLOW_FIXTURES & fixtures or nodeid.startswith(E2E):
            item.add_marker(pytest.mark.slow)
        if nodeid.startswith(E2E) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))
    collected_files = {item.nodeid.partition("::")[0] for item in items}
    stale = sorted(n for n in SLOW - matched if n.partition("::")[0] in collected_files)
    if stale:
        warnings.warn(
            pytest.PytestWarning(f"tests/conftest.py SLOW names tests that do not exist: {stale}"), stacklevel=1
        )


def _spark_context_active() -> bool:
    if "pyspark" not in sys.modules:  # nothing has imported Spark, so no session can be running
        return False
    from pyspark import SparkContext

    return SparkContext._active_spark_context is not None


def _check_spark_marker(item: pytest.Item, when: str) -> None:
    if item.get_closest_marker("spark") is None and _spark_context_active():
        pytest.fail(
            f"a Spark session is running during the {when} of this test, which is not marked `spark`: mark it "
            "(or its module) `spark`, or stop the session an earlier test left running",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    result = yield
    _check_spark_marker(item, "setup")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    result = yield
    _check_spark_marker(item, "call")
    return result
