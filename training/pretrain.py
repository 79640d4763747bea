"""Pretrain the PinFM backbone on the pretraining corpus with next-token InfoNCE.

``afm train pretrain --size small`` → :func:`pretrain` → ``models/pinfm/<version>``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from features.config import Layout
from features.contract import ACTION_IDS, POSITIVE_ACTIONS
from training.artifacts import save_artifact
from training.data import ContentTable, encode_sequence_frame, latest_day, read_partition
from training.model import NextTokenInfoNCE, PinFM, PinFMConfig, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining run settings.

    Attributes:
        model: backbone preset name (tiny/small/base).
        batch_size: segments per step.
        lr: peak AdamW learning rate.
        steps: optimizer steps.
        warmup: linear warm-up steps (then cosine decay to 10 %).
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm.
        max_pairs: at most this many (query, target) pairs per step (bounds the N × N logits).
        device: 'auto', 'cpu' or 'cuda'.
        seed: RNG seed.
        log_every: log the loss every this many steps.
    """

    model: str = "small"
    batch_size: int = 64
    lr: float = 3e-3
    steps: int = 120
    warmup: int = 12
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_pairs: int = 1024
    device: str = "auto"
    seed: int = 0
    log_every: int = 25

    @classmethod
    def preset(cls, name: str) -> PretrainConfig:
        """``tiny`` (tests, seconds), ``small`` (CPU demo, ≤ ~1 min), ``base`` (GPU)."""
        presets = {
            "tiny": cls(model="tiny", batch_size=16, steps=40, warmup=4, lr=5e-3, max_pairs=256),
            "small": cls(),
            "base": cls(model="base", batch_size=128, steps=3000, warmup=200, lr=1e-3, max_pairs=4096),
        }
        if name not in presets:
            raise ValueError(f"unknown pretrain preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]

    def replace(self, **kw) -> PretrainConfig:
        """A copy with some fields changed; ValueError naming unknown fields."""
        unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown PretrainConfig fields {unknown}")
        return dataclasses.replace(self, **kw)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(layout: Layout, cfg: PretrainConfig, ds: str | None = None) -> dict:
    """Pretrain a backbone on one corpus partition and save it as a "pinfm" artifact.

    Args:
        layout: data root.
        cfg: run settings.
        ds: corpus day; None = the latest partition.

    Returns:
        {version, steps, final_loss, first_loss, tokens_per_s, seconds} (losses averaged
        over the first / last tenth of the steps).
    """
    t0 = time.perf_counter()
    ds = ds or latest_day(layout, layout.pretrain_corpus)
    model_cfg = PinFMConfig.preset(cfg.model)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    corpus = read_partition(layout.pretrain_corpus, ds, columns=["user_id", "item_ids", "actions", "surfaces"])
    seqs = encode_sequence_frame(corpus, model_cfg.max_len)
    seqs_keep = np.flatnonzero(seqs.lengths >= 2)
    if len(seqs_keep) == 0:
        raise ValueError(f"pretrain corpus ds={ds} has no segment with ≥ 2 events; nothing to learn from")
    content = ContentTable.from_layout(layout, model_cfg.content_dim)
    positive_ids = torch.tensor([ACTION_IDS[a] for a in POSITIVE_ACTIONS], device=device)
    log.info(
        "pretrain: ds=%s segments=%d (usable %d) items_with_content=%d model=%s device=%s",
        ds, len(seqs), len(seqs_keep), len(content), cfg.model, device,
    )  # fmt: skip

    model = PinFM(model_cfg).to(device)
    loss_fn = NextTokenInfoNCE().to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))

    losses: list[float] = []
    tokens = 0
    model.train()
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step", disable=None)
    for step in bar:
        rows = rng.choice(seqs_keep, size=min(cfg.batch_size, len(seqs_keep)), replace=False)
        batch = seqs.tensors(rows, content, device)
        hidden = model(
            batch["item_ids"], batch["action_ids"], batch["surface_ids"], batch["content"], batch["pad_mask"]
        )  # (B, L, D)
        loss, n_pairs = loss_fn(
            model,
            hidden,
            batch["item_ids"],
            batch["action_ids"],
            batch["pad_mask"],
            batch["content"],
            positive_ids,
            max_pairs=cfg.max_pairs,
            generator=gen,
        )
        opt.zero_grad(set_to_none=True)
        if n_pairs >= 2:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        tokens += int(batch["pad_mask"].sum())
        if losses:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", temp=f"{float(loss_fn.temperature.detach()):.3f}")
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            log.info(
                "pretrain step %d/%d loss %.4f pairs %d temp %.4f lr %.2e",
                step + 1, cfg.steps, losses[-1] if losses else float("nan"), n_pairs,
                float(loss_fn.temperature.detach()), sched.get_last_lr()[0],
            )  # fmt: skip
    if not losses:
        raise ValueError(f"pretrain corpus ds={ds} has no positive next-token pairs (actions {POSITIVE_ACTIONS})")

    train_s = time.perf_counter() - t0
    k = max(1, len(losses) // 10)
    first_loss, final_loss = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    metrics = {
        "first_loss": first_loss,
        "final_loss": final_loss,
        "steps": cfg.steps,
        "tokens_per_s": tokens / max(train_s, 1e-9),
        "temperature": float(loss_fn.temperature.detach()),
    }
    version = save_artifact(
        layout,
        "pinfm",
        model.state_dict(),
        config={"model": model_cfg.to_dict(), "model_preset": cfg.model, "pretrain": dataclasses.asdict(cfg)},
        metrics=metrics,
        data_version={"corpus_ds": ds, "n_segments": int(len(seqs)), "corpus_path": f"pretrain_corpus/ds={ds}"},
    )
    seconds = time.perf_counter() - t0
    log.info("pretrain: saved pinfm %s (loss %.4f → %.4f, %.1f s)", version, first_loss, final_loss, seconds)
    return {
        "version": version,
        "steps": cfg.steps,
        "first_loss": first_loss,
        "final_loss": final_loss,
        "tokens_per_s": round(metrics["tokens_per_s"], 1),
        "seconds": round(seconds, 2),
    }
