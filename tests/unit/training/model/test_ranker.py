"""Ranker: the sequence modes, DCAT = naive for the whole ranker, the hybrid's user embedding, the folded
head, new-item techniques, configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.contract import SURFACE_IDS
from serving.model import ServingModel
from training.data import ContentTable, ItemCreatedAt, RankingData, SequenceArrays, encode_sequences
from training.jobs.finetune import ItemFacts, batch_tensors, evaluate, late_sequences, new_item_mask, predict
from training.model.backbone import PinFMConfig
from training.model.inputs import history_len
from training.model.ranker import (
    EARLY_FUSION_MODES,
    FOLD_MIN_CANDIDATES,
    SEQUENCE_MODES,
    USER_EMBEDDING_MODES,
    NewItemConfig,
    Ranker,
    RankerConfig,
)
from training.model.ranker_objective import next_action_term, ranker_logits
from training.model.transact import select_lifelong

BACKBONE = PinFMConfig(d_model=32, n_layers=2, n_heads=4, max_len=12, hash_buckets=1 << 16)


def _ranker(mode: str, **kw) -> Ranker:
    torch.manual_seed(0)
    return Ranker(RankerConfig(backbone=BACKBONE, sequence=mode, new_items=NewItemConfig.off(), **kw))


def _inputs(U: int = 3, L: int = 6, C: int = 4, content: bool = True) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 1, 3])[:U]
    pad = torch.arange(L)[None, :] < lengths[:, None]  # (U, L) right padded
    seq = {
        "item_ids": torch.randint(1, 500, (U, L), generator=g) * pad,
        "action_ids": torch.randint(1, 5, (U, L), generator=g) * pad,
        "surface_ids": torch.randint(1, 3, (U, L), generator=g) * pad,
        "pad_mask": pad,
        "content": torch.randn(U, L, BACKBONE.content_dim, generator=g) * pad[..., None] if content else None,
    }
    cand_mask = torch.ones(U, C, dtype=torch.bool)
    cand_mask[1, 2:] = False  # a request with 2 candidates in a grid of 4
    cands = {
        "cand_ids": torch.randint(1, 500, (U, C), generator=g) * cand_mask,
        "cand_surface_ids": torch.randint(1, 3, (U, C), generator=g),
        "cand_content": torch.randn(U, C, BACKBONE.content_dim, generator=g) if content else None,
        "cand_mask": cand_mask,
    }
    return seq, cands


@pytest.mark.parametrize("mode", SEQUENCE_MODES)
def test_every_mode_scores_and_trains(mode: str) -> None:
    ranker = _ranker(mode)
    seq, cands = _inputs()
    logits = ranker(seq, **cands)
    assert logits.shape == (3, 4, len(ranker.actions))
    assert torch.equal(logits[1, 2:], torch.zeros_like(logits[1, 2:]))  # padding slots
    logits.sum().backward()
    assert all(p.grad is not None for p in ranker.interaction.parameters())
    blocks_grad = sum(float(p.grad.abs().sum()) for p in ranker.backbone.blocks.parameters() if p.grad is not None)
    assert (blocks_grad > 0) == (mode in ("pinfm_late", "pinfm_early", "hybrid"))


@pytest.mark.parametrize("mode", EARLY_FUSION_MODES)
def test_whole_ranker_dcat_equals_naive(mode: str) -> None:
    """Early fusion by DCAT and by one full backbone pass per candidate: same scores, same weights."""
    ranker = _ranker(mode).eval()
    seq, cands = _inputs()
    with torch.no_grad():
        fast = ranker(seq, **cands)
        slow = ranker(seq, **cands, naive=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def _randomize_norms(ranker: Ranker) -> Ranker:
    """LayerNorm affines away from (1, 0), so that a folding that forgot one would show."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in ranker.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return ranker


