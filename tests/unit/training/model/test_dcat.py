"""DCAT (training/model/dcat.py): context pass == forward, crossing pass == one forward per candidate."""

from __future__ import annotations

import pytest
import torch

from features.contract import ACTION_IDS, CONTENT_DIM, SURFACE_IDS
from training.model.backbone import BLOCK_LAYOUTS, PinFM, PinFMConfig
from training.model.dcat import (
    candidate_tokens,
    context_pass,
    crossing_pass,
    dcat_scores,
    naive_candidate_hidden,
)

CFG = PinFMConfig(d_model=32, n_layers=2, n_heads=4, max_len=16, hash_buckets=1024)
LENGTHS = [1, CFG.max_len - 1, 7, 0, 4]  # ragged, incl. an empty history and the longest that fits
N_CANDS = [6, 3, 1, 2, 5]  # real candidates per row (C = 6)


def _model(seed: int = 0, cfg: PinFMConfig = CFG) -> PinFM:
    torch.manual_seed(seed)
    model = PinFM(cfg)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and biases too
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch(lengths: list[int], n_cands: list[int], L: int, C: int, seed: int = 0) -> dict:
    """Right-padded sequences with content on some tokens and time gaps, plus ragged candidate groups."""
    g = torch.Generator().manual_seed(seed)
    U = len(lengths)
    pad_mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (U, L)
    content = torch.randn(U, L, CONTENT_DIM, generator=g) * (torch.rand(U, L, 1, generator=g) < 0.6)
    cand_mask = torch.arange(C)[None, :] < torch.tensor(n_cands)[:, None]  # (U, C)
    cand_content = torch.randn(U, C, CONTENT_DIM, generator=g) * (torch.rand(U, C, 1, generator=g) < 0.6)
    return {
        "item_ids": torch.randint(1, 10**12, (U, L), generator=g) * pad_mask,
        "action_ids": torch.randint(1, len(ACTION_IDS) + 1, (U, L), generator=g) * pad_mask,
        "surface_ids": torch.randint(1, len(SURFACE_IDS) + 1, (U, L), generator=g) * pad_mask,
        "content": content * pad_mask[..., None],
        "pad_mask": pad_mask,
        "time_gaps": torch.randint(0, CFG.time_gap_buckets, (U, L), generator=g) * pad_mask,
        "cand_ids": torch.randint(1, 10**12, (U, C), generator=g) * cand_mask,
        "cand_surface_ids": torch.randint(1, len(SURFACE_IDS) + 1, (U, C), generator=g) * cand_mask,
        "cand_content": cand_content * cand_mask[..., None],
        "cand_mask": cand_mask,
    }


SEQ_KEYS = ("item_ids", "action_ids", "surface_ids", "content", "pad_mask", "time_gaps")


