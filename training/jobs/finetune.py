"""Fine-tune the ranker on ranking examples, evaluate on the last day, register and gate.

``afm train finetune`` → :func:`finetune` → ``models/ranker/<version>`` (+ CURRENT when it passes).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from features.config import Layout, day_window
from features.contract import LABEL_ACTIONS
from features.settings import Settings, json_digest
from training.data import ContentTable, ItemCreatedAt, RankingData, SequenceArrays, candidate_slots, load_ranking_data
from training.jobs import registry
from training.metrics import hit_at_k, roc_auc
from training.model.backbone import PinFMConfig, resolve_device
from training.model.inputs import history_len, resolve_time_gaps, saved_time_gaps
from training.model.interaction import default_label_weights
from training.model.objectives import ItemCatalog, PinFMObjective
from training.model.ranker import (
    SEQUENCE_MODES,
    USER_EMBEDDING_MODES,
    NewItemConfig,
    Ranker,
    RankerConfig,
    init_from_backbone,
)
from training.model.ranker_objective import RankerObjective, ranker_logits
from training.model.recipes import PINFM
from training.trainer import Trainer, TrainerConfig

log = logging.getLogger(__name__)

#: The new model is promoted when its click AUC ≥ the current one's minus this.
PROMOTION_TOLERANCE = 0.01
#: UTC days: the user embeddings published after day D's pipeline serve the requests of D + 1
DAY_S = 86_400
#: A ranker that reads a published user embedding loads this many times its history length of
#: each request's sequence: enough to find the history as it was at the start of the request's day
LATE_LOAD_FACTOR = 2


class FinetuneConfig(Settings):
    """Fine-tuning settings.

    Attributes:
        epochs: passes over the training days.
        batch_size: impressions per step (whole requests are kept together).
        lr: peak AdamW learning rate of the head.
        backbone_lr_scale: the backbone's learning rate is ``lr × backbone_lr_scale`` (PinFM: 1/10).
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps.
        grad_clip: max gradient norm.
        label_weights: (A, A) rows = heads, columns = labels of LABEL_ACTIONS
            (:func:`training.model.interaction.weighted_bce`); None = identity (plain BCE).
        sequence: the ranker's sequence module (:data:`training.model.ranker.SEQUENCE_MODES`);
            ``hybrid`` (default): DCAT early fusion over the realtime sequence + the published
            user embedding (trained on the history as of the start of each request's day, what
            ``publish-embeddings`` served that day).
        next_action_weight: TransAct V2's Next Action Loss (impression negatives) weight; 0 = off.
        aux_next_token_weight: the backbone's next-token loss on the request sequences; 0 = off.
        hybrid_user: ``hybrid`` only: the late features' user vector (``RankerConfig.hybrid_user``):
            ``fused`` (the published embedding and the realtime summary) or ``stored`` (the embedding alone).
        new_items: candidate-ID randomization and age-dependent ID dropout (NewItemConfig.off() = none).
        lifelong_top_k: ``transact`` only: TransAct V2's per-candidate selection of the
            ``lifelong_recent_r`` most recent + ``lifelong_top_k`` most content-similar actions
            (0 = TransAct over the whole sequence).
        time_gaps: the ranker's ``RankerConfig.time_gaps`` (log-time-gap buckets of the sequence
            into the backbone); None = as the backbone was pretrained (``PretrainConfig.time_gaps``),
            or :data:`training.model.inputs.TIME_GAPS_DEFAULT` without a pretrained backbone
            (:func:`training.model.inputs.resolve_time_gaps`).
        model: backbone preset when starting from random weights (a pretrained backbone brings its own shape).
        device: 'auto', 'cpu' or 'cuda'.
        seed: RNG seed.
    """

    epochs: int = 2
    batch_size: int = 512
    lr: float = 2e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.01
    warmup: int = 20
    grad_clip: float = 1.0
    label_weights: tuple[tuple[float, ...], ...] | None = None
    sequence: str = "hybrid"
    hybrid_user: str = "fused"
    next_action_weight: float = 0.01
    aux_next_token_weight: float = 0.0
    new_items: NewItemConfig = Field(default_factory=NewItemConfig)
    lifelong_top_k: int = 0
    lifelong_recent_r: int = 8
    time_gaps: bool | None = None
    model: str = "small"
    device: str = "auto"
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be ≥ 1, got {self.epochs}, {self.batch_size}")
        if self.sequence not in SEQUENCE_MODES:
            raise ValueError(f"sequence must be one of {SEQUENCE_MODES}, got {self.sequence!r}")
        if self.label_weights is not None:
            a = len(LABEL_ACTIONS)
            if len(self.label_weights) != a or any(len(r) != a for r in self.label_weights):
                raise ValueError(f"label_weights must be {a} × {a} (actions {LABEL_ACTIONS})")

    def trainer_config(self, steps: int, device: str) -> TrainerConfig:
        """The shared Trainer's settings for ``steps`` steps (warm-up, then cosine to 10 % of ``lr``)."""
        return TrainerConfig(
            steps=steps, lr=self.lr, weight_decay=self.weight_decay, warmup=self.warmup, min_lr_ratio=0.1,
            grad_clip=self.grad_clip, device=device, bf16=False, seed=self.seed, log_every=10, desc="finetune",
        )  # fmt: skip

    def label_weight_matrix(self) -> torch.Tensor:
        if self.label_weights is None:
            return default_label_weights(LABEL_ACTIONS)
        return torch.tensor(self.label_weights, dtype=torch.float32)


