"""Backbone and hashing unit tests (tiny configs, no data files)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from features.contract import ACTION_IDS, SURFACE_IDS
from training.model.backbone import (
    BLOCK_LAYOUTS,
    Block,
    HashedItemEmbedding,
    PinFM,
    PinFMConfig,
    bucketize_time_gaps,
    hash_item_ids,
    last_hidden,
)

REPO = Path(__file__).resolve().parents[4]
IDS = [1, 2, 3, 12345, 10_000_000_000, 2**62 + 17, 987654321987]


def _tokens(B: int, L: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 10**12, (B, L), generator=g)
    actions = torch.randint(1, len(ACTION_IDS) + 1, (B, L), generator=g)
    surfaces = torch.randint(1, len(SURFACE_IDS) + 1, (B, L), generator=g)
    return items, actions, surfaces


def test_hash_is_deterministic_in_a_fresh_process() -> None:
    here = [hash_item_ids(torch.tensor(IDS), t, 1024).tolist() for t in range(2)]
    code = (
        "import torch; from training.model.backbone import hash_item_ids; "
        f"print([hash_item_ids(torch.tensor({IDS}), t, 1024).tolist() for t in range(2)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "7"}
    )
    assert out.stdout.strip() == str(here)
    assert here == [hash_item_ids(torch.tensor(IDS), t, 1024).tolist() for t in range(2)]


def test_hash_tables_differ_and_stay_in_range() -> None:
    ids = torch.arange(1, 5001, dtype=torch.int64) * 7919
    h0, h1 = hash_item_ids(ids, 0, 1000), hash_item_ids(ids, 1, 1000)
    assert (h0 >= 0).all() and (h0 < 1000).all() and (h1 >= 0).all() and (h1 < 1000).all()
    assert (h0 != h1).float().mean() > 0.9  # independent functions
    assert len(torch.unique(h0)) > 900  # spreads over the buckets
    # two ids colliding in table 0 almost never collide in table 1 too: pairs stay distinguishable
    pairs = torch.unique(h0 * 1000 + h1)
    assert len(pairs) > 4900


def test_item_embedding_padding_and_content() -> None:
    cfg = PinFMConfig.preset("tiny")
    emb = HashedItemEmbedding(cfg)
    ids = torch.tensor([[0, 5, 6]])
    out = emb(ids)  # (1, 3, D)
    assert out.shape == (1, 3, cfg.d_model)
    assert torch.all(out[0, 0] == 0) and out[0, 1].abs().sum() > 0
    content = torch.zeros(1, 3, cfg.content_dim)
    content[0, 2, 0] = 1.0
    with_c = emb(ids, content)
    assert torch.allclose(with_c[0, 1], out[0, 1])  # no content → unchanged
    assert not torch.allclose(with_c[0, 2], out[0, 2])  # content added
    assert torch.all(with_c[0, 0] == 0)
    with pytest.raises(ValueError, match="content has dim"):
        emb(ids, torch.zeros(1, 3, cfg.content_dim + 1))


@pytest.mark.parametrize("layout", BLOCK_LAYOUTS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_backbone_is_causal(use_mask: bool, layout: str) -> None:
    torch.manual_seed(0)
    cfg = PinFMConfig.preset("tiny").replace(block_layout=layout)
    model = PinFM(cfg).eval()
    items, actions, surfaces = _tokens(2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool) if use_mask else None
    t = 5
    items2, actions2, surfaces2 = items.clone(), actions.clone(), surfaces.clone()
    items2[:, t + 1 :] += 1
    actions2[:, t + 1 :] = actions2[:, t + 1 :] % len(ACTION_IDS) + 1
    with torch.no_grad():
        a = model(items, actions, surfaces, None, mask)
        b = model(items2, actions2, surfaces2, None, mask)
    assert a.shape == (2, 12, cfg.d_model)
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-4)


def test_padding_left_or_right_gives_the_same_last_state() -> None:
    torch.manual_seed(0)
    model = PinFM(PinFMConfig.preset("tiny")).eval()
    items, actions, surfaces = _tokens(1, 6)
    pad = torch.zeros(1, 3, dtype=torch.int64)
    right = [torch.cat([x, pad], 1) for x in (items, actions, surfaces)]
    left = [torch.cat([pad, x], 1) for x in (items, actions, surfaces)]
    rmask = torch.tensor([[True] * 6 + [False] * 3])
    lmask = torch.tensor([[False] * 3 + [True] * 6])
    with torch.no_grad():
        r = last_hidden(model(*right, None, rmask), rmask)
        l_ = model(*left, None, lmask)[:, -1]
        plain = model(items, actions, surfaces)[:, -1]
    assert torch.allclose(r, plain, atol=1e-5)
    assert torch.allclose(l_, plain, atol=1e-5)


def test_item_dropout_leaves_whole_items_out_in_training_only() -> None:
    torch.manual_seed(0)
    cfg = PinFMConfig.preset("tiny").replace(dropout=0.0, item_dropout=1.0)
    model = PinFM(cfg)
    items, actions, surfaces = _tokens(2, 8)
    other = items + 1  # every item different, same actions, surfaces and positions
    model.train()
    assert torch.allclose(model(items, actions, surfaces), model(other, actions, surfaces))  # no item seen
    model.eval()
    assert not torch.allclose(model(items, actions, surfaces), model(other, actions, surfaces), atol=1e-4)
    model.cfg = cfg.replace(item_dropout=0.5)
    model.train()
    torch.manual_seed(1)
    a = model(items, actions, surfaces)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(items, actions, surfaces), atol=1e-4)  # a different half left out


def test_mlp_ratio_sets_the_block_mlp_width_and_rejects_zero() -> None:
    cfg = PinFMConfig.preset("tiny").replace(mlp_ratio=1)
    model = PinFM(cfg)
    hidden = model.blocks[0].mlp[0]
    assert (hidden.in_features, hidden.out_features) == (cfg.d_model, cfg.d_model)
    items, actions, surfaces = _tokens(2, 8)
    assert model(items, actions, surfaces).shape == (2, 8, cfg.d_model)
    with pytest.raises(ValueError, match="mlp_ratio"):
        cfg.replace(mlp_ratio=0)


def test_sasrec_block_layout_matches_its_hand_written_form() -> None:
    torch.manual_seed(0)
    cfg = PinFMConfig(d_model=16, n_heads=2, mlp_ratio=1, block_layout="sasrec")
    block = Block(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))  # LayerNorm affine and biases away from 1 / 0
    x = torch.randn(3, 7, 16)
    D, H = 16, 2
    h = block.ln1(x)
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    q = h @ w[:D].T + b[:D]  # queries from the normalised input
    k = x @ w[D : 2 * D].T + b[D : 2 * D]  # keys and values from the un-normalised one
    v = x @ w[2 * D :].T + b[2 * D :]
    heads = [t.view(3, 7, H, D // H).transpose(1, 2) for t in (q, k, v)]
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    att = (heads[0] @ heads[1].transpose(-1, -2) / (D // H) ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    y = block.attn.proj((att @ heads[2]).transpose(1, 2).reshape(3, 7, D))
    g = block.ln2(h + y)  # the residual restarts from the normalised input
    lin1, lin2 = block.mlp[0], block.mlp[3]
    want = g + lin2(torch.relu(lin1(g)))
    with torch.no_grad():
        torch.testing.assert_close(block(x, None), want, atol=1e-5, rtol=0)
    assert isinstance(block.mlp[2], torch.nn.Dropout)  # dropout on the hidden layer too
    assert [type(m).__name__ for m in Block(PinFMConfig(d_model=16, n_heads=2)).mlp] == [
        "Linear", "GELU", "Linear", "Dropout",
    ]  # the pre-LN layout keeps the module indices of saved runs  # fmt: skip
    with pytest.raises(ValueError, match="block_layout"):
        PinFMConfig(block_layout="post_ln")


def test_backbone_rejects_too_long_sequences() -> None:
    cfg = PinFMConfig.preset("tiny")
    model = PinFM(cfg)
    items, actions, surfaces = _tokens(1, cfg.max_len + 1)
    with pytest.raises(ValueError, match="max_len"):
        model(items, actions, surfaces)


def test_config_validation_and_presets() -> None:
    assert PinFMConfig.preset("small").d_model == 64
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        PinFMConfig.preset("huge")
    with pytest.raises(ValueError, match="n_heads"):
        PinFMConfig(d_model=30, n_heads=4)
    cfg = PinFMConfig.preset("tiny")
    assert PinFMConfig.from_dict(cfg.to_dict()) == cfg


def test_time_gap_buckets_and_causality_with_gaps() -> None:
    ts = torch.tensor([[100, 100, 101, 104, 1100, 0]])
    pad = torch.tensor([[True, True, True, True, True, False]])
    b = bucketize_time_gaps(ts, 24, pad)
    # gaps 0, 1, 3, 996 s → buckets 1 + floor(log2(gap + 1)); the first event and padding are 0
    assert b.tolist() == [[0, 1, 2, 3, 10, 0]]
    assert bucketize_time_gaps(torch.tensor([[0, 10**9]]), 8).tolist() == [[0, 7]]  # capped
    torch.manual_seed(0)
    model = PinFM(PinFMConfig.preset("tiny")).eval()
    items, actions, surfaces = _tokens(1, 6)
    gaps2 = b.clone()
    gaps2[:, 4:] = 5
    with torch.no_grad():
        h1 = model(items, actions, surfaces, time_gaps=b)
        h2 = model(items, actions, surfaces, time_gaps=gaps2)
        h0 = model(items, actions, surfaces)
    assert torch.allclose(h1[:, :4], h2[:, :4], atol=1e-6)
    assert not torch.allclose(h1[:, 4], h2[:, 4], atol=1e-4)
    assert not torch.allclose(h0[:, 1], h1[:, 1], atol=1e-4)  # gaps change the state
