"""training.model.quantize: per-row int8 / int4 round trips, the gather-then-dequantize fast path, and the
item-table swap of a Ranker / PinFM (tiny configs, no data files)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from training.model.backbone import PinFM, PinFMConfig
from training.model.quantize import (
    QuantizationConfig,
    QuantizedEmbedding,
    dequantize_rows,
    item_tables,
    max_abs_error,
    pack_int4,
    quantize_item_tables,
    quantize_rows,
    roundtrip,
    table_bytes,
    unpack_int4,
)
from training.model.ranker import NewItemConfig, Ranker, RankerConfig

BACKBONE = PinFMConfig(d_model=32, n_layers=1, n_heads=2, max_len=12, hash_buckets=4096)


def _matrix(n: int = 500, d: int = 33, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 3  # rows of different scales
    w[0] = 0.0  # an all-zero row
    w[1] = 0.7  # a constant row
    w[2, :] = 0.0
    w[2, 5] = -2.5  # one non-zero value
    return w


@pytest.mark.parametrize("bits", [8, 4])
def test_each_value_is_within_half_a_step_of_its_row(bits: int) -> None:
    w = _matrix()
    q = quantize_rows(w, bits)
    back = dequantize_rows(q)
    assert back.shape == w.shape and back.dtype == torch.float32
    err = (w - back).abs().amax(dim=1)  # (N,)
    bound = q.scale / 2 * (1 + 1e-5) + 1e-7  # half a quantization step, up to float32 rounding
    assert (err <= bound).all(), f"worst row exceeds its bound by {(err - bound).max():.3g}"
    assert torch.equal(back[0], torch.zeros(w.shape[1]))  # a zero row stays exactly zero
    assert torch.allclose(back[1], w[1])  # a constant row is exact (int4: its offset; int8: ±127 · scale)
    if bits == 8:
        assert q.codes.dtype == torch.int8 and q.codes.shape == w.shape and q.offset is None
        assert q.codes.abs().max() == 127
        assert torch.allclose(q.scale, w.abs().amax(dim=1) / 127)
    else:
        assert q.codes.dtype == torch.uint8 and q.codes.shape == (w.shape[0], (w.shape[1] + 1) // 2)
        assert torch.allclose(q.scale, (w.amax(dim=1) - w.amin(dim=1)) / 15)
    # int4's step is 127 / 15 · (range / (2 · max|w|)) times int8's: coarser on every non-constant row
    assert (err[3:] > 0).all()


def test_int8_is_finer_than_int4() -> None:
    w = _matrix()
    e8 = (w - roundtrip(w, 8)).abs().mean()
    e4 = (w - roundtrip(w, 4)).abs().mean()
    assert e8 * 4 < e4


def test_int4_packing_round_trips_odd_and_even_widths() -> None:
    g = torch.Generator().manual_seed(1)
    for d in (1, 2, 7, 32):
        codes = torch.randint(0, 16, (9, d), generator=g)
        packed = pack_int4(codes)
        assert packed.shape == (9, (d + 1) // 2) and packed.dtype == torch.uint8
        assert torch.equal(unpack_int4(packed, d), codes)
    assert pack_int4(torch.tensor([[3, 12]])).item() == 3 | (12 << 4)


def test_bad_bits_and_shapes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="bits must be 8 or 4, got 2"):
        quantize_rows(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match=r"\(N, D\) matrix"):
        quantize_rows(torch.zeros(2, 2, 2), 8)
    with pytest.raises(ValueError, match="item_tables must be one of"):
        QuantizationConfig(item_tables="int2")
    with pytest.raises(ValueError, match="user_embeddings must be one of"):
        QuantizationConfig(user_embeddings="bf16")
    assert QuantizationConfig(user_embeddings="fp32").user_embedding_bits is None


@pytest.mark.parametrize("bits", [8, 4])
def test_the_gathered_rows_equal_the_whole_table_dequantized_then_indexed(bits: int) -> None:
    emb = nn.Embedding(300, 17)
    q = QuantizedEmbedding.from_embedding(emb, bits)
    ids = torch.randint(0, 300, (4, 9, 5))
    fast = q(ids)
    assert fast.shape == (4, 9, 5, 17)
    assert torch.equal(fast, q.reference(ids))  # bit for bit
    assert torch.equal(q.dequantized_weight(), dequantize_rows(quantize_rows(emb.weight, bits)))


@pytest.mark.parametrize("bits", [8, 4])
def test_the_buffers_round_trip_through_a_state_dict(bits: int) -> None:
    src = QuantizedEmbedding.from_embedding(nn.Embedding(50, 8), bits)
    dst = QuantizedEmbedding(50, 8, bits)
    assert set(src.state_dict()) == ({"codes", "scale"} | ({"offset"} if bits == 4 else set()))
    dst.load_state_dict(src.state_dict())
    ids = torch.arange(50)
    assert torch.equal(dst(ids), src(ids))


def _ranker(seed: int = 0) -> Ranker:
    torch.manual_seed(seed)
    cfg = RankerConfig(backbone=BACKBONE, new_items=NewItemConfig.off())  # the default (hybrid) ranker
    return Ranker(cfg).eval()


def _request(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    L, C = 10, 64
    items = torch.randint(1, 10**9, (1, L), generator=g)
    items[0, -2:] = 0  # right padding
    return {
        "seq": {
            "item_ids": items,
            "action_ids": torch.randint(1, 4, (1, L), generator=g) * (items != 0),
            "surface_ids": torch.randint(1, 3, (1, L), generator=g) * (items != 0),
            "pad_mask": items != 0,
        },
        "cand_ids": torch.randint(1, 10**9, (1, C), generator=g),
        "cand_surface_ids": torch.ones(1, C, dtype=torch.long),
    }


@pytest.mark.parametrize("bits", [8, 4])
def test_swapping_the_item_tables_changes_only_them(bits: int) -> None:
    ranker = _ranker()
    before = {k: v.clone() for k, v in ranker.state_dict().items()}
    q = copy.deepcopy(ranker)
    names = quantize_item_tables(q, bits)
    assert names == ["backbone.items.tables.0", "backbone.items.tables.1"]
    assert all(isinstance(t, QuantizedEmbedding) for t in item_tables(q).values())
    after = q.state_dict()
    table_keys = {k for k in before if k.startswith("backbone.items.tables.")}
    assert table_keys == {"backbone.items.tables.0.weight", "backbone.items.tables.1.weight"}
    for k, v in before.items():  # every other tensor is the same
        if k not in table_keys:
            assert torch.equal(after[k], v), k
    assert {k for k in after if k.startswith("backbone.items.tables.")} == {
        f"backbone.items.tables.{t}.{b}" for t in (0, 1) for b in ("codes", "scale", *(["offset"] if bits == 4 else []))
    }
    # the tables shrink to about bits/32 of their float size, plus the per-row scales (and offsets)
    rows, width = BACKBONE.hash_buckets * 2, BACKBONE.d_model // 2
    per_row = width * bits // 8 + 4 * (1 if bits == 8 else 2)
    assert table_bytes(ranker) == rows * width * 4
    assert table_bytes(q) == rows * per_row
    errors = max_abs_error(ranker, q)
    assert set(errors) == set(names) and all(0 < e < 0.05 for e in errors.values())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_item_tables(q, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_padding_embeds_to_zeros_and_the_item_rows_are_the_dequantized_ones(bits: int) -> None:
    model = PinFM(BACKBONE).eval()
    q = copy.deepcopy(model)
    quantize_item_tables(q, bits)
    ids = torch.tensor([[0, 5, 10**12, 0]])
    out = q.item_embedding(ids)
    assert torch.equal(out[0, 0], torch.zeros(BACKBONE.d_model)) and torch.equal(out[0, 3], out[0, 0])
    # the float model with its tables replaced by the dequantized weights gives the same embeddings
    ref = copy.deepcopy(model)
    for name, tab in item_tables(q).items():
        ref.get_submodule(name).weight.data.copy_(tab.dequantized_weight())
    assert torch.equal(out, ref.item_embedding(ids))


#: largest |p_quantized - p_fp32| of any candidate's probability allowed for the tiny ranker
PROB_TOLERANCE = {8: 0.002, 4: 0.02}


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_rankers_scores_stay_close_to_fp32(bits: int) -> None:
    ranker = _ranker()
    with torch.no_grad():  # train the tables away from their init scale so that quantization has work to do
        for tab in ranker.backbone.items.tables:
            tab.weight.mul_(10)
    q = copy.deepcopy(ranker)
    quantize_item_tables(q, bits)
    b = _request()
    with torch.no_grad():
        p = torch.sigmoid(ranker(b["seq"], b["cand_ids"], b["cand_surface_ids"]))  # (1, C, A)
        pq = torch.sigmoid(q(b["seq"], b["cand_ids"], b["cand_surface_ids"]))
    diff = (p - pq).abs().max().item()
    assert 0 < diff < PROB_TOLERANCE[bits]
    # the ranking of the candidates by click hardly moves
    rank = torch.argsort(torch.argsort(p[0, :, 0]))
    rank_q = torch.argsort(torch.argsort(pq[0, :, 0]))
    corr = torch.corrcoef(torch.stack([rank.float(), rank_q.float()]))[0, 1]
    assert corr > (0.99 if bits == 8 else 0.95)


def test_a_model_without_item_tables_is_refused() -> None:
    with pytest.raises(ValueError, match="has no hashed item tables"):
        quantize_item_tables(nn.Linear(2, 2), 8)
