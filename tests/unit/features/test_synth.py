"""Synthetic world generator: determinism, contract, causality and learnability."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from features.config import Layout, day_window
from features.contract import EVENT_SCHEMA, ITEM_SCHEMA, LABEL_ACTIONS, ContractError
from features.synth import TRUTH_SCHEMA, SynthConfig, best_auc, generate_world, truth_dir

TINY = SynthConfig.preset("tiny")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Layout, dict]:
    layout = Layout(tmp_path_factory.mktemp("synth_a"))
    return layout, generate_world(layout, TINY)


@pytest.fixture(scope="module")
def events(world) -> pd.DataFrame:
    layout, _ = world
    frames = []
    for ds in layout.available_days(layout.raw_events):
        t = pq.read_table(Layout.partition(layout.raw_events, ds) / "part-0.parquet")
        assert t.schema.equals(EVENT_SCHEMA), ds
        df = t.to_pandas()
        df["ds"] = ds
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def test_same_seed_same_bytes_different_seed_different(world, tmp_path):
    layout, _ = world
    again = Layout(tmp_path / "again")
    generate_world(again, TINY)
    first, second = _hashes(layout.root), _hashes(again.root)
    assert len(first) == 1 + 3 * TINY.n_days  # items + events, dirty events and truth per day
    assert first == second
    other = Layout(tmp_path / "other")
    generate_world(other, TINY.replace(seed=TINY.seed + 1))
    third = _hashes(other.root)
    assert third.keys() == first.keys()
    assert all(third[k] != first[k] for k in first)


def test_summary_and_partitions(world, events):
    layout, summary = world
    assert summary["days"] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert layout.available_days(layout.raw_events) == summary["days"]
    assert layout.available_days(truth_dir(layout)) == summary["days"]
    assert summary["n_items"] == TINY.n_items + TINY.n_days * TINY.new_items_per_day
    assert summary["n_events_total"] == len(events)
    assert events.groupby("ds").size().to_dict() == summary["n_events"]
    for a in LABEL_ACTIONS:
        assert 0 < summary["rates"][a] < 0.4
    assert 0.08 < summary["rates"]["click"] < 0.3


def test_events_follow_contract(events):
    assert events["event_id"].is_unique
    for ds, g in events.groupby("ds"):
        start, end = day_window(ds)
        assert g["ts"].min() >= start and g["ts"].max() < end, ds
    assert set(events["surface"]) <= {"home", "search", "related"}
    assert events["user_id"].min() >= 1 and events["user_id"].max() <= TINY.n_users
    # dwell only on clicks
    assert events.loc[events["action"] != "click", "dwell_ms"].isna().all()
    assert (events.loc[events["action"] == "click", "dwell_ms"] > 0).all()


def test_every_day_has_impressions_and_each_label_action(events):
    for ds, g in events.groupby("ds"):
        counts = g["action"].value_counts()
        assert counts.get("impression", 0) > 0, ds
        for a in LABEL_ACTIONS:
            assert counts.get(a, 0) > 0, (ds, a)


def test_slates_have_distinct_items_of_fixed_size(events):
    imp = events[events["action"] == "impression"]
    assert imp["request_id"].notna().all()
    per_req = imp.groupby("request_id")
    assert (per_req.size() == TINY.slate_size).all()
    assert (per_req["item_id"].nunique() == TINY.slate_size).all()
    assert (per_req["ts"].nunique() == 1).all() and (per_req["user_id"].nunique() == 1).all()


def test_responses_follow_their_impression(events):
    imp = events[events["action"] == "impression"][["request_id", "item_id", "user_id", "ts"]]
    resp = events[(events["action"] != "impression") & events["request_id"].notna()]
    assert len(resp) > 0
    joined = resp.merge(imp, on=["request_id", "item_id"], how="left", suffixes=("", "_imp"), validate="many_to_one")
    assert joined["ts_imp"].notna().all(), "response without a matching impression"
    assert (joined["ts"] > joined["ts_imp"]).all()
    assert (joined["user_id"] == joined["user_id_imp"]).all()
    # saves come after a click of the same impression, hides never with a click
    keys = resp.groupby(["request_id", "item_id"])["action"].agg(set)
    assert all("click" in s for s in keys if "save" in s)
    assert not any({"click", "hide"} <= s for s in keys)
    # organic explicit events exist without a request
    assert (events["request_id"].isna() & (events["action"] == "click")).sum() > 0


def test_no_item_shown_before_created_at(world, events):
    layout, _ = world
    items = pq.read_table(layout.items / "items.parquet")
    assert items.schema.equals(ITEM_SCHEMA)
    items = items.to_pandas()
    assert items["item_id"].is_unique
    assert items["content"].map(len).eq(16).all()
    assert items["category"].notna().all()
    joined = events.merge(items[["item_id", "created_at"]], on="item_id", how="left")
    assert joined["created_at"].notna().all()
    assert (joined["ts"] >= joined["created_at"]).all()
    # new items arrive during the days and do get shown
    first_day = day_window("2026-01-01")[0]
    new_ids = set(items.loc[items["created_at"] >= first_day, "item_id"])
    assert len(new_ids) == TINY.n_days * TINY.new_items_per_day
    assert new_ids & set(events.loc[events["action"] == "impression", "item_id"])


def test_truth_matches_impressions(world, events):
    layout, _ = world
    for ds in world[1]["days"]:
        truth = pq.read_table(Layout.partition(truth_dir(layout), ds) / "part-0.parquet")
        assert truth.schema.equals(TRUTH_SCHEMA)
        truth = truth.to_pandas()
        imp = events[(events["ds"] == ds) & (events["action"] == "impression")]
        assert len(truth) == len(imp)
        assert set(zip(truth["request_id"], truth["item_id"], strict=True)) == set(
            zip(imp["request_id"], imp["item_id"], strict=True)
        )
        for a in LABEL_ACTIONS:
            assert truth[f"p_{a}"].between(0, 1).all()
        assert (truth["p_save"] <= truth["p_click"]).all()
        assert (truth["p_hide"] <= 1 - truth["p_click"] + 1e-12).all()


def test_best_auc(world):
    layout, summary = world
    for ds in summary["days"]:
        aucs = best_auc(layout, ds)
        assert 0.6 < aucs["click"] < 1.0, (ds, aucs)
        for a in ("save", "hide"):
            assert math.isnan(aucs[a]) or 0.5 < aucs[a] <= 1.0, (ds, aucs)
        assert aucs["n_impressions"] == summary["per_day"][ds]["n_impressions"]
    with pytest.raises(FileNotFoundError, match="ds=2025-12-31"):
        best_auc(layout, "2025-12-31")


def test_regenerate_replaces_stale_days(tmp_path):
    layout = Layout(tmp_path)
    generate_world(layout, TINY.replace(n_users=5, n_items=30, n_days=3))
    summary = generate_world(layout, TINY.replace(n_users=5, n_items=30, n_days=1, start_ds="2026-02-01"))
    assert layout.available_days(layout.raw_events) == ["2026-02-01"] == summary["days"]
    assert layout.available_days(truth_dir(layout)) == ["2026-02-01"]


def test_config_presets_and_validation():
    assert SynthConfig() == SynthConfig.preset("demo")
    assert SynthConfig.preset("large").n_users > SynthConfig.preset("demo").n_users > TINY.n_users
    assert TINY.replace(n_days=9).n_days == 9 and TINY.n_days == 3
    with pytest.raises(ValueError, match="unknown synth preset 'huge'"):
        SynthConfig.preset("huge")
    with pytest.raises(ValueError, match="slate_size"):
        TINY.replace(n_items=5)
    with pytest.raises(ValueError, match="2026-13-01"):
        TINY.replace(start_ds="2026-13-01")
    with pytest.raises(ValueError, match="surface_probs"):
        TINY.replace(surface_probs=(0.5, 0.2, 0.2))
    assert issubclass(ContractError, ValueError)


def test_fill_slates_priorities_and_fallback():
    import numpy as np

    from features.synth import _fill_slates

    retrieved = np.array([[0, 1], [0, 1]])
    fresh = np.array([[5, 5, 5, 5], [6, 6, 6, 6]])
    has_fresh = np.array([[True], [False]])
    rand = np.array([[0, 1, 5, 5], [2, 3, 2, 4]])
    out = _fill_slates(retrieved, fresh, has_fresh, rand, k_fresh=2, slate=5, n_avail=np.array([6, 6]))
    # row 0: retrieved 0, 1; one distinct fresh draw (5); random draws all taken -> newest unused 4, 3
    assert out[0].tolist() == [0, 1, 5, 4, 3]
    # row 1: no fresh items -> random fills (duplicates skipped)
    assert out[1].tolist() == [0, 1, 2, 3, 4]


def test_dirty_rows_are_planted_and_break_the_contract(tmp_path) -> None:
    from features.contract import validate_event_record
    from features.synth import DIRTY_FILE, DIRTY_KINDS

    layout = Layout.at(tmp_path)
    generate_world(layout, SynthConfig.preset("tiny"))
    day = layout.available_days(layout.raw_events)[0]
    part = layout.partition(layout.raw_events, day)
    clean = pq.read_table(part / "part-0.parquet").to_pylist()
    dirty = pq.read_table(part / DIRTY_FILE).to_pylist()
    assert len(dirty) == len(DIRTY_KINDS)
    clean_ids = {r["event_id"] for r in clean}
    assert sum(r["event_id"] in clean_ids for r in dirty) == 1  # exactly one duplicate id
    reasons = [validate_event_record(r) for r in dirty]
    assert ["unknown_action"] in reasons and ["unknown_surface"] in reasons
    start, end = day_window(day)
    assert sum(not (start <= r["ts"] < end) for r in dirty) == 1  # one lands in the next day
