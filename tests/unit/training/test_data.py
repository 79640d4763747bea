"""Parquet → tensor encoding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.config import Layout
from features.contract import ACTION_IDS, CONTENT_DIM, SURFACE_IDS, ContractError
from training.data import ContentTable, ItemCreatedAt, encode_sequences, load_ranking_data, read_partition
from training.model.inputs import candidate_age_s


def test_encode_truncates_to_newest_and_right_pads() -> None:
    arr = encode_sequences(
        [[1, 2, 3, 4], [], [9]],
        [["click", "save", "hide", "share"], [], ["click"]],
        [["home", "home", "search", "related"], [], ["home"]],
        max_len=3,
    )
    assert arr.item_ids.tolist() == [[2, 3, 4], [0, 0, 0], [9, 0, 0]]
    assert arr.action_ids[0].tolist() == [ACTION_IDS["save"], ACTION_IDS["hide"], ACTION_IDS["share"]]
    assert arr.surface_ids[0, 2] == SURFACE_IDS["related"]
    assert arr.lengths.tolist() == [3, 0, 1]
    t = arr.tensors(np.array([1, 2]), None)
    assert t["item_ids"].shape == (2, 1)  # trimmed to the longest selected row
    assert t["pad_mask"].tolist() == [[False], [True]]


def test_encode_errors_name_the_problem() -> None:
    with pytest.raises(ContractError, match="unknown action 'like'"):
        encode_sequences([[1]], [["like"]], [["home"]], 4)
    with pytest.raises(ContractError, match="unknown surface 'tv'"):
        encode_sequences([[1]], [["click"]], [["tv"]], 4)
    with pytest.raises(ContractError, match="different lengths"):
        encode_sequences([[1, 2]], [["click"]], [["home"]], 4)


def test_content_lookup_zeros_for_unknown_and_missing() -> None:
    frame = pd.DataFrame({"item_id": [5, 3, 8], "content": [[1.0] * CONTENT_DIM, None, [2.0] * CONTENT_DIM]})
    table = ContentTable.from_frame(frame)
    assert len(table) == 2
    out = table.lookup(np.array([[8, 3], [0, 5]]))
    assert out.shape == (2, 2, CONTENT_DIM)
    assert out[0, 0, 0] == 2.0 and out[0, 1].sum() == 0 and out[1, 0].sum() == 0 and out[1, 1, 0] == 1.0
    with pytest.raises(ContractError, match="item 1: content has 3 values"):
        ContentTable.from_frame(pd.DataFrame({"item_id": [1], "content": [[1.0, 2.0, 3.0]]}))


def test_load_ranking_data_joins_sequences(world: Layout) -> None:
    data = load_ranking_data(world, ["2026-01-01"], max_len=8)
    ex = read_partition(world.ranking_examples, "2026-01-01")
    assert len(data) == len(ex)
    assert len(data.sequences) == ex["request_id"].nunique()
    assert data.labels.shape == (len(ex), 3)
    # every impression points at its own request's sequence
    seq = read_partition(world.request_sequences, "2026-01-01").set_index("request_id")
    i = 5
    rid = ex["request_id"].iloc[i]
    expect = list(seq.loc[rid, "item_ids"])[-8:]
    got = data.sequences.item_ids[data.req_index[i], : data.sequences.lengths[data.req_index[i]]].tolist()
    assert got == expect
    batches = data.request_batches(20, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(data)))
    for b in batches:  # requests are never split across batches
        same_requests = np.flatnonzero(np.isin(data.req_index, data.req_index[b]))
        assert np.isin(same_requests, b).all()


def test_missing_partition_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="ds=2026-02-01"):
        read_partition(Layout(tmp_path).ranking_examples, "2026-02-01")


def test_candidate_age_is_seconds_since_creation_and_unknown_is_minus_one() -> None:
    created = ItemCreatedAt(np.array([30, 10, 20]), np.array([1_000, 500, 2_000]))  # unsorted on purpose
    ids = np.array([[10, 20, 99], [30, 0, 10]])  # 99 unknown, 0 padding
    got = created.age_at(ids, np.array([[2_500], [3_000]]))  # one request time per row, broadcast
    assert got.dtype == np.int64 and got.tolist() == [[2_000, 500, -1], [2_000, -1, 2_500]]
    assert created.age_at(np.array([10, 99]), 600).tolist() == [100, -1]  # one request time for all
    # the same rule as the model library's, which fine-tuning and serving both call through age_at
    np.testing.assert_array_equal(candidate_age_s(created.lookup(ids), np.array([[2_500], [3_000]])), got)
    assert candidate_age_s(np.array([-1, 0, 700]), 600).tolist() == [-1, 600, -100]  # created later: negative