@pytest.mark.parametrize("mode", ["hybrid", "pinfm_early", "pinfm_late"])
def test_the_folded_head_scores_as_the_modules_do(mode: str) -> None:
    """The inference head with the per-request work folded (FoldedHead) = the plain MaskNet → DCNv2 → heads."""
    ranker = _randomize_norms(_ranker(mode)).eval()
    seq, _ = _inputs()
    U, C = 3, FOLD_MIN_CANDIDATES + 3
    g = torch.Generator().manual_seed(2)
    cand_mask = torch.ones(U, C, dtype=torch.bool)
    cand_mask[1, 5:] = False
    cands = {
        "cand_ids": torch.randint(1, 500, (U, C), generator=g) * cand_mask,
        "cand_surface_ids": torch.randint(1, 3, (U, C), generator=g),
        "cand_content": torch.randn(U, C, BACKBONE.content_dim, generator=g),
        "cand_mask": cand_mask,
    }
    user = torch.randn(U, BACKBONE.d_model, generator=g)
    kw = {"user_emb": user} if mode in USER_EMBEDDING_MODES else {}
    with torch.no_grad():
        folded = ranker(seq, **cands, **kw, fold=True)
        plain = ranker(seq, **cands, **kw, fold=False)
        auto = ranker(seq, **cands, **kw)  # enough candidates per request: folded by default at inference
        naive = ranker(seq, **cands, **kw, fold=False, naive=mode != "pinfm_late")
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(auto, folded, atol=0, rtol=0)
    torch.testing.assert_close(folded, naive, atol=1e-5, rtol=0)  # DCAT + folded head = the naive reference
    assert (folded[~cand_mask] == 0).all()
    if mode == "pinfm_late":  # the precomputed-user-vector path folds too
        split = ranker.score_from_user_embedding(user, cands["cand_ids"], cands["cand_content"],
                                                 cands["cand_surface_ids"])  # fmt: skip
        torch.testing.assert_close(split[cand_mask], folded[cand_mask], atol=1e-5, rtol=0)
    # new weights (a reload, an optimiser step): the folded weights are rebuilt, never stale
    with torch.no_grad():
        ranker.in_norm.weight.mul_(1.5)
        ranker.interaction.masknet.blocks[0].aggregate.bias.add_(0.1)
        refolded = ranker(seq, **cands, **kw, fold=True)
        torch.testing.assert_close(refolded, ranker(seq, **cands, **kw, fold=False), atol=1e-5, rtol=0)
    assert (refolded - folded).abs().max() > 1e-4
    # in training (gradients) the modules run
    ranker.train()
    ranker(seq, **cands, **kw).sum().backward()
    assert all(p.grad is not None for p in ranker.interaction.parameters())
    with pytest.raises(ValueError, match="cannot be folded"):
        _ranker("none").eval()(seq, **cands, fold=True)


@pytest.mark.parametrize("hybrid_user", ["fused", "stored"])
def test_hybrid_scores_read_the_stored_user_embedding(hybrid_user: str) -> None:
    """The default ranker fuses the published user embedding with DCAT over the realtime sequence."""
    assert RankerConfig().sequence == "hybrid" and RankerConfig().hybrid_user == "fused"
    ranker = _ranker("hybrid", hybrid_user=hybrid_user).eval()
    seq, cands = _inputs()
    U, D = 3, BACKBONE.d_model
    with torch.no_grad():
        zeros = ranker(seq, **cands, user_emb=torch.zeros(U, D))
        ones = ranker(seq, **cands, user_emb=torch.ones(U, D))
        broadcast = ranker(seq, **cands, user_emb=torch.ones(1, D))
        # without a stored embedding: the one the model would compute, from the same context pass
        own = ranker.user_embedding(seq["item_ids"], seq["action_ids"], seq["surface_ids"], seq["content"],
                                    seq["pad_mask"])  # fmt: skip
        fallback, user = ranker(seq, **cands, return_user=True)
        stored = ranker(seq, **cands, user_emb=own)
        from_history = ranker(seq, **cands, late_seq={**seq, "index": torch.arange(U)})
    real = cands["cand_mask"]
    assert (zeros - ones)[real].abs().min() > 1e-4  # every candidate's score moves with the embedding
    torch.testing.assert_close(broadcast, ones, atol=0, rtol=0)
    if hybrid_user == "fused":  # the late features' user vector: the embedding and the realtime summary, fused
        assert ranker.user_fuse is not None
        torch.testing.assert_close(user, ranker.user_fuse(torch.cat([own, own], dim=-1)), atol=1e-6, rtol=0)
        torch.testing.assert_close(user, own, atol=1e-5, rtol=0)  # it starts as their mean
    else:
        assert ranker.user_fuse is None
        torch.testing.assert_close(user, own, atol=1e-6, rtol=0)
    torch.testing.assert_close(fallback, stored, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_history, stored, atol=1e-5, rtol=0)
    # the realtime sequence still matters with the embedding fixed
    other = {**seq, "item_ids": seq["item_ids"].roll(1, dims=1) * seq["pad_mask"]}
    with torch.no_grad():
        moved = ranker(other, **cands, user_emb=torch.ones(U, D))
    assert (moved - ones)[0].abs().max() > 1e-4
    with pytest.raises(ValueError, match="user_emb must be"):
        ranker(seq, **cands, user_emb=torch.ones(2, D))


