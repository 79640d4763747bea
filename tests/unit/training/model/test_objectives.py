"""Pretraining losses: pair selection, sampled softmax with log-Q, the full objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.model.backbone import PinFM, PinFMConfig
from training.model.objectives import (
    ItemCatalog,
    ObjectiveConfig,
    PinFMObjective,
    catalog_logsumexp,
    full_softmax_loss,
    future_token_pairs,
    multi_token_pairs,
    next_token_pairs,
    read_positions,
    sampled_softmax_logits,
    shared_full_softmax_losses,
)


def _pairs(p: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[tuple[int, int, int]]:
    return sorted(zip(*(t.tolist() for t in p), strict=True))


POSITIVE = torch.tensor(
    [
        [True, False, True, True, False],  # t=1 is a negative action, t=4 padding
        [True, True, False, False, False],  # 2 real tokens
    ]
)


def test_next_token_pairs_only_where_the_next_token_is_positive() -> None:
    assert _pairs(next_token_pairs(POSITIVE)) == [(0, 1, 2), (0, 2, 3), (1, 0, 1)]


def test_multi_token_pairs_cover_the_window() -> None:
    got = _pairs(multi_token_pairs(POSITIVE, window=2))
    assert got == [(0, 0, 2), (0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 0, 1)]
    assert _pairs(multi_token_pairs(POSITIVE, window=1)) == _pairs(next_token_pairs(POSITIVE))


def test_future_token_pairs_start_at_the_read_position() -> None:
    lengths = torch.tensor([4, 2])
    read = read_positions(lengths, future_window=2)
    assert read.tolist() == [1, 0]  # row 0: last 2 tokens are the future; row 1 too short → second-to-last
    assert _pairs(future_token_pairs(POSITIVE, read)) == [(0, 1, 2), (0, 1, 3), (1, 0, 1)]
    assert read_positions(torch.tensor([1]), 2).tolist() == [-1]
    assert future_token_pairs(POSITIVE[:1, :1], torch.tensor([-1]))[0].numel() == 0


def test_sampled_softmax_perfect_alignment_is_near_zero_and_random_is_log_n() -> None:
    n, d = 16, 32
    keys = torch.eye(n, d)
    ids = torch.arange(n)
    assert float(sampled_softmax_logits(keys.clone(), ids, keys, None, None, 0.01).cross_entropy()) < 1e-3
    torch.manual_seed(0)
    n = 256
    loss = sampled_softmax_logits(
        torch.randn(n, 64), torch.arange(n), torch.randn(n, 64), None, None, 1.0
    ).cross_entropy()
    assert abs(float(loss) - math.log(n)) < 0.05  # cosine / 1.0: logits ≈ 0


def test_accidental_hits_are_not_negatives() -> None:
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([7, 7, 9])
    masked = sampled_softmax_logits(q, ids, q.clone(), None, None, 0.05).cross_entropy()
    unmasked = sampled_softmax_logits(q, torch.arange(3), q.clone(), None, None, 0.05).cross_entropy()
    assert float(masked) < 1e-3 < float(unmasked)
    # a sampled negative that is the positive item is dropped too
    neg_ids, neg_emb = torch.tensor([7]), torch.tensor([[1.0, 0.0]])
    with_hit = sampled_softmax_logits(q, ids, q.clone(), neg_ids, neg_emb, 0.05).cross_entropy()
    assert float(with_hit) < 1e-3


def test_keys_of_the_own_sequence_are_left_out_with_groups() -> None:
    """Pairs 0 and 1 come from one row: with groups, each is scored without the other's positive."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    keys = torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.2, 0.1]])
    ids = torch.tensor([1, 2, 3])
    neg_ids, neg = torch.tensor([9]), torch.tensor([[0.3, 0.3]])
    got = sampled_softmax_logits(
        q, ids, keys, neg_ids, neg, 1.0, similarity="dot", groups=torch.tensor([0, 0, 1])
    ).cross_entropy()
    logits = q @ torch.cat([keys, neg]).T  # (3, 4): in-batch keys 0..2, then the sampled one
    cand = [[0, 3, 2], [1, 3, 2], [2, 3, 0, 1]]  # the positive first; own-row keys left out
    want = torch.stack([-torch.log_softmax(logits[i, c], 0)[0] for i, c in enumerate(cand)]).mean()
    assert float(got) == pytest.approx(float(want), abs=1e-6)
    plain = sampled_softmax_logits(q, ids, keys, neg_ids, neg, 1.0, similarity="dot").cross_entropy()
    assert float(plain) > float(got)  # the left-out keys were competitors


