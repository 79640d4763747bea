"""Event-time gaps end to end in training code: ranker defaults, serving model = offline scoring, pretraining batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.config import Layout
from features.contract import SURFACE_IDS, ContractError
from serving.model import ServingModel
from training.data import ContentTable, SequenceArrays, encode_sequences
from training.jobs.finetune import FinetuneConfig, _ranker_time_gaps
from training.jobs.pretrain import CorpusBatches, PretrainConfig
from training.model.backbone import PinFMConfig, bucketize_time_gaps
from training.model.inputs import (
    TIME_GAPS_DEFAULT,
    TIME_GAPS_IF_UNSAVED,
    resolve_time_gaps,
    saved_time_gaps,
    time_gap_buckets,
)
from training.model.ranker import NewItemConfig, Ranker, RankerConfig

BACKBONE = PinFMConfig(d_model=32, n_layers=2, n_heads=4, max_len=12, hash_buckets=1 << 16)
T0 = 1_767_600_000  # unix seconds

SEQ = {"item_ids": [11, 12, 13, 14], "actions": ["click", "save", "click", "share"], "surfaces": ["home"] * 4}
TS = [T0, T0 + 30, T0 + 3_600, T0 + 2 * 86_400]  # (L,) gaps of 30 s, ~1 h, ~2 days
OTHER_TS = [T0, T0 + 5, T0 + 10, T0 + 15]  # the same events seconds apart
CANDIDATES = [21, 22, 23]


def _model(sequence: str = "pinfm_early", time_gaps: bool = True) -> ServingModel:
    torch.manual_seed(0)
    cfg = RankerConfig(backbone=BACKBONE, sequence=sequence, new_items=NewItemConfig.off(), time_gaps=time_gaps)
    return ServingModel(Ranker(cfg), "v-gaps")


def _offline_probs(model: ServingModel, ts: list[int] | None) -> np.ndarray:
    """The ranker's forward on a batch built as offline scoring builds it (SequenceArrays.tensors) → (C, A)."""
    arrays = encode_sequences([SEQ["item_ids"]], [SEQ["actions"]], [SEQ["surfaces"]], model.max_len,
                              None if ts is None else [ts])  # fmt: skip
    seq = arrays.tensors(np.arange(1), None)  # (1, L) each, "ts" (1, L) seconds when given
    cands = torch.tensor([CANDIDATES])  # (1, C)
    cand_content = torch.zeros(1, len(CANDIDATES), BACKBONE.content_dim)  # (1, C, Cd): not in the catalogue
    with torch.no_grad():
        logits = model.ranker(seq, cands, torch.full_like(cands, SURFACE_IDS["home"]), cand_content)  # (1, C, A)
    return torch.sigmoid(logits[0]).numpy()


def _served(model: ServingModel, ts: list[int] | None) -> np.ndarray:
    seq = SEQ if ts is None else {**SEQ, "ts": ts}
    user = model.user_embeddings([seq])[0]  # (D,)
    return model.score(user, CANDIDATES, "home", sequence=seq)  # (C, A)


def test_time_gaps_are_on_by_default_and_old_configs_stay_off() -> None:
    assert TIME_GAPS_DEFAULT and not TIME_GAPS_IF_UNSAVED
    assert RankerConfig().time_gaps and PretrainConfig().time_gaps
    saved = RankerConfig().to_dict()
    assert RankerConfig.from_dict(saved).time_gaps
    del saved["time_gaps"]  # a ranker saved before the field existed was trained without gaps
    assert not RankerConfig.from_dict(saved).time_gaps
    # a config saved either way loads as it was saved
    for value in (True, False):
        cfg = RankerConfig(backbone=BACKBONE, time_gaps=value)
        assert RankerConfig.from_dict(cfg.to_dict()) == cfg