@pytest.mark.parametrize("layout", BLOCK_LAYOUTS)
def test_context_pass_equals_forward(layout: str) -> None:
    model = _model(cfg=CFG.replace(block_layout=layout))
    b = _batch(LENGTHS, N_CANDS, L=CFG.max_len, C=6)
    seq = {k: b[k] for k in SEQ_KEYS}
    with torch.no_grad():
        hidden, cache = context_pass(model, **seq)
        want = model(**seq)
        hidden_nomask, cache_nomask = context_pass(model, *(b[k] for k in SEQ_KEYS[:3]))
        want_nomask = model(*(b[k] for k in SEQ_KEYS[:3]))
    assert torch.equal(hidden, want)
    assert torch.equal(hidden_nomask, want_nomask)
    U, L, H = len(LENGTHS), CFG.max_len, CFG.n_heads
    assert len(cache.layers) == CFG.n_layers
    assert all(k.shape == v.shape == (U, H, L, CFG.d_model // H) for k, v in cache.layers)
    assert cache.lengths.tolist() == LENGTHS and torch.equal(cache.pad_mask, b["pad_mask"])
    assert cache_nomask.pad_mask is None and cache_nomask.lengths.tolist() == [L] * U


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scale_item_input"])
@pytest.mark.parametrize("layout", BLOCK_LAYOUTS)
@pytest.mark.parametrize("with_content", [True, False])
def test_dcat_equals_naive_ragged(with_content: bool, layout: str, scaled: bool) -> None:
    model = _model(1, cfg=CFG.replace(block_layout=layout, scale_item_input=scaled))
    b = _batch(LENGTHS, N_CANDS, L=CFG.max_len, C=6, seed=1)
    if not with_content:
        b["content"] = b["cand_content"] = None
    with torch.no_grad():
        got = dcat_scores(model, **b)
        want = naive_candidate_hidden(model, **b, chunk=7)  # several chunks
    assert got.shape == (len(LENGTHS), 6, CFG.d_model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got[~b["cand_mask"]].abs().max() == 0  # padding candidates are zeros
    assert got[b["cand_mask"]].abs().min() > 0


def test_dcat_equals_naive_without_padding_and_with_one_side_content() -> None:
    model = _model(2)
    b = _batch([CFG.max_len - 1] * 3, [4] * 3, L=CFG.max_len - 1, C=4, seed=2)
    b["pad_mask"] = b["cand_mask"] = b["time_gaps"] = None
    with torch.no_grad():
        for content, cand_content in ((b["content"], None), (None, b["cand_content"])):
            args = {**b, "content": content, "cand_content": cand_content}
            torch.testing.assert_close(
                dcat_scores(model, **args), naive_candidate_hidden(model, **args), atol=1e-5, rtol=0
            )


def test_the_passes_compose_and_a_candidate_ignores_its_neighbours() -> None:
    model = _model(3)
    b = _batch(LENGTHS, [6] * len(LENGTHS), L=CFG.max_len, C=6, seed=3)
    with torch.no_grad():
        _, cache = context_pass(model, **{k: b[k] for k in SEQ_KEYS})
        tokens = candidate_tokens(model, b["cand_ids"], b["cand_surface_ids"], cache.lengths, b["cand_content"])
        out = crossing_pass(model, cache, tokens)
        torch.testing.assert_close(out, dcat_scores(model, **b), atol=0, rtol=0)
        other = dict(b)
        other["cand_ids"] = b["cand_ids"].clone()
        other["cand_ids"][:, 1:] += 12345  # every candidate but the first changes
        other["cand_surface_ids"] = b["cand_surface_ids"].clone()
        other["cand_surface_ids"][:, 1:] = b["cand_surface_ids"][:, 1:] % len(SURFACE_IDS) + 1
        other["cand_content"] = torch.cat([b["cand_content"][:, :1], -b["cand_content"][:, 1:]], dim=1)
        moved = dcat_scores(model, **other)
    torch.testing.assert_close(moved[:, 0], out[:, 0], atol=1e-6, rtol=0)
    assert (moved[:, 1:] - out[:, 1:]).abs().amax() > 1e-3  # the others did change


def test_too_long_sequences_and_bad_shapes_are_refused() -> None:
    model = _model()
    b = _batch([CFG.max_len, 3], [2, 2], L=CFG.max_len, C=2)
    for fn in (dcat_scores, naive_candidate_hidden):
        with pytest.raises(ValueError, match="max_len"):
            fn(model, **b)
    full = {**b, "pad_mask": None}  # no padding: every row has max_len real tokens
    with pytest.raises(ValueError, match="max_len"):
        dcat_scores(model, **full)
    with pytest.raises(ValueError, match="max_len"):
        candidate_tokens(model, b["cand_ids"], b["cand_surface_ids"], torch.tensor([CFG.max_len, 0]))
    ok = _batch([3, 2], [2, 2], L=4, C=2)
    for fn in (dcat_scores, naive_candidate_hidden):
        with pytest.raises(ValueError, match="one row per user"):
            fn(model, **{**ok, "cand_ids": ok["cand_ids"][:1], "cand_surface_ids": ok["cand_surface_ids"][:1]})
        with pytest.raises(ValueError, match="cand_surface_ids"):
            fn(model, **{**ok, "cand_surface_ids": ok["cand_surface_ids"][:, :1]})
        with pytest.raises(ValueError, match="cand_mask"):
            fn(model, **{**ok, "cand_mask": ok["cand_mask"][:, :1]})
    with pytest.raises(ValueError, match="right-padded"):
        naive_candidate_hidden(model, **{**ok, "pad_mask": ok["pad_mask"].flip(1)})


def test_gradients_flow_through_the_crossing_pass() -> None:
    b = _batch(LENGTHS, N_CANDS, L=CFG.max_len, C=6, seed=4)
    # train mode with dropout: finite, non-zero gradients into blocks, embeddings and (via the cache) the context
    model = _model(4, PinFMConfig(**{**CFG.to_dict(), "dropout": 0.1})).train()
    _, cache = context_pass(model, **{k: b[k] for k in SEQ_KEYS})
    tokens = candidate_tokens(model, b["cand_ids"], b["cand_surface_ids"], cache.lengths, b["cand_content"])
    out = crossing_pass(model, cache, tokens, b["cand_mask"])
    k0 = cache.layers[0][0]
    k0.retain_grad()
    (out * torch.randn_like(out)).sum().backward()
    assert k0.grad is not None and k0.grad.abs().sum() > 0  # the cache is part of the graph
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.0.weight", "ln_f.weight", "items.tables.0.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert model.action_emb.weight.grad.abs().sum() > 0  # only the context has actions

    # without dropout, train-mode gradients equal those of the naive path
    grads = []
    for fn in (dcat_scores, naive_candidate_hidden):
        model = _model(5).train()
        weights = torch.randn(len(LENGTHS), 6, CFG.d_model, generator=torch.Generator().manual_seed(0))
        (fn(model, **b) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_crossing_attention_equals_the_plain_reference() -> None:
    """The CPU flash-attention path (log-sum-exp merge of the candidate's own key) = one plain softmax."""
    model = _model(4)
    b = _batch(LENGTHS, N_CANDS, L=CFG.max_len, C=6, seed=4)  # ragged, incl. a user with no history
    with torch.no_grad():
        _, cache = context_pass(model, **{k: b[k] for k in SEQ_KEYS})
        tokens = candidate_tokens(model, b["cand_ids"], b["cand_surface_ids"], cache.lengths, b["cand_content"])
        fused = crossing_pass(model, cache, tokens, b["cand_mask"], fused=True)
        plain = crossing_pass(model, cache, tokens, b["cand_mask"], fused=False)
        auto = crossing_pass(model, cache, tokens, b["cand_mask"])  # no gradients on CPU: the fused path
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    assert torch.equal(auto, fused)
    model.train()  # attention dropout: only the reference path has it
    noisy = PinFM(PinFMConfig(**{**CFG.to_dict(), "dropout": 0.5})).train()
    with torch.no_grad(), pytest.raises(ValueError, match="no dropout"):
        crossing_pass(noisy, cache, tokens, b["cand_mask"], fused=True)