def _resolve_backbone(layout: Layout, backbone: str, preset: str) -> tuple[PinFMConfig, dict | None]:
    """(backbone config, pinfm artifact or None) for 'none' | 'latest' | a version."""
    if backbone == "none":
        return PinFMConfig.preset(preset), None
    if backbone == "latest":
        version = registry.latest_version(layout, "pinfm")
        if version is None:
            log.info("finetune: no pretrained pinfm under %s; starting from random weights", layout.models / "pinfm")
            return PinFMConfig.preset(preset), None
    else:
        version = backbone
    art = registry.load_artifact(layout, "pinfm", version)
    return PinFMConfig.from_dict(art["config"]["model"]), art


def _ranker_time_gaps(cfg: FinetuneConfig, backbone: dict | None) -> bool:
    """Whether the ranker feeds time gaps: ``cfg.time_gaps``, else what the backbone was pretrained with."""
    # a pinfm artifact whose pretraining settings lack the field was pretrained without gaps
    pretrained = None if backbone is None else saved_time_gaps(backbone["config"].get("pretrain") or {})
    if pretrained is not None and cfg.time_gaps is not None and cfg.time_gaps != pretrained:
        log.warning(
            "finetune: time_gaps=%s, but backbone %s was pretrained with time_gaps=%s",
            cfg.time_gaps,
            backbone["version"],
            pretrained,
        )
    return resolve_time_gaps(cfg.time_gaps, pretrained)


@dataclass
class ItemFacts:
    """What fine-tuning and evaluation know about items: content vectors and creation times."""

    content: ContentTable
    created: ItemCreatedAt

    @classmethod
    def from_layout(cls, layout: Layout, content_dim: int) -> ItemFacts:
        return cls(ContentTable.from_layout(layout, content_dim), ItemCreatedAt.from_layout(layout))