def test_hybrid_trains_the_backbone_through_the_published_history() -> None:
    """In fine-tuning the user vector comes from ``late_seq`` (one pass per unique history), with gradients."""
    ranker = _ranker("hybrid")
    seq, cands = _inputs()
    late = {k: v[:2] if v is not None else None for k, v in seq.items()}  # 2 histories for 3 requests
    late["index"] = torch.tensor([0, 1, 0])
    logits, user = ranker(seq, **cands, late_seq=late, return_user=True)
    batch = ranker.user_embedding(late["item_ids"], late["action_ids"], late["surface_ids"], late["content"],
                                  late["pad_mask"])[[0, 1, 0]]  # fmt: skip
    realtime = ranker.user_embedding(seq["item_ids"], seq["action_ids"], seq["surface_ids"], seq["content"],
                                     seq["pad_mask"])  # fmt: skip
    assert ranker.user_fuse is not None
    torch.testing.assert_close(user, ranker.user_fuse(torch.cat([batch, realtime], dim=-1)), atol=1e-6, rtol=0)
    logits.sum().backward()
    assert ranker.backbone.ln_f.weight.grad is not None and ranker.backbone.ln_f.weight.grad.abs().sum() > 0
    assert ranker.user_fuse.weight.grad is not None and ranker.user_fuse.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="user vectors for 3 candidate rows"):
        ranker(seq, **cands, late_seq={**late, "index": torch.tensor([0, 1])})


@pytest.mark.parametrize("mode", ["pinfm_early", "transact", "pinfm_late", "hybrid"])
def test_a_candidate_score_ignores_the_other_candidates(mode: str) -> None:
    ranker = _ranker(mode).eval()
    seq, cands = _inputs()
    with torch.no_grad():
        before = ranker(seq, **cands)
        other = {**cands, "cand_ids": cands["cand_ids"].clone()}
        other["cand_ids"][0, 1] = 999
        after = ranker(seq, **other)
    torch.testing.assert_close(before[0, [0, 2, 3]], after[0, [0, 2, 3]], atol=1e-6, rtol=0)
    assert not torch.allclose(before[0, 1], after[0, 1])


def test_late_fusion_scores_from_a_precomputed_user_vector() -> None:
    ranker = _ranker("pinfm_late").eval()
    seq, cands = _inputs()
    with torch.no_grad():
        direct = ranker(seq, **cands)
        user = ranker.user_embedding(seq["item_ids"], seq["action_ids"], seq["surface_ids"], seq["content"],
                                     seq["pad_mask"])  # fmt: skip
        split = ranker.score_from_user_embedding(
            user, cands["cand_ids"], cands["cand_content"], cands["cand_surface_ids"]
        )
    torch.testing.assert_close(direct[cands["cand_mask"]], split[cands["cand_mask"]], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="scores from the sequence"):
        _ranker("pinfm_early").score_from_user_embedding(user, cands["cand_ids"], None, cands["cand_surface_ids"])


def test_candidate_id_randomization_cuts_the_id_gradient() -> None:
    """p = 1: no training candidate reads its own id's hash rows; content still flows."""
    torch.manual_seed(0)
    ranker = Ranker(
        RankerConfig(
            backbone=BACKBONE, sequence="none", new_items=NewItemConfig(id_randomization=1.0, age_dropout_max=0.0)
        )
    )
    ids = torch.tensor([[11, 22, 33]])
    content = torch.randn(1, 3, BACKBONE.content_dim)
    ranker.train()
    ranker.candidate_embedding(ids, content).sum().backward()
    buckets = ranker.backbone.items.buckets(ids)[0]  # (3, k)
    for t, table in enumerate(ranker.backbone.items.tables):
        assert table.weight.grad[buckets[:, t]].abs().sum() == 0
    assert ranker.backbone.items.content_proj.weight.grad.abs().sum() > 0
    ranker.eval()  # eval: ids are used as they are
    torch.testing.assert_close(ranker.candidate_embedding(ids, content), ranker.candidate_embedding(ids, content))


def test_age_dependent_dropout_drops_only_young_ids() -> None:
    torch.manual_seed(0)
    cfg = RankerConfig(
        backbone=BACKBONE,
        sequence="none",
        new_items=NewItemConfig(id_randomization=0.0, age_dropout_max=1.0, age_horizon_days=7),
    )
    ranker = Ranker(cfg)
    ids = torch.tensor([[11, 22, 33]])
    content = torch.randn(1, 3, BACKBONE.content_dim)
    age = torch.tensor([[0, 30 * 86_400, -1]])  # brand new, a month old, unknown
    full = ranker.eval().candidate_embedding(ids, content)
    content_only = ranker.backbone.items.content_proj(content)
    got = ranker.train().candidate_embedding(ids, content, age)
    torch.testing.assert_close(got[0, 0], content_only[0, 0])  # age 0, p = 1: ID part dropped
    torch.testing.assert_close(got[0, 1:], full[0, 1:])  # old and unknown-age items keep their ids


