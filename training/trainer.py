"""One training loop for pretraining, the benchmark and fine-tuning: AdamW, warm-up + cosine,
clipping, bf16 autocast on GPU, checkpoints with exact resume, validation with early stopping, DDP.

The loop never owns data state: ``batch_fn(step)`` must return the global batch of a step
as a pure function of the step (see :class:`training.bench.seqrec.SeqRecBatches`). Together with
the saved RNG, optimizer and scheduler state this makes a resumed run take exactly the
steps (and losses) of an uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process runs the backbone on rows ``rank::world``
of every batch; the hidden states of all rows are gathered on every process and the objective
scores the whole batch there (``loss_from_hidden``: in-batch negatives, the mean over the pairs
and the sampled negatives are the full batch's). Dense gradients are averaged by
DistributedDataParallel (gloo on CPU, nccl on GPU); the tables with sparse gradients stay out of
DDP and are averaged by :func:`all_reduce_sparse_grads`. The gradient a step applies is thus the
single-process gradient of the whole batch, up to float rounding, and clipping sees the global
norm. Dropout draws from a per-rank stream, so the objective's draws (negatives) stay equal on
every rank and a resumed run continues exactly. Only rank 0 writes files.

Files under ``run_dir``: ``checkpoint.pt`` (latest, for resume), ``best.pt`` (weights of
the best validation score), ``metrics.jsonl`` (one JSON object per logged step or eval)
and ``training_curve.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from features.settings import Settings
from training.model.backbone import resolve_device
from training.model.objectives import batch_hidden

log = logging.getLogger(__name__)

Batch = dict[str, object]  # tensors, nested dicts of tensors, None


class TrainerConfig(Settings):
    """Optimisation and bookkeeping settings.

    Attributes:
        steps: optimizer steps in total.
        lr: peak learning rate.
        weight_decay: AdamW decay of matrix weights (embeddings, norms and biases get none).
        adam_beta2: second-moment decay of both Adams (AdamW and the tables' SparseAdam).
        sparse_lr_scale: the sparse-gradient tables' lr is this × ``lr`` (same schedule).
        warmup: linear warm-up steps, then cosine decay to ``min_lr_ratio`` × lr.
        min_lr_ratio: end of the cosine.
        grad_clip: max global gradient norm (0 = no clipping).
        device: 'auto', 'cpu' or 'cuda'.
        bf16: autocast matmuls to bfloat16 on CUDA (ignored on CPU).
        seed: seeds the torch RNG (dropout, negative sampling).
        log_every: write a metrics line every this many steps.
        ckpt_every: write ``checkpoint.pt`` every this many steps (0 = only at the end).
        eval_every: call ``evaluate`` every this many steps (0 = only at the end).
        patience: stop after this many evaluations without a better ``select_metric`` (0 = never).
        desc: progress-bar label.
        progress_bar: show the progress bar (main rank, on a terminal); off when a parent
            process reports the progress of several runs.
    """

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    sparse_lr_scale: float = 1.0
    warmup: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    device: str = "auto"
    bf16: bool = True
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 0
    eval_every: int = 0
    patience: int = 0
    desc: str = "train"
    progress_bar: bool = True

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class TrainResult:
    """What a run did: steps taken, losses, evaluations, best step, throughput."""

    steps: int
    losses: list[float]
    evals: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_metric: float | None = None
    seconds: float = 0.0
    tokens: int = 0
    resumed_from: int = 0
    stopped_early: bool = False
    world_size: int = 1
    ranks_in_sync: bool | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write, or a reader, never sees a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RowShards:
    """This process's share of every batch under torchrun: rows ``rank::world``.

    Attributes:
        rank, world: this process and the number of processes.
        group: the process group of the trainer's own collectives (None = the default group).
    """

    rank: int
    world: int
    group: object = None

    def sizes(self, rows: int) -> list[int]:
        """Rows of each rank in a batch of ``rows``."""
        return [len(range(r, rows, self.world)) for r in range(self.world)]

    def rows(self, batch: Batch) -> Batch:
        """This rank's rows of a flat batch (tensors whose first dimension is the batch's)."""
        if any(isinstance(v, dict) for v in batch.values()):
            raise ValueError("a batch of nested groups cannot be split across DDP ranks")
        b = batch["item_ids"].shape[0]
        return {
            k: v[self.rank :: self.world] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v
            for k, v in batch.items()
        }


class _GatherRows(torch.autograd.Function):
    """Every rank's rows (``rank::world``) back in the batch's row order, on every rank.

    Backward: each rank differentiates its own copy of the batch-wide loss, so the gradient of
    a rank's rows is the sum of all ranks' gradients of them (an all-reduce). DDP then averages
    the parameters' gradients, which turns the sum back into one loss's gradient.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, rows: int, shards: RowShards) -> torch.Tensor:
        sizes = shards.sizes(rows)
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(shards.world)]
        dist.all_gather(parts, padded, group=shards.group)
        out = local.new_empty((rows, *local.shape[1:]))
        for r, (part, n) in enumerate(zip(parts, sizes, strict=True)):
            out[r :: shards.world] = part[:n]
        ctx.shards = shards
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        shards = ctx.shards
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=shards.group)
        return total[shards.rank :: shards.world], None, None


