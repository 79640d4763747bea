"""TransAct / TransAct V2 pieces: time-window mask, summary, encoder, next action loss, lifelong selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.model.transact import (
    TransActEncoder,
    TransActSummary,
    gather_selected,
    next_action_loss,
    random_time_window_mask,
    select_lifelong,
)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _right_padded(lengths: list[int], L: int) -> torch.Tensor:
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)


# ------------------------------------------------------------------ time-window mask
def _ts_batch(B: int = 64, L: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _g(3)
    request_ts = torch.full((B,), 1_760_000_000, dtype=torch.int64)
    gaps = torch.randint(1, 600, (B, L), generator=g)
    ts = request_ts[:, None] - gaps.flip(1).cumsum(1).flip(1)  # oldest first, all before the request
    pad = _right_padded(torch.randint(0, L + 1, (B,), generator=g).tolist(), L)
    return ts, pad, request_ts


def test_time_window_mask_drops_only_inside_a_window_and_never_keeps_padding() -> None:
    ts, pad, req = _ts_batch()
    max_w = 3600
    keep = random_time_window_mask(ts, pad, req, max_w, p=0.7, generator=_g(0))
    assert keep.dtype == torch.bool and keep.shape == pad.shape
    assert not (keep & ~pad).any()  # padding stays False
    dropped = pad & ~keep
    assert dropped.any()
    assert (ts[dropped] >= (req[:, None] - max_w).expand_as(ts)[dropped]).all()
    assert (ts[dropped] < req[:, None].expand_as(ts)[dropped]).all()
    for b in range(ts.shape[0]):  # per row, the dropped actions are exactly the most recent ones: a window
        d = dropped[b][pad[b]]
        if d.any():
            first = int(d.nonzero()[0])
            assert d[first:].all()
    # the same generator seed repeats the draw
    again = random_time_window_mask(ts, pad, req, max_w, p=0.7, generator=_g(0))
    assert torch.equal(keep, again)


def test_time_window_mask_p_zero_and_eval_keep_everything() -> None:
    ts, pad, req = _ts_batch()
    for keep in (
        random_time_window_mask(ts, pad, req, 3600, p=0.0, generator=_g(0)),
        random_time_window_mask(ts, pad, req, 3600, p=1.0, generator=_g(0), training=False),
    ):
        assert torch.equal(keep, pad)
    # actions at or after the request time are never dropped
    late = random_time_window_mask(ts + 10**6, pad, req, 3600, p=1.0, generator=_g(1))
    assert torch.equal(late, pad)


def test_time_window_mask_p_one_masks_every_row_with_recent_actions() -> None:
    ts, pad, req = _ts_batch()
    ts = ts.clone()
    lengths = pad.sum(1)
    rows = torch.arange(ts.shape[0])[lengths > 0]
    ts[rows, lengths[rows] - 1] = req[rows] - 1  # last action one second before the request
    keep = random_time_window_mask(ts, pad, req, 3600, p=1.0, generator=_g(2))
    assert not keep[rows, lengths[rows] - 1].any()


# --------------------------------------------------------------------- summary
def test_summary_picks_most_recent_real_tokens_in_order_and_pool_ignores_padding() -> None:
    B, L, D, K = 4, 6, 3, 3
    lengths = [6, 4, 2, 0]
    pad = _right_padded(lengths, L)
    h = torch.arange(B * L * D, dtype=torch.float32).view(B, L, D) * 0.01 - 1.0  # distinct values
    h = h.masked_fill(~pad.unsqueeze(-1), 1e9)  # padded outputs: huge, must never be picked
    out = TransActSummary(D, K)(h, pad)
    assert out.shape == (B, (K + 1) * D)
    blocks = out.view(B, K + 1, D)
    for b, n in enumerate(lengths):
        for k in range(K):
            want = h[b, n - 1 - k] if k < n else torch.zeros(D)
            torch.testing.assert_close(blocks[b, k], want)
        want_pool = h[b, :n].amax(0) if n else torch.zeros(D)
        torch.testing.assert_close(blocks[b, K], want_pool)
    assert (out < 1e8).all()


def test_summary_handles_left_padding_and_k_longer_than_sequence() -> None:
    h = torch.randn(1, 3, 2)
    pad = torch.tensor([[False, True, True]])
    out = TransActSummary(2, 5)(h, pad).view(6, 2)
    torch.testing.assert_close(out[0], h[0, 2])
    torch.testing.assert_close(out[1], h[0, 1])
    assert torch.equal(out[2:5], torch.zeros(3, 2))
    torch.testing.assert_close(out[5], h[0, 1:].amax(0))


# --------------------------------------------------------------------- encoder
def test_encoder_shape_and_padding_does_not_change_output() -> None:
    torch.manual_seed(0)
    B, L, C, Di = 3, 7, 4, 8
    enc = TransActEncoder(item_dim=Di, d_model=16, n_heads=2, n_layers=2, first_k=2).eval()
    pad = _right_padded([7, 3, 0], L)
    items = torch.randn(B, L, Di)
    actions = torch.randint(1, 5, (B, L)) * pad
    cands = torch.randn(B, C, Di)
    out = enc(items, actions, pad, cands)
    assert out.shape == (B, C, 3 * 16) and enc.out_dim == 48
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], torch.zeros(C, 48))  # empty row
    # perturb the padded positions: items and action ids
    items2 = items.clone()
    items2[~pad] = torch.randn(int((~pad).sum()), Di) * 100
    actions2 = actions.clone()
    actions2[~pad] = 3
    torch.testing.assert_close(enc(items2, actions2, pad, cands), out)
    enc.train()  # the training path (no fast path) agrees too (dropout is 0)
    torch.testing.assert_close(enc(items2, actions2, pad, cands), out, rtol=1e-5, atol=1e-5)
    enc.eval()
    # candidates are independent: scoring one candidate alone gives its column of the batch
    torch.testing.assert_close(enc(items, actions, pad, cands[:, 1:2]), out[:, 1:2], rtol=1e-5, atol=1e-5)
    # early fusion: a different candidate changes the summary (the max-pool slot too)
    assert not torch.allclose(out[0, 0], out[0, 1])
    # bidirectional: changing the oldest real token changes the most recent token's output
    items3 = items.clone()
    items3[0, 0] += 1.0
    assert not torch.allclose(enc(items3, actions, pad, cands)[0, :, :16], out[0, :, :16])


def test_encoder_gradients_reach_parameters() -> None:
    torch.manual_seed(0)
    enc = TransActEncoder(item_dim=8, d_model=16, n_heads=2, n_layers=1, first_k=2)
    pad = _right_padded([5, 2], 5)
    out = enc(torch.randn(2, 5, 8), torch.randint(1, 5, (2, 5)) * pad, pad, torch.randn(2, 3, 8))
    out.square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
    assert enc.action_emb.weight.grad[0].abs().sum() == 0  # padding id gets no gradient
    assert enc.action_emb.weight.grad[1:].abs().sum() > 0


# ------------------------------------------------------------- next action loss
def test_next_action_loss_hand_computed_one_row() -> None:
    u = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[0.6, 0.8]])
    imps = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]])
    imask = torch.tensor([[True, True, False]])
    t = 0.5
    logits = [0.6 / t, 0.0 / t, 1.0 / t]  # the masked impression is left out
    want = -(logits[0] - math.log(sum(math.exp(z) for z in logits)))
    got = next_action_loss(u, pos, imps, imask, temperature=t)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # unnormalised vectors: same value with normalize=True, different without
    got_scaled = next_action_loss(3 * u, 2 * pos, 5 * imps, imask, temperature=t)
    assert got_scaled.item() == pytest.approx(want, rel=1e-6)
    raw = next_action_loss(3 * u, pos, imps, imask, temperature=t, normalize=False)
    logits_raw = [1.8 / t, 0.0, 3.0 / t]
    assert raw.item() == pytest.approx(-(logits_raw[0] - math.log(sum(math.exp(z) for z in logits_raw))), rel=1e-6)


def test_next_action_loss_lower_when_positive_is_aligned_and_valid_mask() -> None:
    g = _g(5)
    B, N, D = 8, 6, 16
    u = torch.randn(B, D, generator=g)
    imps = torch.randn(B, N, D, generator=g)
    imask = torch.ones(B, N, dtype=torch.bool)
    aligned = next_action_loss(u, u + 0.05 * torch.randn(B, D, generator=g), imps, imask, 0.1)
    opposite = next_action_loss(u, -u, imps, imask, 0.1)
    assert aligned < opposite
    valid = torch.tensor([True, False] * 4)
    per_row = torch.stack(
        [next_action_loss(u[i : i + 1], -u[i : i + 1], imps[i : i + 1], imask[i : i + 1]) for i in range(B)]
    )
    torch.testing.assert_close(next_action_loss(u, -u, imps, imask, valid=valid), per_row[valid].mean())
    none = next_action_loss(u.requires_grad_(), -u, imps, imask, valid=torch.zeros(B, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(u.grad, torch.zeros(B, D))
    # a row with every impression masked has loss 0 (only the positive is left)
    assert next_action_loss(u[:1], u[:1], imps[:1], torch.zeros(1, N, dtype=torch.bool)).item() == pytest.approx(0.0)


# ------------------------------------------------------------- lifelong selection
def test_select_lifelong_keeps_recent_and_picks_most_similar() -> None:
    L, Cd = 10, 4
    ids = torch.arange(1, L + 1)[None, :]  # (1, L)
    pad = torch.ones(1, L, dtype=torch.bool)
    content = torch.zeros(1, L, Cd)
    content[0, :, 3] = 1.0  # default direction: dissimilar to both candidates
    content[0, 2] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # most similar to candidate 0
    content[0, 5] = torch.tensor([0.9, 0.1, 0.0, 0.0])  # second for candidate 0
    content[0, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # most similar to candidate 1
    content[0, 4] = torch.tensor([0.1, 0.9, 0.2, 0.0])  # second for candidate 1
    content[0, 9] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # most recent: similar to both, but kept as recent anyway
    cands = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])  # (1, 2, Cd)
    idx, mask = select_lifelong(ids, content, pad, cands, top_k=2, recent_r=2)
    assert idx.shape == (1, 2, 4) and mask.all()
    assert idx[0, 0].tolist() == [2, 5, 8, 9]  # chronological
    assert idx[0, 1].tolist() == [1, 4, 8, 9]
    sel = gather_selected(content, idx)  # (1, 2, 4, Cd)
    assert sel.shape == (1, 2, 4, Cd)
    torch.testing.assert_close(sel[0, 0, 0], content[0, 2])
    assert torch.equal(gather_selected(ids, idx)[0, 1], torch.tensor([2, 5, 9, 10]))


def test_select_lifelong_handles_short_and_padded_rows() -> None:
    g = _g(7)
    B, L, Cd, C = 4, 8, 5, 3
    lengths = [8, 4, 1, 0]
    pad = _right_padded(lengths, L)
    ids = torch.randint(1, 100, (B, L), generator=g) * pad
    content = torch.randn(B, L, Cd, generator=g)
    cands = torch.randn(B, C, Cd, generator=g)
    K, r = 3, 2
    idx, mask = select_lifelong(ids, content, pad, cands, top_k=K, recent_r=r)
    assert idx.shape == mask.shape == (B, C, K + r)
    for b, n in enumerate(lengths):
        assert (mask[b].sum(-1) == min(n, K + r)).all()
        for c in range(C):
            picked = idx[b, c][mask[b, c]].tolist()
            assert picked == sorted(picked) and len(set(picked)) == len(picked)  # chronological, no duplicates
            assert all(p < n for p in picked)  # only real actions
            assert set(range(max(0, n - r), n)) <= set(picked)  # the r most recent always
            assert (idx[b, c][~mask[b, c]] == 0).all()
            assert not mask[b, c, len(picked) :].any()  # empty slots last
    # row 0 (8 real): the K similarity picks are the top-K by cosine among the non-recent
    sim = F.cosine_similarity(cands[0][:, None, :], content[0][None, :, :], dim=-1)  # (C, L)
    for c in range(C):
        best = sim[c, : L - r].topk(K).indices.tolist()
        assert set(idx[0, c].tolist()) == set(best) | {L - 2, L - 1}
    # an id-0 action inside pad_mask is not real
    pad2 = torch.ones(1, 4, dtype=torch.bool)
    idx2, mask2 = select_lifelong(
        torch.tensor([[5, 0, 6, 7]]), torch.randn(1, 4, Cd), pad2, torch.randn(1, 1, Cd), top_k=3, recent_r=1
    )
    assert idx2[0, 0][mask2[0, 0]].tolist() == [0, 2, 3]
    # zero-sized choices
    idx3, mask3 = select_lifelong(ids, content, pad, cands, top_k=0, recent_r=0)
    assert idx3.shape == (B, C, 0) and mask3.shape == (B, C, 0)