def test_items_created_after_the_training_data_are_scored_from_content_at_inference() -> None:
    cutoff = 1_700_000_000
    ids = torch.tensor([[11, 22, 33]])
    content = torch.randn(1, 3, BACKBONE.content_dim)
    request_ts = torch.tensor([cutoff + 3_600])
    age = torch.tensor([[60, 7_200, -1]])  # created after the cutoff, before it, unknown
    torch.manual_seed(0)
    ranker = Ranker(RankerConfig(backbone=BACKBONE, sequence="none", id_cutoff_s=cutoff)).eval()
    full = ranker.candidate_embedding(ids, content)
    got = ranker.candidate_embedding(ids, content, age, request_ts)
    content_part = ranker.backbone.items.content_proj(content)  # (1, 3, D)
    torch.testing.assert_close(got[0, 0], content_part[0, 0])  # unseen: content only
    torch.testing.assert_close(got[0, 2], full[0, 2])  # unknown creation time: the id as it is
    # trained but 2 hours old: the id part at its expected keep under age dropout, 1 − 0.5·(1 − age/7 days)
    keep = 1.0 - 0.5 * (1.0 - (7_200 / 86_400) / 7.0)
    torch.testing.assert_close(got[0, 1], content_part[0, 1] + keep * (full[0, 1] - content_part[0, 1]))
    month_old = ranker.candidate_embedding(ids, content, torch.tensor([[30 * 86_400] * 3]), request_ts)
    torch.testing.assert_close(month_old, full)  # past the age horizon: whole ids
    # without the techniques (or without a cutoff) every id is used
    torch.manual_seed(0)
    off = Ranker(RankerConfig(backbone=BACKBONE, sequence="none", new_items=NewItemConfig.off(), id_cutoff_s=cutoff))
    torch.testing.assert_close(off.eval().candidate_embedding(ids, content, age, request_ts), full)


@pytest.mark.parametrize("mode", ["pinfm_early", "pinfm_late"])
def test_young_mix_averages_the_predictions_with_and_without_the_id(mode: str) -> None:
    cutoff = 1_700_000_000
    seq, cands = _inputs()
    U, C = cands["cand_ids"].shape
    request_ts = torch.full((U,), cutoff + 3_600)
    # per row: 2 hours old (trained, young), created after the cutoff, a month old, unknown age
    age = torch.tensor([[7_200, 60, 30 * 86_400, -1]]).expand(U, C)
    nic = NewItemConfig(id_randomization=0.0, age_dropout_max=0.5, age_horizon_days=7.0, young_mix=True)
    torch.manual_seed(0)
    ranker = Ranker(RankerConfig(backbone=BACKBONE, sequence=mode, new_items=nic, id_cutoff_s=cutoff)).eval()
    with torch.no_grad():
        got = ranker(seq, **cands, cand_age_s=age, request_ts=request_ts)  # (U, C, A)
        keep = ranker._inference_keep(age, request_ts)  # (U, C)
        with_id = ranker._forward(seq, **cands, cand_age_s=age, request_ts=request_ts,
                                  return_user=False, naive=False, id_keep=(keep > 0).float())  # fmt: skip
        without_id = ranker._forward(seq, **cands, cand_age_s=age, request_ts=request_ts,
                                     return_user=False, naive=False, id_keep=torch.zeros_like(keep))  # fmt: skip
    k = 1.0 - 0.5 * (1.0 - (7_200 / 86_400) / 7.0)
    assert keep[0].tolist() == pytest.approx([k, 0.0, 1.0, 1.0])
    want = torch.logit(keep[..., None] * with_id.sigmoid() + (1 - keep[..., None]) * without_id.sigmoid(), eps=1e-7)
    real = cands["cand_ids"] != 0
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    # only the young trained item differs from one pass with the id or without it
    torch.testing.assert_close(got[:, 1][real[:, 1]], without_id[:, 1][real[:, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 2:][real[:, 2:]], with_id[:, 2:][real[:, 2:]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0, 0], with_id[0, 0]) and not torch.allclose(got[0, 0], without_id[0, 0])
    assert (got[~real] == 0).all()  # padding candidates stay zero
    if mode == "pinfm_late":  # the precomputed-user-vector path mixes the same way
        user = ranker.user_embedding(seq["item_ids"], seq["action_ids"], seq["surface_ids"], seq["content"],
                                     seq["pad_mask"])  # fmt: skip
        late = ranker.score_from_user_embedding(
            user, cands["cand_ids"], cands["cand_content"], cands["cand_surface_ids"], age, request_ts
        )
        torch.testing.assert_close(late[real], got[real], atol=1e-5, rtol=1e-5)


def test_missing_id_vector_stands_in_for_the_dropped_id_part() -> None:
    """A candidate keeping a share k of its ID part gets (1 − k) of the learned vector; padding stays zero."""
    nic = NewItemConfig(id_randomization=0.0, age_dropout_max=1.0, age_horizon_days=7.0, missing_id_vector=True)
    torch.manual_seed(0)
    ranker = Ranker(RankerConfig(backbone=BACKBONE, sequence="none", new_items=nic)).eval()
    ids = torch.tensor([[11, 22, 33, 0]])
    content = torch.randn(1, 4, BACKBONE.content_dim)
    keep = torch.tensor([[1.0, 0.0, 0.25, 0.0]])
    plain = ranker.backbone.items(ids, content, id_keep=keep)  # (1, 4, D)
    torch.testing.assert_close(ranker.candidate_embedding(ids, content, id_keep=keep), plain)  # starts at zero
    with torch.no_grad():
        ranker.missing_id.copy_(torch.randn(BACKBONE.d_model))
    got = ranker.candidate_embedding(ids, content, id_keep=keep)
    torch.testing.assert_close(got[0, 0], plain[0, 0])  # whole id: unchanged
    torch.testing.assert_close(got[0, 1], plain[0, 1] + ranker.missing_id)  # dropped: the whole vector
    torch.testing.assert_close(got[0, 2], plain[0, 2] + 0.75 * ranker.missing_id)
    assert (got[0, 3] == 0).all()  # padding
    # in training, age dropout decides per candidate and the vector learns
    ranker.train()
    age = torch.tensor([[0, 0, 30 * 86_400, 0]])  # brand new items are always dropped (p = 1), the old one kept
    out = ranker.candidate_embedding(ids, content, age)
    torch.testing.assert_close(out[0, 2], ranker.backbone.items(ids, content)[0, 2])
    out.sum().backward()
    assert ranker.missing_id.grad is not None and ranker.missing_id.grad.abs().sum() > 0
    # without the option there is no such parameter, and configs saved before it existed load without it
    assert Ranker(RankerConfig(backbone=BACKBONE, sequence="none")).missing_id is None
    saved = RankerConfig(backbone=BACKBONE, new_items=nic).to_dict()
    assert RankerConfig.from_dict(saved).new_items.missing_id_vector is True
    del saved["new_items"]["missing_id_vector"]
    assert RankerConfig.from_dict(saved).new_items.missing_id_vector is False


def test_config_round_trip_and_errors() -> None:
    cfg = RankerConfig(
        backbone=BACKBONE,
        sequence="transact",
        new_items=NewItemConfig(id_randomization=0.2, age_dropout_max=0.3, age_horizon_days=5.0),
    )
    assert RankerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown RankerConfig fields"):
        RankerConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="sequence must be one of"):
        RankerConfig(sequence="rnn")
    with pytest.raises(ValueError, match="hybrid_user must be one of"):
        RankerConfig(hybrid_user="both")
    with pytest.raises(ValueError, match="id_randomization"):
        NewItemConfig(id_randomization=1.5)