def test_an_old_ranker_artifact_scores_as_it_was_trained(tmp_path) -> None:
    """A ranker saved before ``time_gaps`` existed was trained without gaps: loaded, it still ignores event times."""
    trained = _model(time_gaps=False)
    saved = trained.ranker.cfg.to_dict()
    del saved["time_gaps"]
    artifact = {"config": {"ranker": saved}, "state_dict": trained.ranker.state_dict(), "version": "v-old", "path": "-"}
    loaded = ServingModel.from_artifact(Layout(tmp_path), artifact)
    assert not loaded.ranker.cfg.time_gaps
    np.testing.assert_allclose(_served(loaded, TS), _served(trained, None), atol=1e-6, rtol=0)
    # what the rule protects: the same weights fed gaps (today's default for new rankers) score otherwise
    with_gaps = ServingModel(Ranker(trained.ranker.cfg.replace(time_gaps=True)), "v-old-gaps")
    with_gaps.ranker.load_state_dict(trained.ranker.state_dict())
    assert np.abs(_served(with_gaps, TS) - _served(loaded, TS)).max() > 1e-5


def test_one_rule_decides_a_new_rankers_time_gaps_and_a_saved_configs() -> None:
    assert resolve_time_gaps(None, None) is TIME_GAPS_DEFAULT  # nothing decides: the default
    assert resolve_time_gaps(None, False) is False and resolve_time_gaps(None, True) is True  # follow the backbone
    assert resolve_time_gaps(False, True) is False and resolve_time_gaps(True, False) is True  # explicit wins
    assert saved_time_gaps({}) is TIME_GAPS_IF_UNSAVED
    assert saved_time_gaps({"time_gaps": True}) is True and saved_time_gaps({"time_gaps": False}) is False


def test_time_gap_buckets_only_when_the_ranker_reads_event_times() -> None:
    arrays = encode_sequences([SEQ["item_ids"]], [SEQ["actions"]], [SEQ["surfaces"]], 8, [TS])
    seq = arrays.tensors(np.arange(1), None)
    on = RankerConfig(backbone=BACKBONE, time_gaps=True)
    want = bucketize_time_gaps(seq["ts"], BACKBONE.time_gap_buckets, seq["pad_mask"])  # (1, L)
    assert torch.equal(time_gap_buckets(on, seq), want) and int(want[0, 1:].min()) > 0
    assert torch.equal(Ranker(on).time_gaps(seq), want)  # the ranker reads them through the same rule
    assert time_gap_buckets(on.replace(time_gaps=False), seq) is None
    assert time_gap_buckets(on, {**seq, "ts": None}) is None  # unknown times: no gaps, not zero gaps


@pytest.mark.parametrize("sequence", ["pinfm_early", "pinfm_late", "hybrid"])
def test_serving_model_feeds_event_times_like_offline_scoring(sequence: str) -> None:
    model = _model(sequence)
    served = _served(model, TS)
    np.testing.assert_allclose(served, _offline_probs(model, TS), atol=1e-6, rtol=0)
    assert np.abs(served - _served(model, OTHER_TS)).max() > 1e-5  # other gaps, other scores
    # unknown times: no gaps at all (not "zero-second gaps")
    no_times = _served(model, None)
    np.testing.assert_allclose(no_times, _offline_probs(model, None), atol=1e-6, rtol=0)
    np.testing.assert_allclose(_served(model, None), no_times, atol=0, rtol=0)
    np.testing.assert_allclose(model.score(model.user_embeddings([{**SEQ, "ts": None}])[0], CANDIDATES, "home",
                                           sequence={**SEQ, "ts": None}), no_times, atol=0, rtol=0)  # fmt: skip
    assert np.abs(no_times - served).max() > 1e-5


def test_datetimes_and_int_seconds_give_the_same_gaps() -> None:
    model = _model()
    as_datetimes = list(np.asarray(TS, dtype="datetime64[s]"))
    np.testing.assert_allclose(_served(model, as_datetimes), _served(model, TS), atol=0, rtol=0)


def test_user_embeddings_batch_mixes_sequences_with_and_without_times() -> None:
    model = _model("pinfm_late")
    rows = [{**SEQ, "ts": TS}, SEQ, {**SEQ, "ts": OTHER_TS}, {"item_ids": [], "actions": [], "surfaces": [], "ts": []}]
    batch = model.user_embeddings(rows)  # (4, D)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(batch[i], model.user_embeddings([row])[0], atol=1e-6, rtol=0)
    assert np.abs(batch[0] - batch[1]).max() > 1e-5 and np.abs(batch[0] - batch[2]).max() > 1e-5