def window(arrays: SequenceArrays, rows: np.ndarray, end: np.ndarray, width: int) -> SequenceArrays:
    """Of each selected row, the (at most) ``width`` events before position ``end`` (exclusive), right-padded.

    Args:
        arrays: right-padded sequences, oldest first.
        rows: (n,) rows of ``arrays``.
        end: (n,) per row, one past the last event to keep (≤ the row's length).
        width: events to keep at most.

    Returns:
        (n, width) arrays; ``ts`` when ``arrays`` has it.
    """
    end = np.asarray(end, dtype=np.int64)
    start = np.maximum(end - width, 0)
    count = end - start  # (n,)
    valid = np.arange(width)[None, :] < count[:, None]  # (n, width)
    cols = np.minimum(start[:, None] + np.arange(width)[None, :], max(arrays.item_ids.shape[1] - 1, 0))

    def take(a: np.ndarray) -> np.ndarray:
        return np.where(valid, np.take_along_axis(a[rows], cols, axis=1), 0)

    ts = None if arrays.ts is None else take(arrays.ts)
    return SequenceArrays(take(arrays.item_ids), take(arrays.action_ids), take(arrays.surface_ids), count, ts)


def late_sequences(data: RankingData, reqs: np.ndarray, width: int) -> SequenceArrays | None:
    """Each request's history as the user embedding published for its day saw it.

    ``publish-embeddings`` runs after a day's pipeline on that day's snapshot, so a request of
    day D is served with the embedding of the user's events before D 00:00 UTC: of the
    request's sequence (oldest first), the newest ``width`` events before the start of its day.
    A request of unknown time keeps its whole sequence.

    Returns:
        (len(reqs), width) arrays, or None when the sequences carry no event times.
    """
    seqs = data.sequences
    if seqs.ts is None or data.request_ts is None:
        return None
    request_ts = data.request_ts[reqs]  # (n,)
    lengths = seqs.lengths[reqs]
    day_start = request_ts - request_ts % DAY_S
    real = np.arange(seqs.ts.shape[1])[None, :] < lengths[:, None]  # (n, L)
    before = ((seqs.ts[reqs] < day_start[:, None]) & real).sum(1)  # events are oldest first: a prefix
    end = np.where(request_ts > 0, before, lengths)
    return window(seqs, reqs, end, width)


def batch_tensors(
    data: RankingData,
    idx: np.ndarray,
    items: ItemFacts,
    device: torch.device,
    history: int | None = None,
    late: bool = False,
) -> dict:
    """Impressions ``idx`` grouped by request: each unique sequence once, its candidates in one row.

    Args:
        data, idx: the impressions.
        items: content vectors and creation times.
        device: where the tensors go.
        history: the ranker's history length (:func:`training.model.inputs.history_len`): the
            newest events of each sequence it reads; None = the sequences as loaded.
        late: also lay out ``late_seq``, the histories the published user embeddings of the
            requests' days were computed from (:func:`late_sequences`; ``pinfm_late`` and
            ``hybrid`` read them, see :meth:`training.model.ranker.Ranker.forward`).

    Returns:
        ``seq`` (the U sequences' tensors), candidate grids (U, C): ``cand_ids``,
        ``cand_surface_ids``, ``cand_mask``, ``cand_age_s``, ``labels`` (U, C, A),
        ``cand_content`` (U, C, Cd) or None, ``request_ts`` (U,), and ``inverse``/``slot``
        (N,) mapping every impression of ``idx`` to its cell; with ``late`` and event times,
        ``late_seq``: the unique histories' tensors (K, L') and ``index`` (U,), each request's row.
    """
    reqs, inverse = np.unique(data.req_index[idx], return_inverse=True)
    inverse = inverse.reshape(-1)
    slot, width = candidate_slots(inverse, len(reqs))
    U = len(reqs)
    ids = data.item_ids[idx]

    def grid(values: np.ndarray, fill: float | int = 0) -> np.ndarray:
        out = np.full((U, width, *values.shape[1:]), fill, dtype=values.dtype)
        out[inverse, slot] = values
        return out

    request_ts = data.request_ts[reqs] if data.request_ts is not None else np.zeros(U, np.int64)
    age = items.created.age_at(ids, request_ts[inverse])  # (N,) seconds, -1 = unknown
    cand_ids = grid(ids)
    seqs, rows = data.sequences, reqs
    if history is not None and seqs.item_ids.shape[1] > history:  # loaded longer: the newest ``history`` events
        seqs, rows = window(seqs, reqs, seqs.lengths[reqs], history), np.arange(U)
    out = {
        "seq": seqs.tensors(rows, items.content, device),
        "cand_ids": torch.from_numpy(cand_ids).to(device),  # (U, C)
        "cand_surface_ids": torch.from_numpy(grid(data.surface_ids[idx])).to(device),  # (U, C)
        "cand_mask": torch.from_numpy(grid(np.ones(len(idx), bool), False)).to(device),  # (U, C)
        "cand_age_s": torch.from_numpy(grid(age, -1)).to(device),  # (U, C)
        "labels": torch.from_numpy(grid(data.labels[idx])).to(device),  # (U, C, A)
        "cand_content": None,
        "request_ts": torch.from_numpy(request_ts.astype(np.int64)).to(device),  # (U,)
        "inverse": torch.from_numpy(inverse).to(device),  # (N,)
        "slot": torch.from_numpy(slot).to(device),  # (N,)
    }
    if len(items.content):
        out["cand_content"] = torch.from_numpy(items.content.lookup(cand_ids)).to(device)  # (U, C, Cd)
    hist = late_sequences(data, reqs, history or data.sequences.item_ids.shape[1]) if late else None
    if hist is not None and hist.ts is not None:
        # a user's requests of one day share that day's history: one backbone pass each
        key = np.concatenate([hist.item_ids, hist.action_ids, hist.surface_ids, hist.ts], axis=1)  # (U, 4·L')
        _, first, index = np.unique(key, axis=0, return_index=True, return_inverse=True)
        out["late_seq"] = {
            **hist.tensors(first, items.content, device),
            "index": torch.from_numpy(index.reshape(-1)).to(device),  # (U,)
        }
    return out