def gather_rows(local: torch.Tensor, rows: int, shards: RowShards) -> torch.Tensor:
    """(rows, ...) tensor of the whole batch from each rank's (rows of rank ``r::world``, ...) part (autograd-aware)."""
    return _GatherRows.apply(local, rows, shards)


class LossModule(nn.Module):
    """backbone + objective as one module, so DDP sees every parameter in one forward.

    ``forward(batch)`` is the objective on the batch. With ``shards`` (set by the Trainer under
    torchrun) the backbone runs on this rank's rows only, with dropout drawn from ``rng_seed``
    (a stream of this rank's and step's own, the global RNG untouched); the hidden states of all
    rows are gathered and ``objective.loss_from_hidden`` scores the whole batch, identically on
    every rank. An objective without ``loss_from_hidden`` scores this rank's rows only (its loss
    is then the mean of the ranks' losses: exact for a mean over equal shares of rows).
    """

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(
        self, batch: Batch, shards: RowShards | None = None, rng_seed: int | None = None
    ) -> tuple[torch.Tensor, dict]:
        if shards is None:
            return self.objective(self.model, batch)
        local = shards.rows(batch)
        if not hasattr(self.objective, "loss_from_hidden"):
            return self.objective(self.model, local)
        rows = batch["item_ids"].shape[0]
        device = batch["item_ids"].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            if rng_seed is not None:
                torch.manual_seed(rng_seed)
            if local["item_ids"].shape[0]:
                hidden = batch_hidden(self.model, local)  # (rows of this rank, L, D)
            else:  # fewer rows than ranks: no rows here, but this rank still joins the gather's backward
                d = self.model.cfg.d_model
                hidden = torch.zeros(0, batch["item_ids"].shape[1], d, device=device, requires_grad=True)
        return self.objective.loss_from_hidden(self.model, gather_rows(hidden, rows, shards), batch)


