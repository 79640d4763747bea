"""Pretrain the PinFM backbone on the pretraining corpus (next-, multi- and future-token losses).

``afm train pretrain --size small`` → :func:`pretrain` → ``models/pinfm/<version>``. The run
goes through :class:`training.trainer.Trainer`, so it checkpoints under
``runs/pretrain-ds=<ds>-<digest>/`` and a crashed run started again with the same settings
resumes where it stopped.

The objective and the optimiser are a named recipe's (:mod:`training.model.recipes`, the
benchmark's best measured one by default); the sizes scale the batch, the steps, the
negatives and the pairs per step. The artifact records the recipe and the objective it
trained with.
"""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import torch

from features.config import Layout
from features.contract import ACTION_IDS, POSITIVE_ACTIONS
from features.settings import Settings
from training.data import ContentTable, SequenceArrays, encode_sequence_frame, latest_day, read_partition
from training.jobs.registry import save_artifact
from training.model.backbone import PinFM, PinFMConfig, bucketize_time_gaps
from training.model.objectives import ItemCatalog, ObjectiveConfig, PinFMObjective
from training.model.recipes import DEFAULT_RECIPE, PINFM, recipe
from training.trainer import Trainer, TrainerConfig

log = logging.getLogger(__name__)


class PretrainConfig(Settings):
    """Pretraining run settings.

    :meth:`preset` builds every size from the recipe: its objective (scores, sampler and
    log-Q, in-batch cap, multi-token window, start temperature), its lr and weight decay.
    Departures from the recipe, and why:

    * ``future_token`` 0.5: the pipeline adds the future-token loss, which trains the state
      at the read position, the one the ranker reads (the benchmark has no ranker; on Beauty
      it cost 8 % next-item NDCG@10, docs/experiments/beauty-losses.md).
    * the item embedding (:meth:`backbone_config`): the backbone preset's buckets
      (:meth:`training.model.backbone.PinFMConfig.preset` says why the CPU sizes keep fewer),
      dense gradients (fine-tuning trains the table with AdamW, which takes no sparse
      gradients, and DDP on NCCL refuses them) and unscaled item input (the ranker and the
      demo's figures were measured without it; DCAT's candidate tokens follow whichever
      the backbone uses, training/model/dcat.py ``candidate_tokens``).

    Attributes:
        model: backbone preset name (tiny/small/base).
        recipe: the recipe's name (:data:`training.model.recipes.RECIPES`): the kind of objective.
        batch_size: segments per step.
        lr: peak AdamW learning rate (the recipe's).
        steps: optimizer steps.
        warmup: linear warm-up steps (then cosine decay to 10 %).
        weight_decay: AdamW weight decay (the recipe's).
        grad_clip: max gradient norm.
        next_token, multi_token, future_token: loss weights (0 = off).
        negatives: sampled negatives per step (plus in-batch ones), log-Q corrected.
        max_pairs: at most this many (query, target) pairs per loss and step.
        ckpt_every: checkpoint every this many steps.
        time_gaps: feed the corpus's log-time-gap buckets (between consecutive events) to the
            backbone. On by default: the corpus has per-event ``ts`` and the online
            ``user_sequence`` serves the same times (``event_ts_s``), so the ranker
            (``RankerConfig.time_gaps``; fine-tuning follows the backbone) feeds them too.
        device: 'auto', 'cpu' or 'cuda'.
        seed: RNG seed.
        log_every: log the loss every this many steps.
    """

    model: str = "small"
    recipe: str = DEFAULT_RECIPE
    batch_size: int = 64
    lr: float = PINFM.lr
    steps: int = 120
    warmup: int = 12
    weight_decay: float = PINFM.weight_decay
    grad_clip: float = 1.0
    next_token: float = PINFM.objective.next_token
    multi_token: float = PINFM.objective.multi_token
    future_token: float = 0.5
    negatives: int = 256
    max_pairs: int = 1024
    ckpt_every: int = 50
    time_gaps: bool = True
    device: str = "auto"
    seed: int = 0
    log_every: int = 25

    @classmethod
    def preset(cls, name: str, recipe_name: str = DEFAULT_RECIPE) -> PretrainConfig:
        """``tiny`` (tests, seconds), ``small`` (CPU demo, ≤ ~1 min), ``base`` (GPU), built from a recipe."""
        r = recipe(recipe_name)
        common = {
            "recipe": r.name,
            "lr": r.lr,
            "weight_decay": r.weight_decay,
            "next_token": r.objective.next_token,
            "multi_token": r.objective.multi_token,
        }
        presets = {
            "tiny": dict(model="tiny", batch_size=16, steps=40, warmup=4, max_pairs=256, negatives=64),
            "small": dict(model="small", batch_size=64, steps=120, warmup=12, max_pairs=1024, negatives=256),
            "base": dict(model="base", batch_size=128, steps=3000, warmup=200, max_pairs=4096, negatives=4096),
        }
        if name not in presets:
            raise ValueError(f"unknown pretrain preset {name!r}; expected one of {sorted(presets)}")
        return cls(**{**common, **presets[name]})

    def objective(self) -> ObjectiveConfig:
        """The recipe's objective at this size (losses, negatives and pairs per step from here)."""
        return recipe(self.recipe).objective_config(
            next_token=self.next_token,
            multi_token=self.multi_token,
            future_token=self.future_token,
            negatives=self.negatives,
            max_pairs=self.max_pairs,
        )

    def backbone_config(self) -> PinFMConfig:
        """The backbone this run trains: the ``model`` preset (see the class docstring for the embedding)."""
        return PinFMConfig.preset(self.model)

    def trainer_config(self, device: str | None = None) -> TrainerConfig:
        """The Trainer settings of this pretraining (``device`` overrides ``self.device``)."""
        return TrainerConfig(
            steps=self.steps,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup=self.warmup,
            min_lr_ratio=0.1,
            grad_clip=self.grad_clip,
            device=self.device if device is None else device,
            seed=self.seed,
            log_every=self.log_every,
            ckpt_every=self.ckpt_every,
            desc="pretrain",
        )