def test_early_fusion_needs_a_free_position() -> None:
    ranker = _ranker("pinfm_early")
    L = BACKBONE.max_len
    seq = {k: torch.ones(1, L, dtype=torch.long) for k in ("item_ids", "action_ids", "surface_ids")}
    seq["pad_mask"] = torch.ones(1, L, dtype=torch.bool)
    with pytest.raises(ValueError, match="shorter than"):
        ranker(seq, torch.tensor([[5]]), torch.tensor([[1]]))


@pytest.mark.parametrize("mode", SEQUENCE_MODES)
def test_history_length_is_one_rule_for_training_and_serving(mode: str) -> None:
    cfg = RankerConfig(backbone=BACKBONE, sequence=mode)
    want = BACKBONE.max_len - 1 if mode in EARLY_FUSION_MODES else BACKBONE.max_len  # the candidate's slot
    assert history_len(cfg) == want
    assert ServingModel(Ranker(cfg), "v").max_len == want
    if mode in EARLY_FUSION_MODES:  # the longest history that fits, and one event more does not
        ranker = _ranker(mode).eval()
        for L, fits in ((want, True), (want + 1, False)):
            seq = {k: torch.ones(1, L, dtype=torch.long) for k in ("item_ids", "action_ids", "surface_ids")}
            seq["pad_mask"] = torch.ones(1, L, dtype=torch.bool)
            if fits:
                assert ranker(seq, torch.tensor([[5]]), torch.tensor([[1]])).shape == (1, 1, 3)
            else:
                with pytest.raises(ValueError, match=f"truncate them to {want}"):
                    ranker(seq, torch.tensor([[5]]), torch.tensor([[1]]))