def test_logq_correction_matches_a_hand_computed_case() -> None:
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    pos_logq, neg_logq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25), math.log(2.0)])
    got = sampled_softmax_logits(
        q, torch.tensor([1]), pos, torch.tensor([2, 3]), neg, 1.0, pos_logq, neg_logq, similarity="dot"
    ).cross_entropy()
    logits = torch.tensor([1.0 - math.log(0.5), 0.0 - math.log(0.25), 1.0 - math.log(2.0)])
    want = -torch.log_softmax(logits, 0)[0]
    assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_sampled_softmax_with_logq_estimates_the_full_softmax() -> None:
    """Many uniform samples + log-Q ≈ the full softmax over the catalog (without log-Q it is far lower)."""
    torch.manual_seed(0)
    n_items, d = 2000, 16
    emb = torch.randn(n_items, d)
    q = torch.randn(8, d)
    pos = torch.arange(8) * 7
    full = float(full_softmax_loss(q, pos, emb, 1.0, "dot"))
    m = 20000
    neg = torch.randint(0, n_items, (m,))
    logq = torch.full((m,), math.log(m / n_items))
    sampled = float(
        sampled_softmax_logits(
            q, pos, emb[pos], neg, emb[neg], 1.0, None, logq, in_batch=False, similarity="dot"
        ).cross_entropy()
    )
    raw = float(
        sampled_softmax_logits(
            q, pos, emb[pos], neg, emb[neg], 1.0, None, None, in_batch=False, similarity="dot"
        ).cross_entropy()
    )
    assert abs(sampled - full) < 0.1 * full
    assert raw > full + 1.0  # uncorrected: 10× more copies of every negative


def test_item_catalog_probabilities_and_sampling() -> None:
    cat = ItemCatalog.from_sequences([np.array([5, 5, 5, 9]), np.array([0, 9, 5])])
    assert cat.ids.tolist() == [5, 9]
    # counts 4 and 2, +1 smoothing
    assert cat.log_prob(torch.tensor([5, 9])).exp().tolist() == pytest.approx([5 / 8, 3 / 8])
    assert float(cat.log_prob(torch.tensor([123])).exp()) == pytest.approx(3 / 8)  # unknown → the smallest
    torch.manual_seed(0)
    ids, logp = cat.sample(4000, "popularity")
    assert set(ids.tolist()) == {5, 9} and abs(float((ids == 5).float().mean()) - 5 / 8) < 0.03
    ids, logp = cat.sample(10, "uniform")
    assert torch.allclose(logp, torch.full((10,), math.log(0.5)))
    with pytest.raises(ValueError, match="unique"):
        ItemCatalog(np.array([1, 1]), np.array([1, 1]))


def test_objective_config_validation() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ObjectiveConfig(next_token=0.0)
    with pytest.raises(ValueError, match="negatives"):
        ObjectiveConfig(negatives="many")
    with pytest.raises(ValueError, match="unknown ObjectiveConfig fields"):
        ObjectiveConfig().replace(negativez=3)


def test_objectives_saved_with_the_retired_distillation_load_only_where_it_was_off() -> None:
    cfg = ObjectiveConfig(similarity="dot", negatives=32, multi_token=1.0)
    assert ObjectiveConfig.from_dict(cfg.to_dict()) == cfg
    saved = {**cfg.to_dict(), "distill": 0.0, "distill_temperature": 2.0}  # as written before the removal
    assert ObjectiveConfig.from_dict(saved) == cfg  # off: its temperature did nothing either
    with pytest.raises(ValueError, match=r"saved with distill=0\.5, a setting this version no longer has"):
        ObjectiveConfig.from_dict({**saved, "distill": 0.5})
    with pytest.raises(ValueError, match=r"unknown ObjectiveConfig fields \['teacher'\]"):
        ObjectiveConfig.from_dict({**cfg.to_dict(), "teacher": "x"})