def predict(model: Ranker, data: RankingData, items: ItemFacts, device: torch.device, batch: int = 2048):
    """(N, A) probabilities of every impression of ``data`` (eval mode, no grad)."""
    model.eval()
    out = np.zeros((len(data), len(model.actions)), np.float32)
    history, late = history_len(model.cfg), model.uses_user_embedding
    with torch.no_grad():
        for idx in data.request_batches(batch, rng=None):
            b = batch_tensors(data, idx, items, device, history, late)
            logits = ranker_logits(model, b)[b["inverse"], b["slot"]]  # (N, A)
            out[idx] = torch.sigmoid(logits).cpu().numpy()
    return out


def new_item_mask(data: RankingData, items: ItemFacts, cutoff_s: int | None) -> np.ndarray | None:
    """(N,) True where the impression's item was created after ``cutoff_s`` (None: unknown)."""
    if cutoff_s is None or not len(items.created):
        return None
    created = items.created.lookup(data.item_ids)
    return created > cutoff_s


def evaluate(
    model: Ranker,
    data: RankingData,
    items: ItemFacts,
    device: torch.device,
    cutoff_s: int | None = None,
    probs: np.ndarray | None = None,
) -> dict:
    """Per-action AUC and HIT@3, overall and sliced by new vs old items.

    Keys: ``auc_<action>``, ``hit3_<action>`` and, when item creation times and a cutoff are
    known, the same with ``_new`` / ``_old`` suffixes (new = created after ``cutoff_s``, the
    end of the backbone's pretraining data); ``n_eval``, ``n_eval_new``. NaN where a slice has
    one class only. ``probs`` (N, A): the model's predictions on ``data`` when already computed.
    """
    if probs is None:
        probs = predict(model, data, items, device)
    groups = data.req_index
    new = new_item_mask(data, items, cutoff_s)
    metrics: dict = {"n_eval": len(data)}
    slices = {"": np.ones(len(data), bool)}
    if new is not None:
        slices.update({"_new": new, "_old": ~new})
        metrics["n_eval_new"] = int(new.sum())
    for suffix, m in slices.items():
        for j, a in enumerate(model.actions):
            y, p = data.labels[m, j], probs[m, j]
            metrics[f"auc_{a}{suffix}"] = roc_auc(y, p) if m.any() else float("nan")
            metrics[f"hit3_{a}{suffix}"] = hit_at_k(y, p, groups[m], k=3) if m.any() else float("nan")
    return metrics