def _ranking_data() -> RankingData:
    """2 requests: r0 (3 impressions: clicked, silent, silent), r1 (1 impression, hidden)."""
    seqs = SequenceArrays(
        item_ids=np.array([[1, 2, 0], [3, 0, 0]]),
        action_ids=np.array([[2, 2, 0], [2, 0, 0]]),
        surface_ids=np.ones((2, 3), np.int64),
        lengths=np.array([2, 1]),
    )
    return RankingData(
        sequences=seqs,
        request_ids=np.array(["r0", "r1"]),
        req_index=np.array([1, 0, 0, 0]),
        item_ids=np.array([40, 10, 20, 30]),
        surface_ids=np.array([1, 2, 2, 2]),
        labels=np.array([[0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]], np.float32),
        days=["2026-01-01"],
        request_ts=np.array([1_000_000, 2_000_000]),
    )


def test_batch_tensors_groups_impressions_by_request() -> None:
    data = _ranking_data()
    items = ItemFacts(ContentTable.empty(), ItemCreatedAt(np.array([10, 40]), np.array([999_000, 1_500_000])))
    b = batch_tensors(data, np.arange(4), items, torch.device("cpu"))
    assert b["seq"]["item_ids"].shape[0] == 2  # each request's sequence once
    assert b["cand_ids"].tolist() == [[10, 20, 30], [40, 0, 0]]
    assert b["cand_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert b["cand_age_s"].tolist() == [[1_000, -1, -1], [500_000, -1, -1]]  # request_ts - created_at
    # every impression finds its cell again
    assert b["cand_ids"][b["inverse"], b["slot"]].tolist() == [40, 10, 20, 30]
    assert torch.equal(b["labels"][b["inverse"], b["slot"]], torch.from_numpy(data.labels))


def test_late_sequences_are_the_history_before_each_requests_day() -> None:
    """What publish-embeddings computed the embedding of a request's day from, and one pass per unique history."""
    day = 86_400
    d0 = 1_700_006_400  # a UTC midnight
    ts = [d0 - 3 * day, d0 - 2 * day, d0 - 60, d0 + 10, d0 + 20]  # three events before the day, two on it
    users = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 9]]
    actions, surfaces = [["click"] * len(u) for u in users], [["home"] * len(u) for u in users]
    arrays = encode_sequences(users, actions, surfaces, 8, [ts, ts, ts[:3]])
    data = RankingData(
        sequences=arrays,
        request_ids=np.array(["a", "b", "c"]),
        req_index=np.array([0, 1, 2]),
        item_ids=np.array([7, 7, 7]),
        surface_ids=np.ones(3, np.int64),
        labels=np.zeros((3, 3), np.float32),
        days=["2023-11-15"],
        request_ts=np.array([d0 + 30, d0 + 40, 0]),  # two requests on the day; one of unknown time
    )
    hist = late_sequences(data, np.arange(3), width=2)
    assert hist is not None and hist.lengths.tolist() == [2, 2, 2]
    assert hist.item_ids.tolist() == [[2, 3], [2, 3], [2, 9]]  # the newest 2 before the day; unknown time: all
    b = batch_tensors(data, np.arange(3), ItemFacts(ContentTable.empty(), ItemCreatedAt(np.zeros(0, np.int64),
                      np.zeros(0, np.int64))), torch.device("cpu"), history=4, late=True)  # fmt: skip
    assert b["seq"]["item_ids"].tolist() == [[2, 3, 4, 5], [2, 3, 4, 5], [1, 2, 9, 0]]  # the newest 4
    late = b["late_seq"]
    assert late["item_ids"].shape[0] == 2 and late["index"].tolist()[0] == late["index"].tolist()[1]
    rows = late["item_ids"][late["index"]]  # the newest ``history`` events before the day; one pass per history
    assert rows.tolist() == [[1, 2, 3], [1, 2, 3], [1, 2, 9]]
    no_times = RankingData(**{**data.__dict__, "sequences": encode_sequences(users, actions, surfaces, 8)})
    assert late_sequences(no_times, np.arange(3), 2) is None  # unknown event times: the request's own sequence


def test_next_action_term_uses_the_engaged_item_against_silent_impressions() -> None:
    data = _ranking_data()
    items = ItemFacts(ContentTable.empty(), ItemCreatedAt(np.zeros(0, np.int64), np.zeros(0, np.int64)))
    b = batch_tensors(data, np.arange(4), items, torch.device("cpu"))
    ranker = _ranker("pinfm_late")
    _, user = ranker(b["seq"], b["cand_ids"], b["cand_surface_ids"], return_user=True)
    loss = next_action_term(ranker, b, user)  # only r0 qualifies: a click and two silent impressions
    assert loss is not None and torch.isfinite(loss) and loss > 0
    assert next_action_term(ranker, b, None) is None  # no backbone user vector (modes none/transact)
    only_r1 = batch_tensors(data, np.array([0]), items, torch.device("cpu"))  # hidden only: no positive
    _, u1 = ranker(only_r1["seq"], only_r1["cand_ids"], only_r1["cand_surface_ids"], return_user=True)
    assert next_action_term(ranker, only_r1, u1) is None