def _batch(items: torch.Tensor) -> dict[str, torch.Tensor]:
    pad = items != 0
    return {
        "item_ids": items,
        "action_ids": pad.long() * 2,
        "surface_ids": pad.long(),
        "pad_mask": pad,
        "positive": pad.clone(),
    }


@pytest.mark.parametrize(
    "cfg",
    [
        ObjectiveConfig(negatives=32),
        ObjectiveConfig(negatives=32, multi_token=1.0, future_token=1.0, sampler="popularity"),
        ObjectiveConfig(negatives=32, multi_token=1.0, mask_own_sequence=True),
        ObjectiveConfig(negatives="full", similarity="dot"),
        ObjectiveConfig(negatives=16, in_batch_negatives=False, logq_correction=False),
    ],
)
def test_objective_learns_a_deterministic_cycle(cfg: ObjectiveConfig) -> None:
    """Items follow i → i+1 (mod 20): every enabled loss must fall well below its start."""
    torch.manual_seed(0)
    n = 20
    rows = torch.stack([(torch.arange(12) + s) % n + 1 for s in range(n)])  # (20, 12), ids 1..20
    model = PinFM(PinFMConfig(d_model=32, n_layers=1, n_heads=2, max_len=12, hash_buckets=4096))
    obj = PinFMObjective(cfg, ItemCatalog.from_sequences([rows]))
    opt = torch.optim.Adam(list(model.parameters()) + list(obj.parameters()), lr=1e-2)
    first = None
    for _ in range(60):
        loss, stats = obj(model, _batch(rows))
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first, (first, stats)
    assert stats["pairs_next"] == 20 * 11 if cfg.next_token else True


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("block_floats", [None, 3 * 40, 7 * 40])
def test_catalog_logsumexp_matches_the_plain_logsumexp(block_floats: int | None, keep: bool) -> None:
    """Blocked log-sum-exp (1, 3 or 7 queries a block, a short last block; softmax kept or
    scored again) = logsumexp(q @ e.T) and its grads."""
    torch.manual_seed(0)
    q = torch.randn(7, 5, requires_grad=True)
    e = torch.randn(40, 5, requires_grad=True)
    w = torch.rand(7)
    fast = catalog_logsumexp(q, e, block_floats, keep=keep)
    ref = torch.logsumexp(q @ e.T, dim=1)
    assert torch.allclose(fast, ref, atol=1e-5)
    g_fast = torch.autograd.grad((fast * w).sum(), (q, e))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, e))
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("keep", [True, False])
def test_bf16_catalog_logsumexp_is_close_to_the_fp32_one(keep: bool) -> None:
    """bf16 matmuls: values and gradients within bf16's rounding of the fp32 reference, dtypes fp32."""
    torch.manual_seed(0)
    q = (torch.randn(50, 16) * 0.5).requires_grad_()
    e = (torch.randn(300, 16) * 0.5).requires_grad_()
    w = torch.rand(50)
    fast = catalog_logsumexp(q, e, 7 * 300, bf16=True, keep=keep)
    ref = torch.logsumexp(q @ e.T, dim=1)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, ref, atol=0.02) and not torch.equal(fast, ref)
    g_fast = torch.autograd.grad((fast * w).sum(), (q, e))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, e))
    for a, b in zip(g_fast, g_ref, strict=True):
        assert a.dtype == torch.float32
        assert (a - b).norm() < 0.02 * b.norm(), ((a - b).norm(), b.norm())


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_shared_full_softmax_matches_the_per_pair_reference(similarity: str) -> None:
    """Scoring each distinct query once gives the per-pair full softmax's losses and gradients."""
    torch.manual_seed(0)
    queries = torch.randn(6, 8, requires_grad=True)
    emb = torch.randn(30, 8, requires_grad=True)
    sets = [
        (torch.tensor([0, 1, 2, 3, 4]), torch.tensor([3, 7, 7, 0, 29])),
        (torch.tensor([0, 0, 5, 2]), torch.tensor([4, 5, 9, 7])),
    ]
    fast = shared_full_softmax_losses(queries, sets, emb, 0.3, similarity, block_floats=4 * 30)
    g_fast = torch.autograd.grad(fast[0] + 2 * fast[1], (queries, emb))
    ref = [full_softmax_loss(queries[q], pos, emb, 0.3, similarity) for q, pos in sets]
    g_ref = torch.autograd.grad(ref[0] + 2 * ref[1], (queries, emb))
    for a, b in zip(fast, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_full_objective_equals_the_per_pair_full_softmax() -> None:
    """negatives='full' with next + multi-token losses = the reference loss of each pair set."""
    torch.manual_seed(0)
    items = torch.tensor([[3, 5, 2, 9, 0, 0], [4, 4, 1, 8, 6, 7]])  # right padded
    model = PinFM(PinFMConfig(d_model=16, n_layers=1, n_heads=2, max_len=6, hash_buckets=512, dropout=0.0))
    cfg = ObjectiveConfig(negatives="full", similarity="dot", multi_token=0.5, multi_token_window=3)
    obj = PinFMObjective(cfg, ItemCatalog.from_sequences([torch.arange(1, 12).numpy()]))
    batch = _batch(items)
    total, stats = obj(model, batch)
    hidden = model(batch["item_ids"], batch["action_ids"], batch["surface_ids"])
    all_ids = obj.catalog.ids
    all_emb = model.item_embedding(all_ids)
    expected = 0.0
    for weight, (rows, q, t) in [
        (1.0, next_token_pairs(batch["positive"])),
        (0.5, multi_token_pairs(batch["positive"], 3)),
    ]:
        pos = torch.searchsorted(all_ids, items[rows, t])
        expected = expected + weight * full_softmax_loss(hidden[rows, q], pos, all_emb, obj.temperature, "dot")
    assert torch.allclose(total, expected, atol=1e-5)
    assert stats["pairs_next"] == 3 + 5 and stats["pairs_multi"] == (3 + 2 + 1) + (5 + 4 + 3)


def test_catalog_matmul_setting_picks_bf16_where_it_is_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' follows the CPU's bf16 support; a bf16 objective's loss is close to the fp32 one."""
    import training.model.objectives as objectives

    catalog = ItemCatalog.from_sequences([torch.arange(1, 12).numpy()])
    auto = PinFMObjective(ObjectiveConfig(negatives="full", catalog_matmul="auto"), catalog)
    for native in (True, False):
        monkeypatch.setattr(objectives, "cpu_has_native_bf16", lambda native=native: native)
        assert auto._bf16_catalog(torch.device("cpu")) is native
    assert not auto._bf16_catalog(torch.device("meta"))  # only CPUs switch by themselves
    torch.manual_seed(0)
    model = PinFM(PinFMConfig(d_model=16, n_layers=1, n_heads=2, max_len=6, hash_buckets=512, dropout=0.0))
    batch = _batch(torch.tensor([[3, 5, 2, 9, 0, 0], [4, 4, 1, 8, 6, 7]]))
    losses = [
        PinFMObjective(ObjectiveConfig(negatives="full", similarity="dot", catalog_matmul=m), catalog)(model, batch)[0]
        for m in ("fp32", "bf16")
    ]
    assert torch.allclose(losses[0], losses[1], atol=0.05) and not torch.equal(losses[0], losses[1])
    with pytest.raises(ValueError, match="catalog_matmul"):
        ObjectiveConfig(catalog_matmul="fp16")


def test_sampled_softmax_all_candidates_masked_has_finite_gradients() -> None:
    """Every candidate of a row is an accidental hit: loss 0 for that row, no NaN gradient."""
    q = torch.randn(2, 4, requires_grad=True)
    pos_ids = torch.tensor([7, 7])
    pos_emb = torch.randn(2, 4, requires_grad=True)
    loss = sampled_softmax_logits(q, pos_ids, pos_emb, None, None, 0.1, in_batch=True, similarity="dot").cross_entropy()
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(q.grad).all() and torch.isfinite(pos_emb.grad).all()