def test_misaligned_event_times_are_a_clear_error() -> None:
    model = _model()
    bad = {**SEQ, "ts": TS[:2]}
    with pytest.raises(ContractError, match="sequence 0 has 2 event times for 4 events"):
        model.user_embeddings([bad])
    with pytest.raises(ContractError, match="the sequence has 2 event times for 4 events"):
        model.score(np.zeros(model.embedding_dim, np.float32), CANDIDATES, "home", sequence=bad)


def test_ranker_without_time_gaps_ignores_event_times() -> None:
    model = _model(time_gaps=False)
    plain = _served(model, None)
    np.testing.assert_array_equal(_served(model, TS), plain)
    np.testing.assert_array_equal(_served(model, OTHER_TS), plain)
    np.testing.assert_array_equal(_served(model, TS[:2]), plain)  # not even read, so not checked
    np.testing.assert_allclose(plain, _offline_probs(model, None), atol=1e-6, rtol=0)


def test_whole_ranker_dcat_equals_naive_with_time_gaps() -> None:
    model = _model()
    arrays = encode_sequences([SEQ["item_ids"]] * 2, [SEQ["actions"]] * 2, [SEQ["surfaces"]] * 2, model.max_len,
                              [TS, OTHER_TS])  # fmt: skip
    seq = arrays.tensors(np.arange(2), None)  # (2, L), ts (2, L)
    cands = torch.tensor([CANDIDATES, CANDIDATES])  # (2, C)
    with torch.no_grad():
        fast = model.ranker(seq, cands, torch.ones_like(cands))  # (2, C, A)
        slow = model.ranker(seq, cands, torch.ones_like(cands), naive=True)  # (2, C, A)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    assert (fast[0] - fast[1]).abs().max() > 1e-5  # the rows differ only by their gaps


def test_corpus_batches_feed_the_gaps_of_the_event_times() -> None:
    arrays = encode_sequences([SEQ["item_ids"]] * 3, [SEQ["actions"]] * 3, [SEQ["surfaces"]] * 3, 8, [TS] * 3)
    batches = CorpusBatches(arrays, np.arange(3), batch_size=2, content=ContentTable.empty(), seed=0,
                            time_gap_buckets=BACKBONE.time_gap_buckets)  # fmt: skip
    b = batches(0)
    assert "ts" not in b
    want = bucketize_time_gaps(torch.tensor([TS] * 2), BACKBONE.time_gap_buckets)  # (2, L)
    assert torch.equal(b["time_gaps"], want)
    off = CorpusBatches(arrays, np.arange(3), batch_size=2, content=ContentTable.empty(), seed=0)
    assert "time_gaps" not in off(0)
    no_times = SequenceArrays(arrays.item_ids, arrays.action_ids, arrays.surface_ids, arrays.lengths)
    with pytest.raises(ValueError, match="time gaps need the corpus's event times"):
        CorpusBatches(no_times, np.arange(3), 2, ContentTable.empty(), 0, BACKBONE.time_gap_buckets)


def test_finetune_follows_the_backbones_pretraining_setting() -> None:
    def backbone(pretrain: dict | None) -> dict:
        return {"version": "p1", "config": {"model": {}, **({"pretrain": pretrain} if pretrain is not None else {})}}

    cfg = FinetuneConfig()
    assert cfg.time_gaps is None
    assert _ranker_time_gaps(cfg, None) is True  # no backbone: the RankerConfig default
    assert _ranker_time_gaps(cfg, backbone({"time_gaps": True})) is True
    assert _ranker_time_gaps(cfg, backbone({"time_gaps": False})) is False
    assert _ranker_time_gaps(cfg, backbone(None)) is False  # pretrained before the setting existed
    assert _ranker_time_gaps(cfg.replace(time_gaps=True), backbone({"time_gaps": False})) is True  # explicit wins