def test_evaluate_slices_new_and_old_items() -> None:
    data = _ranking_data()
    items = ItemFacts(ContentTable.empty(), ItemCreatedAt(np.array([10, 20, 30, 40]), np.array([5, 5, 50, 50])))
    assert new_item_mask(data, items, cutoff_s=10).tolist() == [True, False, False, True]
    assert new_item_mask(data, items, cutoff_s=None) is None
    m = evaluate(_ranker("pinfm_late"), data, items, torch.device("cpu"), cutoff_s=10)
    assert m["n_eval"] == 4 and m["n_eval_new"] == 2
    for key in ("auc_click", "hit3_click", "auc_click_new", "auc_click_old", "hit3_hide_new", "hit3_hide_old"):
        assert key in m, key
    assert m["auc_click_old"] in (0.0, 0.5, 1.0)  # old slice: one clicked, one silent impression


def test_transact_with_lifelong_selection_reads_only_the_selected_actions() -> None:
    """TransAct V2: each candidate sees its r most recent + top-K similar actions, nothing else."""
    torch.manual_seed(0)
    ranker = Ranker(
        RankerConfig(
            backbone=BACKBONE, sequence="transact", new_items=NewItemConfig.off(), lifelong_top_k=1, lifelong_recent_r=1
        )
    ).eval()
    seq, cands = _inputs()
    with torch.no_grad():
        base = ranker(seq, **cands)
    assert base.shape == (3, 4, len(ranker.actions)) and torch.isfinite(base).all()
    idx, valid = select_lifelong(seq["item_ids"], seq["content"], seq["pad_mask"], cands["cand_content"], 1, 1)
    picked = set(idx[0, 0][valid[0, 0]].tolist())
    assert len(picked) == 2  # user 0 has 6 actions: the latest and the most similar other one
    # an action candidate 0 did not pick but another candidate of user 0 did
    other = next(p for p in range(6) if p not in picked and bool(((idx[0, 1:] == p) & valid[0, 1:]).any()))
    changed = {k: (v.clone() if v is not None else None) for k, v in seq.items()}
    changed["item_ids"][0, other] += 7  # same content, so the same selection; a different id embedding
    with torch.no_grad():
        moved = ranker(changed, **cands)
    torch.testing.assert_close(moved[0, 0], base[0, 0])  # candidate 0 never read that action
    some_reader = (idx[0] == other) & valid[0]  # (C, S)
    readers = some_reader.any(-1)  # candidates of user 0 that did select it
    assert (moved[0][readers] - base[0][readers]).abs().max() > 0  # those that read it moved
    ranker.train()
    ranker(seq, **cands).sum().backward()
    assert ranker.transact is not None and all(p.grad is not None for p in ranker.transact.parameters())
    with pytest.raises(ValueError, match="need content"):
        ranker.eval()(seq, **{**cands, "cand_content": None})


@pytest.mark.parametrize("mode", ["none", "pinfm_early"])
def test_serving_scores_items_newer_than_the_training_data_from_content(mode: str) -> None:
    cutoff = 1_700_000_000
    torch.manual_seed(0)
    ranker = Ranker(RankerConfig(backbone=BACKBONE, sequence=mode, id_cutoff_s=cutoff))
    vec = np.ones(BACKBONE.content_dim, np.float32)
    content = ContentTable(np.array([5, 6, 7, 8]), np.tile(vec, (4, 1)))  # four items, same content
    created = ItemCreatedAt(np.array([5, 6, 7, 8]), np.array([cutoff - 10, cutoff - 20, cutoff + 10, cutoff + 20]))
    model = ServingModel(ranker, "v-test", content, created)
    user = np.zeros(BACKBONE.d_model, np.float32)
    seq = {"item_ids": [5], "actions": ["click"], "surfaces": ["home"]}
    p = model.score(user, [5, 6, 7, 8], "home", sequence=seq, request_ts=cutoff + 100)
    assert np.abs(p[0] - p[1]).max() > 1e-6  # trained ids: their id embeddings differ
    np.testing.assert_allclose(p[2], p[3], atol=1e-6)  # newer than the training data: content alone
    before = model.score(user, [5, 6, 7, 8], "home", sequence=seq, request_ts=cutoff - 5)  # none is new yet
    assert np.abs(before[2] - before[3]).max() > 1e-6


def _before(user: dict, t: int) -> dict:
    """The user's events before unix second ``t``."""
    k = int((np.asarray(user["ts"], dtype=np.int64) < t).sum())
    return {key: list(v[:k]) for key, v in user.items()}


