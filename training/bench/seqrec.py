"""Sequential-recommendation benchmark of the PinFM backbone on a ``user item`` file.

Leave-one-out split (the published protocol): per user, the last item is the test target,
the second-to-last the validation target, the rest is training. Training predicts every
next item of the training part; the validation target picks the best step; the test target
is scored once, at the end, with the best weights.

``afm bench seqrec --data beauty.txt`` → :func:`run_seqrec_bench` → one JSON line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from features.contract import ACTION_IDS, SURFACE_IDS, ContractError
from features.settings import Settings
from training.model.backbone import PinFM, PinFMConfig, device_name, last_hidden, resolve_device
from training.model.objectives import ItemCatalog, ObjectiveConfig, PinFMObjective, temperature_from_log
from training.model.recipes import PINFM
from training.retrieval import DEFAULT_KS, ranks_full_excluding, ranks_sampled, retrieval_metrics
from training.trainer import Trainer, TrainerConfig, TrainResult

log = logging.getLogger(__name__)

#: every line of a ``user item`` file is one positive action of this kind
SEQREC_ACTION = ACTION_IDS["click"]
SEQREC_SURFACE = SURFACE_IDS["home"]


# --------------------------------------------------------------------------- data
def write_chain_file(path: Path, n_users: int = 240, n_items: int = 120, seed: int = 0) -> Path:
    """A small synthetic ``user item`` file for tests and smoke runs (what :meth:`SeqRecData.load` reads).

    Each user starts at a random item and mostly steps to the next id (mod ``n_items``): 85 % of
    steps go to ``item + 1``, the rest to a random item, so the next item is predictable from
    the last one and a sequence model must beat popularity by far.
    """
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, n_users + 1):
        cur = int(rng.integers(1, n_items + 1))
        for _ in range(int(rng.integers(5, 14))):
            lines.append(f"{u} {cur}")
            cur = cur % n_items + 1 if rng.random() < 0.85 else int(rng.integers(1, n_items + 1))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class SeqRecData:
    """Per-user chronological item sequences (item ids ≥ 1) and the leave-one-out split.

    Attributes:
        user_ids: (U,) original user ids.
        sequences: U arrays of item ids, oldest first.
        n_items: largest item id (items are 1 … n_items).
    """

    user_ids: np.ndarray
    sequences: list[np.ndarray]
    n_items: int

    @classmethod
    def load(cls, path: Path | str) -> SeqRecData:
        """Read a SASRec/BERT4Rec ``user item`` file (lines chronological per user, ids ≥ 1).

        Raises:
            ContractError: a line is not two integers, or an id is < 1.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"seqrec data file {path} does not exist")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # an empty file: reported below
                arr = np.loadtxt(path, dtype=np.int64, ndmin=2, usecols=(0, 1))
        except ValueError as exc:
            raise ContractError(f"{path}: expected lines of 'user item' integers ({exc})") from exc
        if arr.size == 0:
            raise ContractError(f"{path} has no interactions")
        if (arr < 1).any():
            bad = int(np.flatnonzero((arr < 1).any(1))[0]) + 1
            raise ContractError(f"{path}, line {bad}: user and item ids must be ≥ 1")
        users, items = arr[:, 0], arr[:, 1]
        order = np.argsort(users, kind="stable")  # keeps each user's chronological order
        users, items = users[order], items[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        seqs = np.split(items, starts[1:])
        return cls(users[starts], seqs, int(items.max()))

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def train_sequences(self) -> list[np.ndarray]:
        """Training part of each user: all but the last two items (users with < 3 items keep all)."""
        return [s[:-2] if len(s) >= 3 else s for s in self.sequences]

    def eval_users(self) -> np.ndarray:
        """Users with a validation and a test target (≥ 3 items)."""
        return np.flatnonzero(np.array([len(s) >= 3 for s in self.sequences]))

    def split(self, part: str) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
        """(histories, targets, excluded items) of the eval users for ``part`` = 'valid' or 'test'.

        The history of 'valid' is the training part; of 'test', training + the validation
        item. Excluded items = every other item the user interacted with (history + the
        other held-out item), which the full-ranking protocol removes from the ranking.
        """
        if part not in ("valid", "test"):
            raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
        users = self.eval_users()
        cut = -2 if part == "valid" else -1
        hist = [self.sequences[u][:cut] for u in users]
        targets = np.array([self.sequences[u][cut] for u in users], dtype=np.int64)
        excluded = [self.sequences[u] for u in users]  # the ranks_full* functions keep the target in the ranking
        return hist, targets, excluded


def pad_right(seqs: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Newest ``max_len`` items of each sequence, right padded with 0 → (items (B, L), lengths (B,))."""
    clipped = [s[-max_len:] for s in seqs]
    lengths = np.array([len(s) for s in clipped], dtype=np.int64)
    out = np.zeros((len(seqs), max(1, int(lengths.max(initial=1)))), dtype=np.int64)
    for i, s in enumerate(clipped):
        out[i, : len(s)] = s
    return out, lengths


def seq_batch(items: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor]:
    """Backbone batch of a right-padded (B, L) item matrix: one action/surface for all tokens."""
    ids = torch.from_numpy(items)  # (B, L)
    pad = ids != 0  # (B, L)
    return {
        "item_ids": ids,
        "action_ids": pad.long() * SEQREC_ACTION,
        "surface_ids": pad.long() * SEQREC_SURFACE,
        "pad_mask": pad,
        "positive": pad.clone(),
        "lengths": torch.from_numpy(lengths),
    }


class SeqRecBatches:
    """Training batches as a pure function of the step (so a resumed run sees the same data).

    Each epoch shuffles the users (seeded by the epoch), sorts chunks of 64 batches by
    length so a batch pads little, and shuffles the batch order. Rows are the newest
    ``max_len + 1`` training items (``max_len`` items of context for the last target).

    Args:
        train: training sequences (users with < 2 items are skipped).
        batch_size: rows per batch.
        max_len: context length of the benchmark (the model has ``max_len + 1`` positions).
        seed: shuffling seed.
    """

    def __init__(self, train: list[np.ndarray], batch_size: int, max_len: int, seed: int = 0) -> None:
        self.seqs = [s[-(max_len + 1) :] for s in train if len(s) >= 2]
        if not self.seqs:
            raise ValueError("no training sequence has 2 or more items; nothing to learn from")
        self.batch_size = batch_size
        self.max_len = max_len
        self.seed = seed
        self.lengths = np.array([len(s) for s in self.seqs])
        self.per_epoch = math.ceil(len(self.seqs) / batch_size)

    @lru_cache(maxsize=2)  # noqa: B019 — one object per run; caches the current epoch's plan
    def _epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.seqs))
        chunk = self.batch_size * 64
        batches = []
        for c in range(0, len(perm), chunk):
            part = perm[c : c + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        rows = self._epoch(step // self.per_epoch)[step % self.per_epoch]
        items, lengths = pad_right([self.seqs[i] for i in rows], self.max_len + 1)
        return seq_batch(items, lengths)


# --------------------------------------------------------------------------- eval
@torch.no_grad()
def user_states(model: PinFM, histories: list[np.ndarray], max_len: int, batch_size: int = 1024) -> torch.Tensor:
    """(U, D) hidden state at the last item of each history (newest ``max_len`` items)."""
    device = next(model.parameters()).device
    order = np.argsort([len(h) for h in histories], kind="stable")  # similar lengths together
    out = torch.empty(len(histories), model.cfg.d_model, device=device)
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        items, lengths = pad_right([histories[r] for r in rows], max_len)
        b = {k: v.to(device) for k, v in seq_batch(items, lengths).items()}
        hidden = model(b["item_ids"], b["action_ids"], b["surface_ids"])  # (B, L, D)
        out[torch.as_tensor(rows, device=device)] = last_hidden(hidden, b["pad_mask"]).float()
    return out


@torch.no_grad()
def catalog_embeddings(model: PinFM, n_items: int, similarity: str) -> torch.Tensor:
    """(n_items + 1, D) embedding of items 0 … n_items (row 0 = padding), normalized for cosine."""
    device = next(model.parameters()).device
    emb = model.item_embedding(torch.arange(n_items + 1, device=device)).float()
    return torch.nn.functional.normalize(emb, dim=-1) if similarity == "cosine" else emb


def evaluate_retrieval(model: PinFM, *args: Any, ks: tuple[int, ...] = DEFAULT_KS, **kwargs: Any) -> dict:
    """HR/NDCG@ks and MRR of the targets :func:`retrieval_ranks` ranks (same arguments)."""
    return retrieval_metrics(retrieval_ranks(model, *args, **kwargs), ks)


@torch.no_grad()
def retrieval_ranks(
    model: PinFM,
    data: SeqRecData,
    part: str,
    max_len: int,
    similarity: str = "cosine",
    protocol: str = "full",
    users: np.ndarray | None = None,
    seed: int = 0,
    chunk: int = 512,
) -> torch.Tensor:
    """(U,) 0-based rank of each eval user's ``part`` ('valid'/'test') target under ``protocol``.

    Args:
        model: backbone (put in eval mode here).
        data: the sequences.
        part: which target.
        max_len: history length the model reads.
        similarity: how the model scores items ('cosine' or 'dot'; cosine ranks like its logits).
        protocol: 'full' (all items, the user's other items removed) or 'sampled100'
            (100 uniform negatives the user never interacted with, seeded).
        users: indices into the eval users to score (None = all).
        seed: seed of the sampled negatives.
        chunk: users scored per matrix product.
    """
    states, items = scoring_vectors(model, data, part, max_len, similarity, users)
    return ranks_of_vectors(states, items, data, part, protocol, users, seed, chunk)


@torch.no_grad()
def scoring_vectors(
    model: PinFM,
    data: SeqRecData,
    part: str,
    max_len: int,
    similarity: str,
    users: np.ndarray | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """User states (U, D) and catalog embeddings (I + 1, D) whose dot products are the model's logits.

    ``states[u] @ items[i]`` is the similarity divided by ``temperature``, so the vectors of
    several models, concatenated, score items by the sum of their logits (an ensemble).
    """
    was_training = model.training
    model.eval()
    hist, _, _ = data.split(part)
    if users is not None:
        hist = [hist[i] for i in users]
    states = user_states(model, hist, max_len)  # (U, D)
    if similarity == "cosine":
        states = torch.nn.functional.normalize(states, dim=-1)
    items = catalog_embeddings(model, data.n_items, similarity)  # (I + 1, D)
    if was_training:
        model.train()
    return states / temperature, items


@torch.no_grad()
def ranks_of_vectors(
    states: torch.Tensor,
    items: torch.Tensor,
    data: SeqRecData,
    part: str,
    protocol: str = "full",
    users: np.ndarray | None = None,
    seed: int = 0,
    chunk: int = 512,
) -> torch.Tensor:
    """(U,) 0-based rank of each target when user u scores item i by ``states[u] @ items[i]``.

    Arguments as :func:`retrieval_ranks`; ``states`` and ``items`` from :func:`scoring_vectors`.
    """
    if protocol not in ("full", "sampled100"):
        raise ValueError(f"protocol must be 'full' or 'sampled100', got {protocol!r}")
    _, targets, excluded = data.split(part)
    if users is not None:
        targets, excluded = targets[users], [excluded[i] for i in users]
    if states.shape[0] != len(targets):
        raise ValueError(f"{states.shape[0]} user states for {len(targets)} eval users")
    device = states.device
    rng = np.random.default_rng(seed)
    ranks = []
    for i in range(0, len(targets), chunk):
        q = states[i : i + chunk]  # (C, D)
        tgt = torch.as_tensor(targets[i : i + chunk], device=device)  # (C,)
        if protocol == "full":
            scores = q @ items.T  # (C, I + 1)
            seen = excluded[i : i + chunk]
            counts = np.array([len(x) for x in seen])
            rows = np.concatenate([np.arange(len(seen)), np.repeat(np.arange(len(seen)), counts)])
            cols = np.concatenate([np.zeros(len(seen), dtype=np.int64), *seen])  # padding (0) is no item
            as_idx = partial(torch.as_tensor, dtype=torch.int64, device=device)
            ranks.append(ranks_full_excluding(scores, tgt, as_idx(rows), as_idx(cols)))
        else:
            negs = np.stack(
                [_sample_unseen(rng, data.n_items, set(seen.tolist()), 100) for seen in excluded[i : i + chunk]]
            )
            neg_emb = items[torch.as_tensor(negs, device=device)]  # (C, 100, D)
            neg_scores = torch.einsum("cd,cmd->cm", q, neg_emb)  # (C, 100)
            ranks.append(ranks_sampled((q * items[tgt]).sum(-1), neg_scores))
    return torch.cat(ranks)  # (U,)


def _sample_unseen(rng: np.random.Generator, n_items: int, seen: set[int], k: int) -> np.ndarray:
    """k distinct items in 1 … n_items that are not in ``seen`` (uniform, without replacement).

    Raises:
        ValueError: fewer than k such items exist.
    """
    if n_items - len({i for i in seen if 1 <= i <= n_items}) < k:
        raise ValueError(f"the sampled protocol needs {k} items the user never interacted with; {n_items} items in all")
    out: list[int] = []
    taken = set(seen)
    while len(out) < k:
        for c in rng.integers(1, n_items + 1, size=2 * k).tolist():
            if c not in taken and len(out) < k:
                out.append(c)
                taken.add(c)
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------- bench
class SeqRecConfig(Settings):
    """Benchmark settings (defaults: the CPU configuration reported in the README).

    The objective, the optimiser and the item embedding are the ``pinfm`` recipe's
    (:data:`training.model.recipes.PINFM`, where they were measured); the rest is the size.

    Attributes:
        max_len: history length (the published protocol uses 50).
        d_model, n_layers, n_heads, dropout: backbone size.
        item_dropout: training only, leave a whole input item out with this probability.
        mlp_ratio: hidden width of each block's MLP in multiples of d_model.
        block_layout: ``pre_ln`` (GPT-2's block) or ``sasrec`` (SASRec's; see training.model.backbone.Block).
        n_hash_tables, hash_buckets: the hashed item embedding (buckets per sub-table).
        sparse_item_grads: update only the looked-up hash rows (SparseAdam); a step then costs
            the same whatever the table size.
        scale_item_input: multiply the item part of the input tokens by √d_model (as SASRec does).
        objective: losses and negatives.
        batch_size, lr, weight_decay, warmup: optimisation.
        adam_beta2: second-moment decay of the Adams.
        sparse_lr_scale: lr of the hash tables (lazy Adam) relative to ``lr``.
        epochs: passes over the training users.
        eval_every_epochs: validation frequency (early stopping on NDCG@10).
        eval_users: validate on this many users (a fixed random subset; 0 = all); the test uses all.
        patience: evaluations without improvement before stopping (0 = never stop early).
        device, seed.
    """

    max_len: int = 50
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.5
    item_dropout: float = 0.0
    mlp_ratio: int = 4
    block_layout: str = "pre_ln"
    n_hash_tables: int = PINFM.n_hash_tables
    hash_buckets: int = PINFM.hash_buckets
    sparse_item_grads: bool = PINFM.sparse_item_grads
    scale_item_input: bool = PINFM.scale_item_input
    objective: ObjectiveConfig = Field(default_factory=lambda: PINFM.objective)
    batch_size: int = 256
    lr: float = PINFM.lr
    weight_decay: float = PINFM.weight_decay
    adam_beta2: float = PINFM.adam_beta2
    sparse_lr_scale: float = 1.0
    warmup: int = 200
    epochs: int = 30
    eval_every_epochs: int = 3
    eval_users: int = 0
    patience: int = 3
    device: str = "auto"
    seed: int = 0

    retired_fields: ClassVar[dict[str, object]] = {
        "full_softmax_epochs": 0,  # the warm start of commit d1b2f19
        "distill_start_epoch": 1,  # codistillation, removed in the commit after 66e15b0 (beauty-ensembles.md)
    }

    def check(self) -> None:
        for name in ("max_len", "batch_size", "epochs", "eval_every_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def backbone_config(self) -> PinFMConfig:
        return PinFMConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            max_len=self.max_len + 1,
            n_hash_tables=self.n_hash_tables,
            hash_buckets=self.hash_buckets,
            dropout=self.dropout,
            item_dropout=self.item_dropout,
            mlp_ratio=self.mlp_ratio,
            block_layout=self.block_layout,
            sparse_item_grads=self.sparse_item_grads,
            scale_item_input=self.scale_item_input,
        )

    @classmethod
    def preset(cls, name: str) -> SeqRecConfig:
        """``default``: the CPU configuration of the README; ``tiny``: tests (seconds).

        ``tiny`` is the recipe at test scale (64 negatives, 2 × 4,096 buckets, 6 epochs) with a
        higher lr (5e-3): its runs last a few dozen steps.
        """
        presets = {
            "default": cls(),
            "tiny": cls(
                d_model=32, n_heads=2, n_layers=1, dropout=0.1, hash_buckets=4096, batch_size=32, epochs=6,
                eval_every_epochs=2, warmup=10, lr=5e-3, patience=0, eval_users=0,
                objective=PINFM.objective_config(negatives=64),
            ),
        }  # fmt: skip
        if name not in presets:
            raise ValueError(f"unknown seqrec preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]

    @classmethod
    def upgrade_saved(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Runs saved before ``scale_item_input`` existed did not scale."""
        return {"scale_item_input": False, **d}


#: best published numbers per (file, protocol, max_len): Klenitskiy & Vasilev, RecSys 2023
PUBLISHED = {
    ("beauty.txt", "full", 50): {
        "SASRec (full softmax)": {"hr@10": 0.0533, "ndcg@10": 0.0327},
        "BERT4Rec": {"hr@10": 0.0338, "ndcg@10": 0.0187},
        "SASRec (BCE)": {"hr@10": 0.0246, "ndcg@10": 0.0126},
    }
}
BEST_PUBLISHED = "SASRec (full softmax)"


def bench_figures(data_path: Path | str, data: SeqRecData, protocol: str, max_len: int, test: dict) -> dict:
    """The leading fields of a benchmark line: the data, the protocol, the test metrics, the sizes."""
    return {
        "data": Path(data_path).name,
        "protocol": protocol,
        "max_len": max_len,
        **{k: round(v, 5) for k, v in test.items() if k != "n"},
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_eval_users": test["n"],
    }


def published_comparison(data_path: Path | str, protocol: str, max_len: int, test: dict) -> dict:
    """``published``, ``ratio`` (test NDCG@10 ÷ the best published; what the bench is judged by) and
    ``beats_published`` for a file and protocol with published numbers; else {}."""
    published = PUBLISHED.get((Path(data_path).name, protocol, max_len))
    if not published:
        return {}
    ref = published[BEST_PUBLISHED]
    return {
        "published": {"model": BEST_PUBLISHED, **ref},
        "ratio": round(test["ndcg@10"] / ref["ndcg@10"], 3),
        "beats_published": bool(test["ndcg@10"] >= ref["ndcg@10"] and test["hr@10"] >= ref["hr@10"]),
    }


@dataclass(frozen=True)
class SeqRecMember:
    """A finished ``afm bench seqrec`` run: best-validation model, settings, learned temperature."""

    model: PinFM
    cfg: SeqRecConfig
    temperature: float
    run_dir: Path


def load_seqrec_member(run_dir: Path | str, device: str = "auto") -> SeqRecMember:
    """The best validation weights, settings and logit temperature of a finished run."""
    run_dir = Path(run_dir)
    cfg_path, best = run_dir / "seqrec_config.json", run_dir / "best.pt"
    for p in (cfg_path, best):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: is {run_dir} the --run-dir of a finished 'afm bench seqrec'?")
    cfg = SeqRecConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    model = PinFM(cfg.backbone_config())
    state = torch.load(best, map_location="cpu", weights_only=False)["module"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    temperature = float(temperature_from_log(state["objective.log_temp"]))  # as PinFMObjective.temperature
    return SeqRecMember(model.to(resolve_device(device)).eval(), cfg, temperature, run_dir)


def _is_main_process() -> bool:
    """Whether this process is rank 0 (or the only process): only it writes the run's JSON files."""
    return int(os.environ.get("RANK", "0")) == 0


def _write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON (values JSON cannot hold as their ``str``)."""
    path.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")


def _training_catalog(data: SeqRecData, train: list[np.ndarray]) -> ItemCatalog:
    """Items 1 … n_items with their counts in the training sequences."""
    counts = np.bincount(np.concatenate(train), minlength=data.n_items + 1)[1:]  # (n_items,)
    return ItemCatalog(np.arange(1, data.n_items + 1), counts)


def _validation_users(data: SeqRecData, cfg: SeqRecConfig) -> np.ndarray | None:
    """Sorted indices of ``cfg.eval_users`` random eval users (seeded by ``cfg.seed``); None = all."""
    if cfg.eval_users and cfg.eval_users < len(data.eval_users()):
        return np.sort(np.random.default_rng(cfg.seed).choice(len(data.eval_users()), cfg.eval_users, replace=False))
    return None


def _trainer_config(cfg: SeqRecConfig, per_epoch: int, desc: str, progress_bar: bool) -> TrainerConfig:
    """Trainer settings of the benchmark: a checkpoint every epoch, validation every ``eval_every_epochs``."""
    return TrainerConfig(
        steps=cfg.epochs * per_epoch,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta2=cfg.adam_beta2,
        sparse_lr_scale=cfg.sparse_lr_scale,
        warmup=cfg.warmup,
        device=cfg.device,
        seed=cfg.seed,
        log_every=50,
        ckpt_every=per_epoch,
        eval_every=cfg.eval_every_epochs * per_epoch,
        patience=cfg.patience,
        desc=desc,
        progress_bar=progress_bar,
    )


def _bench_line(
    data_path: Path | str,
    data: SeqRecData,
    cfg: SeqRecConfig,
    protocol: str,
    test: dict,
    result: TrainResult,
    t0: float,
    device: torch.device,
) -> dict:
    """The benchmark's JSON line: test figures, training summary, published comparison, config."""
    out = {
        "bench": "seqrec",
        **bench_figures(data_path, data, protocol, cfg.max_len, test),
        "best_valid_ndcg@10": round(float("nan") if result.best_metric is None else result.best_metric, 5),
        "best_step": result.best_step,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "world_size": result.world_size,
        "ranks_in_sync": result.ranks_in_sync,
        "device": device_name(device),
    }
    out.update(published_comparison(data_path, protocol, cfg.max_len, test))
    out["config"] = cfg.to_dict()
    return out


def run_seqrec_bench(
    data_path: Path | str,
    cfg: SeqRecConfig,
    protocol: str = "full",
    run_dir: Path | None = None,
    resume: bool = True,
    desc: str = "seqrec",
    progress_bar: bool = True,
) -> dict:
    """Train on the leave-one-out split of ``data_path``, select on validation, score the test.

    ``desc`` names the run in the progress bar and the log lines; ``progress_bar=False``
    leaves the bar out (the metrics log still records every 50 steps).

    Returns:
        The benchmark line: test hr@k/ndcg@k/mrr, best validation ndcg@10, sizes, seconds, device.
    """
    t0 = time.perf_counter()
    data = SeqRecData.load(data_path)
    main = _is_main_process()
    if run_dir is not None and main:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "seqrec_config.json", cfg.to_dict())
    device = resolve_device(cfg.device)
    train = data.train_sequences()
    catalog = _training_catalog(data, train)
    batches = SeqRecBatches(train, cfg.batch_size, cfg.max_len, cfg.seed)
    steps = cfg.epochs * batches.per_epoch
    torch.manual_seed(cfg.seed)
    model = PinFM(cfg.backbone_config())
    objective = PinFMObjective(cfg.objective, catalog)
    val_users = _validation_users(data, cfg)

    def validate(m: PinFM) -> dict:
        return evaluate_retrieval(m, data, "valid", cfg.max_len, cfg.objective.similarity, protocol, users=val_users)

    trainer = Trainer(
        model,
        objective,
        batches,
        _trainer_config(cfg, batches.per_epoch, desc, progress_bar),
        run_dir=run_dir,
        evaluate=validate,
        select_metric="ndcg@10",
        resume=resume,
    )
    log.info(
        "%s: %d users, %d items, %d interactions; %d steps (%d epochs × %d) on %s",
        desc, data.n_users, data.n_items, data.n_interactions, steps, cfg.epochs, batches.per_epoch, device,
    )  # fmt: skip
    result = trainer.fit()
    trainer.load_best()  # the test is scored with the best validation weights
    test = evaluate_retrieval(model, data, "test", cfg.max_len, cfg.objective.similarity, protocol)
    out = _bench_line(data_path, data, cfg, protocol, test, result, t0, device)
    if run_dir is not None and main:
        _write_json(run_dir / "result.json", out)
    log.info(
        "%s: test hr@10=%.4f ndcg@10=%.4f (best step %s of %d) in %.0f s on %s",
        desc, test["hr@10"], test["ndcg@10"], result.best_step, result.steps, out["seconds"], out["device"],
    )  # fmt: skip
    return out
