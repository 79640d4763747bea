"""One training loop for pretraining, the benchmark and fine-tuning: AdamW, warm-up + cosine,
clipping, bf16 autocast on GPU, checkpoints with exact resume, validation with early stopping, DDP.

The loop never owns data state: ``batch_fn(step)`` must return the global batch of a step
as a pure function of the step (see :class:`training.bench.seqrec.SeqRecBatches`). Together with
the saved RNG, optimizer and scheduler state this makes a resumed run take exactly the
steps (and losses) of an uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes rows ``rank::world`` of every
batch and gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on GPU);
only rank 0 writes files.

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

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from features.settings import Settings
from training.model.backbone import resolve_device

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


class LossModule(nn.Module):
    """backbone + objective as one module, so DDP sees every parameter in one forward."""

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        return self.objective(self.model, batch)


def distributed_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not launched by it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


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
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.module, device_ids=ids, find_unused_parameters=True)
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
        sparse = sparse_parameters(self.module)
        if sparse and self.world > 1 and self.device.type == "cuda":
            raise ValueError("sparse_item_grads is not supported by DDP on NCCL: set it to False for multi-GPU runs")
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
    def _shard(self, batch: Batch) -> Batch:
        """This rank's rows of a flat batch (rows ``rank::world``), on the device."""
        if self.world > 1:
            if any(isinstance(v, dict) for v in batch.values()):
                raise ValueError(f"{self.cfg.desc}: a batch of nested groups cannot be split across DDP ranks")
            b = batch["item_ids"].shape[0]
            batch = {
                k: v[self.rank :: self.world] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v
                for k, v in batch.items()
            }
        return to_device(batch, self.device)

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
            batch = self._shard(self.batch_fn(step))
            with self._autocast():
                loss, stats = self.train_module(batch)
            for o in self.opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                clip_grad_norm(list(self.module.parameters()), cfg.grad_clip)
            for o in self.opts:
                o.step()
            for sc in self.scheds:
                sc.step()
            done = step + 1
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{cfg.desc}: loss became {loss_value} at step {done}; lower the lr")
            result.losses.append(loss_value)
            result.steps = done
            result.tokens += count_tokens(batch) * self.world
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
        """True when every rank holds the same weights (sum and sum of squares compared)."""
        flat = torch.cat([p.detach().double().reshape(-1) for p in self.module.parameters()])
        mine = torch.stack([flat.sum(), flat.square().sum()]).cpu()
        if self.device.type == "cuda":
            mine = mine.to(self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
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