@pytest.mark.parametrize("mode", ["pinfm_early", "pinfm_late", "hybrid"])
def test_serving_feeds_a_request_as_the_training_batch_does(mode: str) -> None:
    """ServingModel.ranker_inputs of a request = its row of finetune.batch_tensors, and score = evaluation's predict.

    The user embedding is the one published for the request's day: of the user's history before
    that day (``late_sequences``); the realtime sequence also holds the day's events before the request.
    """
    cutoff, day = 1_700_000_000, 86_400
    torch.manual_seed(0)
    ranker = Ranker(RankerConfig(backbone=BACKBONE, sequence=mode, id_cutoff_s=cutoff)).eval()
    hist = history_len(ranker.cfg)
    n = hist + 3  # longer than the history: both sides keep the newest ``hist`` events
    rng = np.random.default_rng(0)
    long_user = {
        "item_ids": (100 + np.arange(n)).tolist(),
        "actions": rng.choice(["click", "save", "share"], n).tolist(),
        "surfaces": rng.choice(["home", "search"], n).tolist(),
        # the last two events on the requests' day, before the requests
        "ts": [*(cutoff - 5 * day + np.cumsum(rng.integers(1, 50_000, n - 2))).tolist(), cutoff + 60, cutoff + 120],
    }
    new_user = {"item_ids": [], "actions": [], "surfaces": [], "ts": []}
    users = [long_user, new_user]
    request_ts = np.array([cutoff + 3_600, cutoff + 7_200])  # (R,)
    cands = [5, 6, 7, 8]  # young trained, created after the training data, unknown creation, no content
    content = ContentTable(np.array([5, 6, 7, *long_user["item_ids"]]), rng.normal(size=(3 + n, BACKBONE.content_dim)))
    created = ItemCreatedAt(np.array([5, 6, 8]), np.array([cutoff - 2 * day, cutoff + 60, cutoff - 30 * day]))
    C = len(cands)
    loaded = 2 * hist  # as fine-tuning loads the sequences of a ranker with a published embedding
    data = RankingData(
        sequences=encode_sequences(
            *([u[k] for u in users] for k in ("item_ids", "actions", "surfaces")), loaded, [u["ts"] for u in users]
        ),  # fmt: skip
        request_ids=np.array(["r0", "r1"]),
        req_index=np.repeat([0, 1], C),
        item_ids=np.array(cands * 2),
        surface_ids=np.full(2 * C, SURFACE_IDS["search"]),
        labels=np.zeros((2 * C, 3), np.float32),
        days=["2023-11-14"],
        request_ts=request_ts,
    )
    items = ItemFacts(content, created)
    late = ranker.uses_user_embedding
    b = batch_tensors(data, np.arange(2 * C), items, torch.device("cpu"), hist, late)
    assert ("late_seq" in b) == late
    trained = predict(ranker, data, items, torch.device("cpu")).reshape(2, C, -1)  # (R, C, A)
    model = ServingModel(ranker, "v", content, created)
    for u, user in enumerate(users):
        served = model.ranker_inputs(cands, "search", None, user, int(request_ts[u]))
        k = len(user["item_ids"][-hist:])
        assert int(served["seq"]["pad_mask"].sum()) == int(b["seq"]["pad_mask"][u].sum()) == k
        for key in ("item_ids", "action_ids", "surface_ids", "ts", "content"):
            assert torch.equal(served["seq"][key][0, :k], b["seq"][key][u, :k]), key
        if k:
            gaps = ranker.time_gaps(served["seq"])[0, :k]
            assert torch.equal(gaps, ranker.time_gaps(b["seq"])[u, :k]) and int(gaps[1:].min()) > 0
        for key in ("cand_ids", "cand_surface_ids", "cand_age_s", "cand_content"):
            assert torch.equal(served[key][0], b[key][u]), key
        since = 3_600 * (u + 1)  # the request's time after the cutoff
        assert served["cand_age_s"][0].tolist() == [2 * day + since, since - 60, -1, 30 * day + since]
        assert int(served["request_ts"][0]) == int(b["request_ts"][u])
        day_start = int(request_ts[u]) - int(request_ts[u]) % day
        published = model.user_embeddings([_before(user, day_start)])[0]  # (D,) as publish-embeddings computed it
        if late:
            index = int(b["late_seq"]["index"][u])
            assert int(b["late_seq"]["pad_mask"][index].sum()) == min(len(_before(user, day_start)["item_ids"]), hist)
        probs = model.score(published, cands, "search", sequence=user, request_ts=request_ts[u])
        np.testing.assert_allclose(probs, trained[u], atol=1e-5, rtol=0)
    with torch.no_grad():  # the batch itself scores as predict does
        direct = torch.sigmoid(ranker_logits(ranker, b)).numpy()
    np.testing.assert_allclose(direct, trained, atol=1e-6, rtol=0)
