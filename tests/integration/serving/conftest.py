"""Fixtures of the serving integration tests: a synthetic world run through the real feature pipeline and Feast."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from features.config import Layout
from serving.model import ServingModel, load_ranker
from training.jobs.finetune import FinetuneConfig, finetune

#: the sequence modes the parity tests serve: the default first
PARITY_MODES = ("hybrid", "pinfm_early", "pinfm_late")


@pytest.fixture(scope="module")
def pipeline_world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The tiny synthetic world through every Spark step of each day (no Feast yet: see ``online_world``).

    A module using this fixture starts Spark: mark it ``spark`` (and ``slow``: about two minutes).

    Returns:
        ``layout``, ``days`` (all days, oldest first), ``snapshot_day``, ``request_day``.
    """
    from features.pipeline import run_day
    from features.spark import spark_session
    from features.synth import SynthConfig, generate_world

    layout = Layout(tmp_path_factory.mktemp("pipeline_world"))
    days = generate_world(layout, SynthConfig.preset("tiny"))["days"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AFM_SPARK_SHUFFLE_PARTITIONS", "2")
        with spark_session("local[2]"):  # one session for every day (run_day reuses it), stopped after
            for ds in days:
                run_day(layout, ds)
    return SimpleNamespace(layout=layout, days=days, snapshot_day=days[-2], request_day=days[-1])


@pytest.fixture(scope="module")
def online_world(pipeline_world: SimpleNamespace, online_store) -> SimpleNamespace:
    """``pipeline_world`` with Feast registered and its online store (SQLite, then Redis) materialized.

    The online store is materialized up to the end of the day before the last (the
    ``snapshot_day``), as a service running during the last day (the ``request_day``) sees
    it: its ``user_sequence`` rows are that day's end-of-day snapshot. The Spark outputs and
    the registry file are the same for both stores; only the online rows are written per store.

    Returns:
        ``pipeline_world``'s fields and ``online_store``.
    """
    from features.store import materialize, register

    register(pipeline_world.layout)  # idempotent; sets up the store's tables (SQLite) when this store comes first
    materialize(pipeline_world.layout, end_ds=pipeline_world.snapshot_day)
    if online_store.kind == "redis":  # the rows the service reads are in Redis (the SQLite file stays as it was)
        assert online_store.client().dbsize() > 0
    return SimpleNamespace(**vars(pipeline_world), online_store=online_store)


@pytest.fixture(scope="module")
def models(pipeline_world: SimpleNamespace) -> dict[str, ServingModel]:
    """A tiny ranker per parity mode, fine-tuned on the days before the last, loaded from its artifact."""
    out = {}
    for mode in PARITY_MODES:
        cfg = FinetuneConfig(epochs=1, batch_size=256, model="tiny", device="cpu", sequence=mode)
        result = finetune(pipeline_world.layout, cfg, ds=pipeline_world.request_day, backbone="none", promote=False)
        out[mode] = load_ranker(pipeline_world.layout, result["version"])
        assert out[mode].ranker.cfg.time_gaps  # the saved config came back with its time gaps
    return out