def distributed_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not launched by it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def all_reduce_sparse_grads(params: list[nn.Parameter], world: int, group: object = None) -> None:
    """Average the sparse gradients of ``params`` over the ranks: what a dense all-reduce gives.

    Each rank's gradient is coalesced (one row per looked-up index); the (index, row) pairs of
    every rank are all-gathered (padded to the longest), summed per index and divided by
    ``world``. Every rank ends with the same coalesced gradient. A rank where a parameter has
    no gradient takes part with no rows; a parameter without one on every rank keeps none.
    Every rank must call this with the same parameters in the same order.
    """
    if world == 1 or not params:
        return
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            g = torch.sparse_coo_tensor(
                torch.empty(1, 0, dtype=torch.long, device=p.device),
                torch.empty(0, *p.shape[1:], dtype=p.dtype, device=p.device),
                p.shape,
                check_invariants=False,
            )
        elif not g.is_sparse:
            raise ValueError("all_reduce_sparse_grads: a parameter has a dense gradient")
        grads.append(g.coalesce())
    counts = torch.tensor([g._nnz() for g in grads], device=params[0].device)  # (P,)
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts, group=group)
    per_rank = torch.stack(gathered).tolist()  # world × P
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        sizes = [row[i] for row in per_rank]
        if max(sizes) == 0:
            continue
        idx, val = g._indices(), g._values()  # (S, n), (n, ...)
        pad = max(sizes) - idx.shape[1]
        idx = torch.cat([idx, idx.new_zeros(idx.shape[0], pad)], 1)
        val = torch.cat([val, val.new_zeros(pad, *val.shape[1:])])
        idxs = [torch.empty_like(idx) for _ in range(world)]
        vals = [torch.empty_like(val) for _ in range(world)]
        dist.all_gather(idxs, idx, group=group)
        dist.all_gather(vals, val, group=group)
        indices = torch.cat([t[:, :n] for t, n in zip(idxs, sizes, strict=True)], 1)
        values = torch.cat([t[:n] for t, n in zip(vals, sizes, strict=True)])
        summed = torch.sparse_coo_tensor(indices, values, p.shape, check_invariants=False).coalesce()
        p.grad = summed / world