def _json_number(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def _gate(layout: Layout, new_auc: float | None) -> dict:
    cur = registry.current_version(layout)
    if cur is None:
        return {"pass": True, "reason": "no CURRENT ranker yet", "current_version": None, "new_auc_click": new_auc}
    cur_auc = registry.load_artifact(layout, "ranker", cur)["metrics"].get("auc_click")
    out = {"current_version": cur, "current_auc_click": cur_auc, "new_auc_click": new_auc}
    if new_auc is None:
        return {**out, "pass": False, "reason": "new click AUC undefined (one class on the eval day)"}
    if cur_auc is None:
        return {**out, "pass": True, "reason": "current ranker has no click AUC"}
    ok = new_auc >= cur_auc - PROMOTION_TOLERANCE
    rel = "≥" if ok else "<"
    return {**out, "pass": ok, "reason": f"auc_click {new_auc:.4f} {rel} {cur_auc:.4f} - {PROMOTION_TOLERANCE}"}


class RankingBatches:
    """The fine-tuning batches: ``epochs`` shuffles of whole requests, a pure function of the step.

    Args:
        data: the training impressions.
        items: content vectors and creation times.
        batch_size: impressions per batch (a batch closes at the request that reaches it).
        epochs: passes over ``data``.
        seed: the shuffles' seed.
        history, late: as in :func:`batch_tensors`.
    """

    def __init__(
        self,
        data: RankingData,
        items: ItemFacts,
        batch_size: int,
        epochs: int,
        seed: int,
        history: int | None = None,
        late: bool = False,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.data, self.items = data, items
        self.history, self.late = history, late
        self.batches = [idx for _ in range(epochs) for idx in data.request_batches(batch_size, rng)]

    def __len__(self) -> int:
        return len(self.batches)

    def __call__(self, step: int) -> dict:
        return batch_tensors(self.data, self.batches[step], self.items, torch.device("cpu"), self.history, self.late)


def ranker_objective(cfg: FinetuneConfig, train: RankingData) -> RankerObjective:
    """The fine-tuning loss of ``cfg``; the auxiliary next-token loss follows the pretraining recipe."""
    aux = None
    if cfg.aux_next_token_weight > 0:
        catalog = ItemCatalog.from_sequences(train.sequences.item_ids[train.sequences.item_ids > 0])
        aux = PinFMObjective(PINFM.objective_config(multi_token=0.0, negatives=256), catalog)
    return RankerObjective(cfg.label_weight_matrix(), cfg.next_action_weight, aux, cfg.aux_next_token_weight)


def train_ranker(
    train: RankingData,
    test: RankingData,
    items: ItemFacts,
    cfg: FinetuneConfig,
    rcfg: RankerConfig,
    backbone_state: dict | None,
    cutoff_s: int | None,
    device: torch.device,
    run_dir: Path | None = None,
) -> tuple[Ranker, dict, list[float]]:
    """Fine-tune a ranker on in-memory ranking data with the shared :class:`training.trainer.Trainer`, and evaluate it.

    Args:
        train: training impressions grouped by request (sequences of at most
            :func:`training.model.inputs.history_len` events of ``rcfg``).
        test: evaluation impressions.
        items: content vectors and creation times of the items.
        cfg: optimisation settings (``cfg.seed`` seeds the weights' init and the batch order).
        rcfg: the ranker's shape (``rcfg.id_cutoff_s``: end of the fine-tuning data).
        backbone_state: pretrained PinFM weights for ``ranker.backbone``, or None (random).
        cutoff_s: new items = created after this (unix seconds; the backbone's pretraining
            cutoff), for the ``_new``/``_old`` slices of :func:`evaluate`; None = no slices.
        device: where to train.
        run_dir: checkpoints and the metrics log (a crashed run started again resumes); None = none.

    Returns:
        (the trained ranker, metrics = :func:`evaluate`'s keys (NaN → None) + ``n_train`` and
        ``final_train_loss``, the loss of every step).
    """
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"empty ranking data: {len(train)} train impressions, {len(test)} eval impressions")
    torch.manual_seed(cfg.seed)  # the initial weights are part of the run
    model = Ranker(rcfg)
    if backbone_state is not None:
        init_from_backbone(model, backbone_state)
    late = rcfg.sequence in USER_EMBEDDING_MODES
    batches = RankingBatches(train, items, cfg.batch_size, cfg.epochs, cfg.seed, history_len(rcfg), late)
    trainer = Trainer(
        model,
        ranker_objective(cfg, train),
        batches,
        cfg.trainer_config(len(batches), str(device)),
        run_dir=run_dir,
        lr_scales={"model.backbone.": cfg.backbone_lr_scale},
    )
    losses = trainer.fit().losses
    ev = evaluate(model, test, items, trainer.device, cutoff_s)
    metrics = {k: _json_number(v) for k, v in ev.items()}
    metrics.update(n_train=len(train), final_train_loss=float(np.mean(losses[-max(1, len(losses) // 10) :])))
    return model, metrics, losses


class NotEnoughDays(FileNotFoundError):
    """The ranking examples do not cover an evaluation day and an earlier training day yet."""


@dataclass(frozen=True)
class FinetunePlan:
    """What one fine-tuning run reads: its days, its backbone, the ranker's shape and the new-item cutoff."""

    train_days: list[str]
    eval_day: str
    rcfg: RankerConfig
    backbone: dict | None  # the pinfm artifact, or None (random weights)
    cutoff_s: int  # new items = created after this (end of the backbone's pretraining data)
    data_version: dict

    @property
    def backbone_version(self) -> str | None:
        return self.backbone["version"] if self.backbone else None

    def digest(self, cfg: FinetuneConfig) -> str:
        """Names the run directory: changes with the settings, the days and the backbone."""
        key = {"finetune": cfg.to_dict(), "ranker": self.rcfg.to_dict(), "days": self.train_days,
               "eval_day": self.eval_day, "backbone": self.backbone_version}  # fmt: skip
        return json_digest(key)


def plan_finetune(layout: Layout, cfg: FinetuneConfig, ds: str | None, backbone: str) -> FinetunePlan:
    """The days, backbone and ranker shape of a fine-tuning run; errors name what is missing."""
    days = layout.available_days(layout.ranking_examples)
    if not days:
        raise FileNotFoundError(f"no ranking examples under {layout.ranking_examples}: run the feature pipeline first")
    eval_day = ds or days[-1]
    if eval_day not in days:
        raise FileNotFoundError(f"no ranking examples for ds={eval_day} under {layout.ranking_examples} (have {days})")
    train_days = [d for d in days if d < eval_day]
    if not train_days:
        raise NotEnoughDays(f"fine-tuning needs at least one day before the eval day {eval_day}; have {days}")
    bb_cfg, bb_art = _resolve_backbone(layout, backbone, cfg.model)
    rcfg = RankerConfig(
        backbone=bb_cfg,
        sequence=cfg.sequence,
        hybrid_user=cfg.hybrid_user,
        new_items=cfg.new_items,
        # items created after the last fine-tuning day never had a trained ID (content carries them)
        id_cutoff_s=int(day_window(train_days[-1])[1].timestamp()),
        lifelong_top_k=cfg.lifelong_top_k,
        lifelong_recent_r=cfg.lifelong_recent_r,
        time_gaps=_ranker_time_gaps(cfg, bb_art),
    )
    # new items = created after the backbone's pretraining data (or before any fine-tuning day without one)
    corpus_ds = bb_art["data_version"].get("corpus_ds") if bb_art else None
    cutoff = day_window(corpus_ds)[1] if corpus_ds else day_window(train_days[0])[0]
    data_version = {
        "train_days": train_days,
        "eval_day": eval_day,
        "backbone_version": bb_art["version"] if bb_art else None,
        "corpus_version": corpus_ds,
        "new_item_cutoff": cutoff.isoformat(),
    }
    return FinetunePlan(train_days, eval_day, rcfg, bb_art, int(cutoff.timestamp()), data_version)


def finetune(
    layout: Layout,
    cfg: FinetuneConfig,
    ds: str | None = None,
    backbone: str = "latest",
    promote: bool = True,
    register: bool = True,
) -> dict:
    """Fine-tune, evaluate, save a "ranker" artifact and promote it when it passes the gate.

    A crashed run started again with the same settings resumes from its last checkpoint
    (``runs/finetune-ds=<ds>-<digest>/``, removed once the artifact is saved).

    Args:
        layout: data root.
        cfg: run settings.
        ds: evaluation day (default: the latest ranking_examples partition); all earlier days train.
        backbone: "latest" (newest pinfm, random weights when there is none), "none", or a pinfm version.
        promote: make the new version CURRENT when the gate passes.
        register: save the artifact (False: only measure, e.g. for an ablation; nothing is written).

    Returns:
        {version, metrics, promoted, backbone_version, gate, seconds}.
    """
    t0 = time.perf_counter()
    plan = plan_finetune(layout, cfg, ds, backbone)
    device = resolve_device(cfg.device)
    items = ItemFacts.from_layout(layout, plan.rcfg.backbone.content_dim)
    seq_len = history_len(plan.rcfg)  # the newest events the ranker reads, as the service does
    if plan.rcfg.sequence in USER_EMBEDDING_MODES:  # and the history before each request's day (late_sequences)
        seq_len *= LATE_LOAD_FACTOR
    train = load_ranking_data(layout, plan.train_days, seq_len)
    test = load_ranking_data(layout, [plan.eval_day], seq_len)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(
            f"empty ranking examples: {len(train)} train ({plan.train_days}), {len(test)} eval ({plan.eval_day})"
        )
    log.info(
        "finetune: train %s (%d impressions, %d requests), eval %s (%d), backbone %s, sequence %s, device %s",
        plan.train_days, len(train), len(train.sequences), plan.eval_day, len(test),
        plan.backbone_version or "random", cfg.sequence, device,
    )  # fmt: skip
    run_dir = layout.runs / f"finetune-ds={plan.eval_day}-{plan.digest(cfg)}" if register else None
    state = plan.backbone["state_dict"] if plan.backbone else None
    model, metrics, _ = train_ranker(train, test, items, cfg, plan.rcfg, state, plan.cutoff_s, device, run_dir)
    out = {"version": None, "metrics": metrics, "promoted": False, "backbone_version": plan.backbone_version}
    if not register:
        log.info("finetune (not registered): sequence %s metrics %s", cfg.sequence, metrics)
        return {**out, "gate": None, "seconds": round(time.perf_counter() - t0, 2)}
    gate = _gate(layout, metrics.get("auc_click"))
    gate["promote_requested"] = promote
    version = registry.save_artifact(
        layout,
        "ranker",
        model.state_dict(),
        config={"ranker": plan.rcfg.to_dict(), "finetune": cfg.to_dict(), "backbone_version": plan.backbone_version},
        metrics=metrics,
        data_version={**plan.data_version, "n_train": len(train), "n_eval": len(test)},
        extra={"gate": gate},
        files=[run_dir / "training_curve.png", run_dir / "metrics.jsonl"],
    )
    shutil.rmtree(run_dir, ignore_errors=True)  # the artifact is saved: nothing left to resume
    promoted = bool(promote and gate["pass"])
    if promoted:
        registry.promote(layout, version, reason=f"gate: {gate['reason']}")
    log.info("finetune: saved ranker %s metrics %s; gate %s; promoted=%s", version, metrics, gate["reason"], promoted)
    return {
        **out,
        "version": version,
        "promoted": promoted,
        "gate": gate,
        "seconds": round(time.perf_counter() - t0, 2),
    }