class CorpusBatches:
    """Random segments of the corpus per step, a pure function of (seed, step).

    Args:
        seqs: encoded corpus segments.
        rows: usable row indices (≥ 2 events).
        batch_size: segments per step.
        content: item content lookup.
        seed: sampling seed.
        time_gap_buckets: feed the backbone the log-gap buckets of the corpus's event times
            (``seqs.ts``; the same input the ranker gives it in fine-tuning and serving);
            None = no time gaps.

    Raises:
        ValueError: when time gaps are asked for but ``seqs`` has no event times.
    """

    def __init__(
        self,
        seqs: SequenceArrays,
        rows: np.ndarray,
        batch_size: int,
        content: ContentTable,
        seed: int,
        time_gap_buckets: int | None = None,
    ) -> None:
        if time_gap_buckets and seqs.ts is None:
            raise ValueError("time gaps need the corpus's event times, but the sequences have no 'ts'")
        self.seqs, self.rows, self.content, self.seed = seqs, rows, content, seed
        self.time_gap_buckets = time_gap_buckets
        self.batch_size = min(batch_size, len(rows))
        self.positive_ids = torch.tensor([ACTION_IDS[a] for a in POSITIVE_ACTIONS])

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        pick = np.random.default_rng([self.seed, step]).choice(self.rows, size=self.batch_size, replace=False)
        batch = self.seqs.tensors(np.sort(pick), self.content)
        batch["positive"] = torch.isin(batch["action_ids"], self.positive_ids) & batch["pad_mask"]
        ts = batch.pop("ts", None)
        if ts is not None and self.time_gap_buckets:
            batch["time_gaps"] = bucketize_time_gaps(ts, self.time_gap_buckets, batch["pad_mask"])  # (B, L)
        if batch["content"] is None:
            del batch["content"]
        return batch


def pretrain(layout: Layout, cfg: PretrainConfig, ds: str | None = None) -> dict:
    """Pretrain a backbone on one corpus partition and save it as a "pinfm" artifact.

    Args:
        layout: data root.
        cfg: run settings.
        ds: corpus day; None = the latest partition.

    Returns:
        {version, steps, final_loss, first_loss, tokens_per_s, seconds} (losses averaged
        over the first / last tenth of the steps). Under torchrun only rank 0 saves the
        artifact; the other ranks return {version: None, steps, first_loss, final_loss}.
    """
    t0 = time.perf_counter()
    ds = ds or latest_day(layout, layout.pretrain_corpus)
    model_cfg = cfg.backbone_config()
    objective_cfg = cfg.objective()

    corpus = read_partition(layout.pretrain_corpus, ds, columns=["user_id", "item_ids", "actions", "surfaces", "ts"])
    seqs = encode_sequence_frame(corpus, model_cfg.max_len)
    seqs_keep = np.flatnonzero(seqs.lengths >= 2)
    if len(seqs_keep) == 0:
        raise ValueError(f"pretrain corpus ds={ds} has no segment with ≥ 2 events; nothing to learn from")
    content = ContentTable.from_layout(layout, model_cfg.content_dim)
    log.info(
        "pretrain: ds=%s segments=%d (usable %d) items_with_content=%d model=%s device=%s",
        ds, len(seqs), len(seqs_keep), len(content), cfg.model, cfg.device,
    )  # fmt: skip

    counts = seqs.item_ids[seqs_keep]
    catalog = ItemCatalog.from_sequences([counts[counts != 0]])
    torch.manual_seed(cfg.seed)  # the initial weights are part of the run: same seed, same run
    model = PinFM(model_cfg)
    objective = PinFMObjective(objective_cfg, catalog)
    run_dir = layout.runs / f"pretrain-ds={ds}-{cfg.digest()}"
    trainer = Trainer(
        model,
        objective,
        CorpusBatches(
            seqs, seqs_keep, cfg.batch_size, content, cfg.seed, model_cfg.time_gap_buckets if cfg.time_gaps else None
        ),
        cfg.trainer_config(),
        run_dir=run_dir,
    )
    result = trainer.fit()
    losses = result.losses
    train_s = time.perf_counter() - t0
    k = max(1, len(losses) // 10)
    first_loss, final_loss = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    if not trainer.is_main:  # under torchrun rank 0 saves the model (every rank holds the same weights)
        return {"version": None, "steps": cfg.steps, "first_loss": first_loss, "final_loss": final_loss}
    metrics = {
        "first_loss": first_loss,
        "final_loss": final_loss,
        "steps": cfg.steps,
        "tokens_per_s": result.tokens / max(train_s, 1e-9),
        "temperature": float(objective.temperature.detach()),
        "resumed_from": result.resumed_from,
    }
    version = save_artifact(
        layout,
        "pinfm",
        {k: v.cpu() for k, v in model.state_dict().items()},
        config={
            "model": model_cfg.to_dict(),
            "model_preset": cfg.model,
            "pretrain": cfg.to_dict(),
            "objective": objective_cfg.to_dict(),  # what scored items in training (similarity: dot or cosine)
        },
        metrics=metrics,
        data_version={"corpus_ds": ds, "n_segments": int(len(seqs)), "corpus_path": f"pretrain_corpus/ds={ds}"},
        files=[run_dir / "training_curve.png", run_dir / "metrics.jsonl"],
    )
    shutil.rmtree(run_dir, ignore_errors=True)  # the artifact is saved: nothing left to resume
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