def sparse_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Weights of the embedding tables that produce sparse gradients (``nn.Embedding(sparse=True)``)."""
    return [m.weight for m in module.modules() if isinstance(m, nn.Embedding) and m.sparse and m.weight.requires_grad]


def param_groups(
    module: nn.Module, weight_decay: float, lr: float | None = None, lr_scales: Mapping[str, float] | None = None
) -> list[dict]:
    """AdamW groups: decay on Linear weights only; sparse-gradient tables are left out (SparseAdam's).

    Args:
        module: the trained module.
        weight_decay: decay of the Linear weights.
        lr: the base learning rate (needed with ``lr_scales``).
        lr_scales: {parameter-name prefix: factor}: parameters under a prefix learn at
            ``lr × factor`` (the first matching prefix wins), in groups of their own.
    """
    sparse = {id(p) for p in sparse_parameters(module)}
    scales = dict(lr_scales or {})
    if scales and lr is None:
        raise ValueError("param_groups: lr_scales needs the base lr")
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for mod_name, mod in module.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in sparse:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            scale = next((f for prefix, f in scales.items() if full.startswith(prefix)), 1.0)
            decay = isinstance(mod, nn.Linear) and name == "weight"
            groups.setdefault((scale, decay), []).append(p)
    out = []
    for (scale, decay), params in groups.items():
        group: dict = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if scale != 1.0:
            group["lr"] = lr * scale
        out.append(group)
    return out


def to_device(value: object, device: torch.device) -> object:
    """Tensors of a batch (also inside nested dicts) moved to ``device``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def count_tokens(batch: Batch) -> int:
    """Real sequence positions of a batch: its ``pad_mask``, or its ``seq``'s (ranking batches)."""
    mask = batch.get("pad_mask")
    if mask is None and isinstance(batch.get("seq"), dict):
        mask = batch["seq"].get("pad_mask")
    return int(mask.sum()) if isinstance(mask, torch.Tensor) else 0


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale gradients (dense and sparse) so that their global L2 norm is ≤ ``max_norm``; returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    for i, g in enumerate(grads):
        if g.is_sparse and not g.is_coalesced():  # repeated rows must be summed before the norm
            grads[i] = g.coalesce()
    norms = [(g._values() if g.is_sparse else g).detach().float().norm() for g in grads]
    total = torch.stack(norms).norm()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p, g in zip([p for p in params if p.grad is not None], grads, strict=True):
        p.grad = g.mul_(coef) if not g.is_sparse else g * coef
    return float(total)


class Trainer:
    """Train ``model`` with ``objective`` on ``batch_fn(step)`` batches.

    Args:
        model: the network (e.g. :class:`training.model.backbone.PinFM`).
        objective: module with ``forward(model, batch) -> (loss, stats)``.
        batch_fn: global batch of a step, a pure function of the step.
        cfg: settings.
        run_dir: where checkpoints and logs go (None = nothing written, no resume).
        evaluate: ``evaluate(model) -> dict`` on validation data, or None.
        select_metric: key of ``evaluate``'s dict to maximise for ``best.pt`` / early stopping.
        resume: continue from ``run_dir/checkpoint.pt`` when it exists.
        lr_scales: {parameter-name prefix: factor} for parts that learn slower or faster
            (names as in ``LossModule``: ``model.…`` and ``objective.…``), e.g. a pretrained
            backbone under a new head: ``{"model.backbone.": 0.1}``.

    Example:
        >>> trainer = Trainer(model, objective, batches, TrainerConfig(steps=200), run_dir=Path("run"))
        >>> result = trainer.fit()
    """

    def __init__(
        self,
        model: nn.Module,
        objective: nn.Module,
        batch_fn: Callable[[int], Batch],
        cfg: TrainerConfig,
        run_dir: Path | None = None,
        evaluate: Callable[[nn.Module], dict] | None = None,
        select_metric: str | None = None,
        resume: bool = True,
        lr_scales: Mapping[str, float] | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world = distributed_env()
        self.device = resolve_device(cfg.device)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
            if self.device.type == "cuda":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                self.device = torch.device(f"cuda:{local}")
                torch.cuda.set_device(self.device)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        self.objective = objective.to(self.device)
        self.module = LossModule(self.model, self.objective)
        self.train_module: nn.Module = self.module
        self.sparse_params = sparse_parameters(self.module)
        self.shards: RowShards | None = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # the trainer's own collectives (gathered rows, sparse gradients, checks) on a group of
            # their own, so that their order never interleaves with DDP's bucket all-reduces
            self.shards = RowShards(self.rank, self.world, dist.new_group())
            ids = {id(p) for p in self.sparse_params}
            ignored = [name for name, p in self.module.named_parameters() if id(p) in ids]
            # DDP would all-reduce them densely (or refuse them): all_reduce_sparse_grads does it
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.module, ignored)
            for p in self.sparse_params:  # DDP broadcasts rank 0's values of the parameters it keeps
                dist.broadcast(p.data, 0, group=self.shards.group)
            dev = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.module, device_ids=dev, find_unused_parameters=True)
            if not hasattr(self.objective, "loss_from_hidden"):
                log.warning(
                    "%s: %s has no loss_from_hidden: each rank scores its own rows and the ranks' losses are "
                    "averaged (the whole batch's loss only when it is a mean over equal shares of rows)",
                    cfg.desc, type(self.objective).__name__,
                )  # fmt: skip
        self.batch_fn = batch_fn
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.evaluate = evaluate
        self.select_metric = select_metric
        self.resume = resume
        self._best: dict | None = None
        betas = (0.9, cfg.adam_beta2)  # shared by both Adams
        self.opt = torch.optim.AdamW(
            param_groups(self.module, cfg.weight_decay, cfg.lr, lr_scales),
            lr=cfg.lr,
            betas=betas,
            fused=self.device.type in ("cpu", "cuda"),
        )
        # tables with sparse gradients: lazy Adam, which updates only the rows a step touched
        sparse = self.sparse_params
        self.sparse_opt = (
            torch.optim.SparseAdam(sparse, lr=cfg.lr * cfg.sparse_lr_scale, betas=betas) if sparse else None
        )
        self.opts = [self.opt] + ([self.sparse_opt] if self.sparse_opt is not None else [])

        def lr_factor(s: int) -> float:
            return warmup_cosine(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio)

        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in self.opts]
        self.sched = self.scheds[0]

    # ------------------------------------------------------------------ files
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _path(self, name: str) -> Path | None:
        return self.run_dir / name if self.run_dir is not None else None

    def _save(self, name: str, obj: dict) -> None:
        path = self._path(name)
        if path is None or not self.is_main:
            return
        save_atomic(obj, path)

    def _log(self, record: dict) -> None:
        path = self._path("metrics.jsonl")
        if path is None or not self.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def _trim_log(self, step: int) -> None:
        """Drop metric lines written after the checkpoint a run resumes from."""
        path = self._path("metrics.jsonl")
        if path is None or not path.exists() or not self.is_main:
            return
        keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def _state(self, step: int, result: TrainResult, since_best: int) -> dict:
        state = {
            "step": step,
            "module": self.module.state_dict(),
            "opt": [o.state_dict() for o in self.opts],
            "sched": [s.state_dict() for s in self.scheds],
            "rng": torch.get_rng_state(),
            "result": dataclasses.asdict(result),
            "since_best": since_best,
            "config": self.cfg.to_dict(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _restore(self) -> tuple[int, TrainResult, int]:
        path = self._path("checkpoint.pt")
        if not self.resume or path is None or not path.exists():
            return 0, TrainResult(steps=0, losses=[]), 0
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["config"]["steps"] != self.cfg.steps:
            raise ValueError(
                f"{path} was written by a run of {state['config']['steps']} steps, this run has {self.cfg.steps}: "
                "resume with the same settings, or use a new run directory"
            )
        self.module.load_state_dict(state["module"])
        opts, scheds = state["opt"], state["sched"]
        if isinstance(opts, dict):  # checkpoints written before sparse tables had their own optimizer
            opts, scheds = [opts], [scheds]
        if len(opts) != len(self.opts):
            raise ValueError(
                f"{path} holds {len(opts)} optimizer states, this run has {len(self.opts)} "
                "(sparse_item_grads changed?): resume with the same settings, or use a new run directory"
            )
        for o, st in zip(self.opts, opts, strict=True):
            o.load_state_dict(st)
        for sc, st in zip(self.scheds, scheds, strict=True):
            sc.load_state_dict(st)
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        result = TrainResult(**state["result"])
        result.resumed_from = state["step"]
        self._trim_log(state["step"])
        log.info("%s: resumed from %s at step %d", self.cfg.desc, path, state["step"])
        return state["step"], result, state["since_best"]

    # ------------------------------------------------------------------ loop
    def _device_batch(self, batch: Batch) -> Batch:
        """The whole batch on the device (under torchrun every rank holds it; the module takes its rows)."""
        if self.world > 1 and any(isinstance(v, dict) for v in batch.values()):
            raise ValueError(f"{self.cfg.desc}: a batch of nested groups cannot be split across DDP ranks")
        return to_device(batch, self.device)

    def _rng_seed(self, step: int) -> int:
        """Seed of this rank's dropout stream at ``step`` (a pure function of seed, step and rank)."""
        return int(np.random.SeedSequence([self.cfg.seed, step, self.rank]).generate_state(1, np.uint64)[0] >> 1)

    def step_gradients(self, step: int) -> tuple[torch.Tensor, dict, Batch]:
        """Forward and backward of step ``step``'s batch: leaves the gradient of the whole batch's
        loss in ``.grad`` (averaged over the ranks under torchrun; not clipped, no optimizer step).

        Returns:
            (loss, stats, the batch on the device).
        """
        batch = self._device_batch(self.batch_fn(step))
        extra = {} if self.shards is None else {"shards": self.shards, "rng_seed": self._rng_seed(step)}
        with self._autocast():
            loss, stats = self.train_module(batch, **extra)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        if self.shards is not None:
            all_reduce_sparse_grads(self.sparse_params, self.world, self.shards.group)
        return loss, stats, batch

    def _loss_value(self, loss: torch.Tensor) -> float:
        """The step's loss: the whole batch's (every rank holds it), or the ranks' mean for a per-row objective."""
        value = loss.detach().float()
        if self.shards is not None and not hasattr(self.objective, "loss_from_hidden"):
            value = value.clone()
            dist.all_reduce(value, group=self.shards.group)
            value = value / self.world
        return float(value)

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _run_eval(self, step: int, result: TrainResult, since_best: int) -> tuple[int, bool]:
        """Evaluate, keep the best weights; returns (evals since best, stop?)."""
        if self.evaluate is None:
            return since_best, False
        self.model.eval()
        with torch.no_grad(), self._autocast():
            scores = self.evaluate(self.model)
        self.model.train()
        record = {"step": step, "eval": scores}
        log.info("%s: step %d eval %s", self.cfg.desc, step, " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        result.evals.append(record)
        self._log(record)
        if self.select_metric is None:
            return since_best, False
        value = float(scores[self.select_metric])
        if result.best_metric is None or value > result.best_metric:
            result.best_metric, result.best_step = value, step
            self._best = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
            self._save("best.pt", {"step": step, "module": self._best, "eval": scores})
            return 0, False
        since_best += 1
        return since_best, bool(self.cfg.patience and since_best >= self.cfg.patience)

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to ``cfg.steps`` (or resume and finish); ``stop_after`` halts after that step
        as a crash would (after the checkpoint of that step, if one is due)."""
        cfg = self.cfg
        start, result, since_best = self._restore()
        if start == 0:
            self._trim_log(0)  # a fresh run (or --fresh) starts its metrics log empty
        t0 = time.perf_counter() - result.seconds
        self.model.train()
        bar = tqdm(
            range(start, cfg.steps),
            desc=cfg.desc,
            unit="step",
            disable=None if self.is_main and cfg.progress_bar else True,
        )
        for step in bar:
            loss, stats, batch = self.step_gradients(step)
            if cfg.grad_clip:  # every rank holds the same averaged gradients: the norm is the global one
                clip_grad_norm(list(self.module.parameters()), cfg.grad_clip)
            for o in self.opts:
                o.step()
            for sc in self.scheds:
                sc.step()
            done = step + 1
            loss_value = self._loss_value(loss)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{cfg.desc}: loss became {loss_value} at step {done}; lower the lr")
            result.losses.append(loss_value)
            result.steps = done
            result.tokens += count_tokens(batch)  # the whole batch's, on every rank
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                self._log({"step": done, "loss": loss_value, "lr": self.sched.get_last_lr()[0], **stats})
            stop = False
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                since_best, stop = self._run_eval(done, result, since_best)
            result.seconds = time.perf_counter() - t0
            if stop:
                result.stopped_early = True
                log.info("%s: no better %s in %d evaluations, stopping at step %d", cfg.desc, self.select_metric,
                         since_best, done)  # fmt: skip
            if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps or stop:
                self._save("checkpoint.pt", self._state(done, result, since_best))
            if stop or (stop_after is not None and done >= stop_after):
                break
        result.seconds = time.perf_counter() - t0
        result.world_size = self.world
        if self.world > 1:
            result.ranks_in_sync = self._ranks_in_sync()
            if not result.ranks_in_sync:
                raise RuntimeError(f"{cfg.desc}: DDP ranks ended with different weights; gradients were not averaged")
        if self.is_main and self.run_dir is not None:
            plot_training_curve(self.run_dir)
        return result

    def _ranks_in_sync(self) -> bool:
        """True when every rank holds the same weights (each parameter's sum and sum of squares compared)."""
        sums = [s for p in self.module.parameters() for x in [p.detach().double()] for s in (x.sum(), x.square().sum())]
        mine = torch.stack(sums)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine, group=self.shards.group if self.shards is not None else None)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def load_best(self) -> None:
        """Load ``best.pt`` weights into the model (no-op when no evaluation ran)."""
        if self._best is not None:
            self.module.load_state_dict(self._best)
            return
        path = self._path("best.pt")
        if path is not None and path.exists():
            self.module.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["module"])


def plot_training_curve(run_dir: Path) -> Path | None:
    """``run_dir/training_curve.png`` from ``metrics.jsonl``: loss per step, and evals when present."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    n = 2 if evals else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.5), squeeze=False)
    if losses:
        axes[0][0].plot(*zip(*losses, strict=True))
    axes[0][0].set(xlabel="step", ylabel="training loss", title="loss")
    if evals:
        keys = [k for k in evals[0][1] if k.startswith(("ndcg@10", "hr@10", "mrr"))] or list(evals[0][1])[:3]
        for k in keys:
            axes[0][1].plot([s for s, _ in evals], [e[k] for _, e in evals], marker="o", label=k)
        axes[0][1].set(xlabel="step", title="validation")
        axes[0][1].legend()
    fig.tight_layout()
    out = Path(run_dir) / "training_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
