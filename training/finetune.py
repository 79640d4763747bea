"""Fine-tune the ranker on ranking examples, evaluate on the last day, register and gate.

``afm train finetune`` → :func:`finetune` → ``models/ranker/<version>`` (+ CURRENT when it passes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from features.config import Layout
from features.contract import LABEL_ACTIONS
from training import artifacts
from training.config_fields import replace_fields
from training.data import ContentTable, RankingData, load_ranking_data
from training.metrics import roc_auc
from training.model import PinFMConfig, resolve_device
from training.ranker import Ranker, RankerConfig
from training.trainer import warmup_cosine

log = logging.getLogger(__name__)

#: The new model is promoted when its click AUC ≥ the current one's minus this.
PROMOTION_TOLERANCE = 0.01


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings.

    Attributes:
        epochs: passes over the training days.
        batch_size: impressions per step (whole requests are kept together).
        lr: peak AdamW learning rate of the head.
        backbone_lr_scale: the backbone's learning rate is ``lr × backbone_lr_scale``.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps.
        grad_clip: max gradient norm.
        action_weights: BCE weight of each action of LABEL_ACTIONS.
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
    action_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    model: str = "small"
    device: str = "auto"
    seed: int = 0

    def replace(self, **kw) -> FinetuneConfig:
        """A copy with some fields changed; ValueError naming unknown fields."""
        return replace_fields(self, **kw)


def _resolve_backbone(layout: Layout, backbone: str, preset: str) -> tuple[PinFMConfig, dict | None]:
    """(backbone config, pinfm artifact or None) for 'none' | 'latest' | a version."""
    if backbone == "none":
        return PinFMConfig.preset(preset), None
    if backbone == "latest":
        version = artifacts.latest_version(layout, "pinfm")
        if version is None:
            log.info("finetune: no pretrained pinfm under %s; starting from random weights", layout.models / "pinfm")
            return PinFMConfig.preset(preset), None
    else:
        version = backbone
    art = artifacts.load_artifact(layout, "pinfm", version)
    return PinFMConfig.from_dict(art["config"]["model"]), art


def _batch_tensors(data: RankingData, idx: np.ndarray, content: ContentTable, device: torch.device) -> dict:
    """Tensors of the impressions ``idx``: unique request sequences once, impressions mapped to them."""
    reqs, inverse = np.unique(data.req_index[idx], return_inverse=True)
    seq = data.sequences.tensors(reqs, content, device)
    ids = data.item_ids[idx]
    return {
        **seq,
        "inverse": torch.from_numpy(inverse.reshape(-1)).to(device),  # (N,) row of the request per impression
        "cand_ids": torch.from_numpy(ids[:, None]).to(device),  # (N, 1)
        "cand_content": torch.from_numpy(content.lookup(ids[:, None])).to(device) if len(content) else None,
        "cand_surface_ids": torch.from_numpy(data.surface_ids[idx]).to(device),  # (N,)
        "labels": torch.from_numpy(data.labels[idx]).to(device),  # (N, A)
    }


def _logits(model: Ranker, b: dict) -> torch.Tensor:
    user = model.user_embedding(b["item_ids"], b["action_ids"], b["surface_ids"], b["content"], b["pad_mask"])  # (R, D)
    return model.score_from_user_embedding(user[b["inverse"]], b["cand_ids"], b["cand_content"], b["cand_surface_ids"])[
        :, 0
    ]  # (N, A)


def predict(model: Ranker, data: RankingData, content: ContentTable, device: torch.device, batch: int = 2048):
    """(N, A) probabilities of every impression of ``data`` (eval mode, no grad)."""
    model.eval()
    out = np.zeros((len(data), len(model.actions)), np.float32)
    with torch.no_grad():
        for idx in data.request_batches(batch, rng=None):
            out[idx] = torch.sigmoid(_logits(model, _batch_tensors(data, idx, content, device))).cpu().numpy()
    return out


def evaluate(model: Ranker, data: RankingData, content: ContentTable, device: torch.device) -> dict:
    """Per-action AUC (``auc_<action>``; NaN when a label has one class only) and ``n_eval``."""
    probs = predict(model, data, content, device)
    metrics = {f"auc_{a}": roc_auc(data.labels[:, j], probs[:, j]) for j, a in enumerate(model.actions)}
    metrics["n_eval"] = len(data)
    return metrics


def _json_number(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def _gate(layout: Layout, new_auc: float | None) -> dict:
    cur = artifacts.current_version(layout)
    if cur is None:
        return {"pass": True, "reason": "no CURRENT ranker yet", "current_version": None, "new_auc_click": new_auc}
    cur_auc = artifacts.load_artifact(layout, "ranker", cur)["metrics"].get("auc_click")
    out = {"current_version": cur, "current_auc_click": cur_auc, "new_auc_click": new_auc}
    if new_auc is None:
        return {**out, "pass": False, "reason": "new click AUC undefined (one class on the eval day)"}
    if cur_auc is None:
        return {**out, "pass": True, "reason": "current ranker has no click AUC"}
    ok = new_auc >= cur_auc - PROMOTION_TOLERANCE
    rel = "≥" if ok else "<"
    return {**out, "pass": ok, "reason": f"auc_click {new_auc:.4f} {rel} {cur_auc:.4f} - {PROMOTION_TOLERANCE}"}


def finetune(
    layout: Layout, cfg: FinetuneConfig, ds: str | None = None, backbone: str = "latest", promote: bool = True
) -> dict:
    """Fine-tune, evaluate, save a "ranker" artifact and promote it when it passes the gate.

    Args:
        layout: data root.
        cfg: run settings.
        ds: evaluation day (default: the latest ranking_examples partition); all earlier days train.
        backbone: "latest" (newest pinfm, random weights when there is none), "none", or a pinfm version.
        promote: make the new version CURRENT when the gate passes.

    Returns:
        {version, metrics, promoted, backbone_version, gate, seconds}.
    """
    t0 = time.perf_counter()
    days = layout.available_days(layout.ranking_examples)
    if not days:
        raise FileNotFoundError(f"no ranking examples under {layout.ranking_examples}: run the feature pipeline first")
    eval_day = ds or days[-1]
    if eval_day not in days:
        raise FileNotFoundError(f"no ranking examples for ds={eval_day} under {layout.ranking_examples} (have {days})")
    train_days = [d for d in days if d < eval_day]
    if not train_days:
        raise ValueError(f"fine-tuning needs at least one day before the eval day {eval_day}; have {days}")
    if len(cfg.action_weights) != len(LABEL_ACTIONS):
        raise ValueError(f"action_weights has {len(cfg.action_weights)} values for actions {LABEL_ACTIONS}")

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    bb_cfg, bb_art = _resolve_backbone(layout, backbone, cfg.model)
    bb_version = bb_art["version"] if bb_art else None
    rcfg = RankerConfig(backbone=bb_cfg)
    model = Ranker(rcfg)
    if bb_art is not None:
        model.backbone.load_state_dict(bb_art["state_dict"])
    model.to(device)

    content = ContentTable.from_layout(layout, bb_cfg.content_dim)
    train = load_ranking_data(layout, train_days, bb_cfg.max_len)
    test = load_ranking_data(layout, [eval_day], bb_cfg.max_len)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"empty ranking examples: {len(train)} train ({train_days}), {len(test)} eval ({eval_day})")
    log.info(
        "finetune: train %s (%d impressions, %d requests), eval %s (%d), backbone %s, device %s",
        train_days, len(train), len(train.sequences), eval_day, len(test), bb_version or "random", device,
    )  # fmt: skip

    bb_params = list(model.backbone.parameters())
    bb_ids = {id(p) for p in bb_params}
    head_params = [p for p in model.parameters() if id(p) not in bb_ids]
    opt = torch.optim.AdamW(
        [{"params": head_params, "lr": cfg.lr}, {"params": bb_params, "lr": cfg.lr * cfg.backbone_lr_scale}],
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = len(train.request_batches(cfg.batch_size, rng=None))
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, total, 0.1))
    weights = torch.tensor(cfg.action_weights, dtype=torch.float32, device=device)  # (A,)

    losses: list[float] = []
    bar = tqdm(total=total, desc="finetune", unit="step", disable=None)
    for epoch in range(cfg.epochs):
        model.train()
        for idx in train.request_batches(cfg.batch_size, rng):
            b = _batch_tensors(train, idx, content, device)
            logits = _logits(model, b)  # (N, A)
            bce = F.binary_cross_entropy_with_logits(logits, b["labels"], reduction="none")  # (N, A)
            loss = (bce * weights).sum(-1).mean() / weights.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
        log.info("finetune epoch %d/%d mean loss %.4f", epoch + 1, cfg.epochs, np.mean(losses[-steps_per_epoch:]))
    bar.close()

    ev = evaluate(model, test, content, device)
    metrics = {k: _json_number(v) for k, v in ev.items()}
    metrics.update(n_train=len(train), final_train_loss=float(np.mean(losses[-max(1, len(losses) // 10) :])))
    corpus_version = bb_art["data_version"].get("corpus_ds") if bb_art else None
    data_version = {
        "train_days": train_days,
        "eval_day": eval_day,
        "backbone_version": bb_version,
        "corpus_version": corpus_version,
        "n_train": len(train),
        "n_eval": len(test),
    }
    gate = _gate(layout, metrics.get("auc_click"))
    gate["promote_requested"] = promote
    version = artifacts.save_artifact(
        layout,
        "ranker",
        model.state_dict(),
        config={"ranker": rcfg.to_dict(), "finetune": dataclasses.asdict(cfg), "backbone_version": bb_version},
        metrics=metrics,
        data_version=data_version,
        extra={"gate": gate},
    )
    promoted = bool(promote and gate["pass"])
    if promoted:
        artifacts.promote(layout, version, reason=f"gate: {gate['reason']}")
    log.info("finetune: saved ranker %s metrics %s; gate %s; promoted=%s", version, metrics, gate["reason"], promoted)
    return {
        "version": version,
        "metrics": metrics,
        "promoted": promoted,
        "backbone_version": bb_version,
        "gate": gate,
        "seconds": round(time.perf_counter() - t0, 2),
    }
