"""Pretraining objectives of PinFM: next-token, multi-token and future-token losses.

Every loss is a softmax over candidate items where the query is the backbone's hidden
state at one position and the positive is an item the user later acted on positively:

* **next-token** — the query at t must pick the item at t+1;
* **multi-token** — the query at t must pick each positive item in t+1 … t+L';
* **future-token** — only the query at the *read position* (the last input token, the one
  the downstream ranker reads) must pick each positive item after it. With an embedding
  computed offline and used for a day, this is what the ranker needs the state to know.

Candidates are the positives of (up to K of) the other pairs in the batch (in-batch negatives) plus M
negatives sampled once per step from the catalog (uniformly or by popularity). Because
those candidates are not drawn uniformly, every candidate's logit is corrected by the log
of its expected number of draws (log-Q correction), which makes the sampled softmax an
estimate of the full one. ``negatives="full"`` uses the whole catalog instead (exact):
each distinct query position is scored against every item once, whatever the number of
losses and pairs it serves, in blocks that never hold the whole (Q, I) logit matrix
(:class:`CatalogLogSumExp`). Its cost grows with the catalog; the sampled one does not.

Shapes: B batch, L length, D model dim, N (query, positive) pairs, M sampled negatives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.settings import Settings

#: logit of a masked candidate: finite, so a row whose candidates are all masked keeps finite gradients
MASKED_LOGIT = -1e30
#: exp() of anything below this is < 2e-35 (nothing, beside a softmax sum ≥ 1), and x86 CPUs
#: compute the exp of arguments under about -87 (subnormal results) 10-30× slower: clamp first
EXP_FLOOR = -80.0


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16), where bf16 matmuls are fast."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # a private helper of torch; absent = unknown
    return bool(probe()) if probe is not None else False


class ObjectiveConfig(Settings):
    """Which losses, their weights, and how candidates are built.

    Attributes:
        next_token: weight of the next-token loss (0 = off).
        multi_token: weight of the multi-token loss (0 = off).
        multi_token_window: L', how many following positions each query predicts.
        future_token: weight of the future-token loss (0 = off).
        future_window: the last this-many tokens of a row are its future (the read
            position is the token before them); rows too short read at their second-to-last.
        similarity: "cosine" (normalized, divided by the temperature) or "dot".
        init_temperature: start value of the learnable temperature.
        in_batch_negatives: use the other pairs' positives as negatives.
        in_batch_max: at most this many in-batch keys (a random subset; bounds the N × K logits).
        negatives: number of sampled negatives M per step, or "full" for the whole catalog.
        catalog_matmul: dtype of the full softmax's catalog matmuls: "fp32"; "bf16"
            (bfloat16 inputs, fp32 accumulation); or "auto": bf16 on a CPU with native bf16
            dot products (AVX512-BF16), fp32 on any other CPU and on accelerators.
        sampler: "uniform" or "popularity" (by training frequency) for the sampled negatives.
        logq_correction: subtract log of each candidate's expected draw count.
        max_pairs: at most this many pairs per loss per step (None = all).
        mask_own_sequence: an in-batch key that is a positive of the query's own sequence
            (another pair of the same row) is no negative: it is left out like an accidental
            hit. Otherwise a query is pushed away from the items its user goes on to engage
            with, which the multi-token loss pulls it towards. Off by default: on Beauty (lr
            3e-3) it lowered test NDCG@10 from 0.0312 to 0.0278 (those items are useful hard negatives).
    """

    next_token: float = 1.0
    multi_token: float = 0.0
    multi_token_window: int = 4
    future_token: float = 0.0
    future_window: int = 4
    similarity: str = "cosine"
    init_temperature: float = 0.05
    in_batch_negatives: bool = True
    in_batch_max: int | None = 2048
    negatives: int | Literal["full"] = 1024
    catalog_matmul: str = "fp32"
    sampler: str = "uniform"
    logq_correction: bool = True
    max_pairs: int | None = None
    mask_own_sequence: bool = False

    # the distillation loss, removed in the commit after 66e15b0 (docs/experiments/beauty-ensembles.md):
    # saved with distill=0.0 it did nothing, and its temperature only scaled that term
    retired_fields: ClassVar[dict[str, object]] = {"distill": 0.0}
    retired_if_inert: ClassVar[tuple[str, ...]] = ("distill_temperature",)

    def check(self) -> None:
        if self.similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {self.similarity!r}")
        if self.catalog_matmul not in ("fp32", "bf16", "auto"):
            raise ValueError(f"catalog_matmul must be 'fp32', 'bf16' or 'auto', got {self.catalog_matmul!r}")
        if self.sampler not in ("uniform", "popularity"):
            raise ValueError(f"sampler must be 'uniform' or 'popularity', got {self.sampler!r}")
        if not (self.negatives == "full" or (isinstance(self.negatives, int) and self.negatives >= 0)):
            raise ValueError(f"negatives must be a count ≥ 0 or 'full', got {self.negatives!r}")
        if self.next_token < 0 or self.multi_token < 0 or self.future_token < 0:
            raise ValueError("loss weights must be ≥ 0")
        if self.next_token + self.multi_token + self.future_token == 0:
            raise ValueError("at least one of next_token, multi_token, future_token needs a weight > 0")
        if self.multi_token_window < 1 or self.future_window < 1:
            raise ValueError("multi_token_window and future_window must be ≥ 1")
        if self.negatives == 0 and not self.in_batch_negatives:
            raise ValueError("no negatives: enable in_batch_negatives or sample some")


class ItemCatalog:
    """The items negatives are drawn from, with training frequencies for the log-Q correction.

    Args:
        item_ids: (I,) int64 ids of the catalog (any order, unique).
        counts: (I,) how often each item occurs as a training positive (≥ 0).

    Example:
        >>> cat = ItemCatalog(np.array([5, 9]), np.array([3, 1]))
        >>> cat.log_prob(torch.tensor([9])).exp()
        tensor([0.2500])
    """

    def __init__(self, item_ids: np.ndarray, counts: np.ndarray) -> None:
        ids = np.asarray(item_ids, dtype=np.int64)
        cnt = np.asarray(counts, dtype=np.float64)
        if ids.ndim != 1 or ids.shape != cnt.shape or ids.size == 0:
            raise ValueError("ItemCatalog needs two equal-length, non-empty 1-d arrays")
        order = np.argsort(ids, kind="stable")
        self.ids = torch.from_numpy(ids[order])  # (I,) sorted
        if (self.ids[1:] == self.ids[:-1]).any():
            raise ValueError("ItemCatalog: item ids must be unique")
        smoothed = cnt[order] + 1.0  # every item can be drawn
        self.popularity = torch.from_numpy(smoothed / smoothed.sum()).float()  # (I,)

    @classmethod
    def from_sequences(cls, sequences: list[np.ndarray] | np.ndarray) -> ItemCatalog:
        """Catalog of every id occurring in ``sequences`` (0 = padding is skipped), counted."""
        flat = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences])
        ids, counts = np.unique(flat[flat != 0], return_counts=True)
        return cls(ids, counts)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def log_prob(self, item_ids: torch.Tensor) -> torch.Tensor:
        """log popularity of each id; ids outside the catalog get the smallest probability."""
        idx = torch.searchsorted(self.ids, item_ids.cpu().clamp(min=0)).clamp(max=len(self) - 1)
        found = self.ids[idx] == item_ids.cpu()
        p = torch.where(found, self.popularity[idx], self.popularity.min())
        return p.log().to(item_ids.device)

    def sample(self, n: int, sampler: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """n ids drawn with replacement (torch's global RNG) and log of each id's draw probability."""
        if sampler == "uniform":
            idx = torch.randint(len(self), (n,))
            logp = torch.full((n,), -math.log(len(self)))
        else:
            idx = torch.multinomial(self.popularity, n, replacement=True)
            logp = self.popularity[idx].log()
        return self.ids[idx].to(device), logp.to(device)


# ------------------------------------------------------------------------- pairs
def next_token_pairs(positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, query pos, target pos) of every t → t+1 pair whose target is a real positive token.

    Args:
        positive: (B, L) bool, True at real tokens with a positive action (right padded, so
            a real token's predecessors are real).
    """
    rows, cols = positive[:, 1:].nonzero(as_tuple=True)
    return rows, cols, cols + 1


def multi_token_pairs(positive: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, query pos, target pos) for every t → t+j, 1 ≤ j ≤ window, with a positive target."""
    rows_l, q_l, t_l = [], [], []
    for j in range(1, min(window, positive.shape[1] - 1) + 1):
        rows, cols = positive[:, j:].nonzero(as_tuple=True)
        rows_l.append(rows)
        q_l.append(cols)
        t_l.append(cols + j)
    return torch.cat(rows_l), torch.cat(q_l), torch.cat(t_l)


def read_positions(lengths: torch.Tensor, future_window: int) -> torch.Tensor:
    """Read position of each row: the last token before its final ``future_window`` tokens.

    Rows with ≤ ``future_window`` tokens read at their second-to-last token (one future
    token); rows with < 2 tokens get -1 (no pair).
    """
    return torch.where(lengths > future_window, lengths - 1 - future_window, lengths - 2)


def future_token_pairs(
    positive: torch.Tensor, read_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, query pos, target pos): the read position of each row → every positive token after it."""
    L = positive.shape[1]
    pos = torch.arange(L, device=positive.device)  # (L,)
    after = (pos[None, :] > read_pos[:, None]) & (read_pos[:, None] >= 0) & positive  # (B, L)
    rows, cols = after.nonzero(as_tuple=True)
    return rows, read_pos[rows], cols


# ------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class SampledLogits:
    """The logits of a sampled softmax: each query's positive, and its candidates.

    Attributes:
        pos: (N,) logit of each query's own positive (log-Q corrected when asked).
        cand: (N, C) fp32 logits of the C = K + M candidates (in-batch keys first, then the
            sampled negatives), or None without candidates; a removed candidate (an
            accidental hit, or a key of the query's own group) holds ``MASKED_LOGIT``.
    """

    pos: torch.Tensor
    cand: torch.Tensor | None

    def cross_entropy(self) -> torch.Tensor:
        """Mean cross-entropy with each positive as the target, without materialising (N, 1 + C)."""
        if self.cand is None:  # no negative at all: the loss of a softmax over one logit
            return (self.pos - self.pos).mean()
        log_norm = torch.logaddexp(self.pos.float(), torch.logsumexp(self.cand, dim=1))  # (N,)
        return (log_norm - self.pos.float()).mean()


def sampled_softmax_logits(
    queries: torch.Tensor,
    pos_ids: torch.Tensor,
    pos_emb: torch.Tensor,
    neg_ids: torch.Tensor | None,
    neg_emb: torch.Tensor | None,
    temperature: torch.Tensor | float,
    pos_logq: torch.Tensor | None = None,
    neg_logq: torch.Tensor | None = None,
    in_batch: bool = True,
    similarity: str = "cosine",
    in_batch_max: int | None = None,
    groups: torch.Tensor | None = None,
) -> SampledLogits:
    """The logits of a softmax of each query's positive against in-batch and sampled candidates.

    Query i's candidates are: its own positive, the positives of the other pairs (in-batch
    keys; at most ``in_batch_max`` of them, a random subset, so the cost stays
    O(N · (K + M)) and not O(N²)) and the sampled negatives. A candidate with the same id as
    query i's positive is removed (an accidental hit is no negative). With log-Q,
    ``pos_logq``/``neg_logq`` (log expected draw counts) are subtracted from every logit,
    the positive's included.

    Args:
        queries: (N, D).
        pos_ids: (N,) int64 id of each pair's positive.
        pos_emb: (N, D) embedding of each pair's positive.
        neg_ids: (M,) int64 ids of sampled negatives, or None.
        neg_emb: (M, D) their embeddings, or None.
        temperature: scalar > 0; logits are similarities / temperature.
        pos_logq: (N,) log-Q of each pair's positive, or None (no correction).
        neg_logq: (M,) log-Q of each sampled candidate, or None.
        in_batch: use the other pairs' positives as negatives.
        similarity: "cosine" or "dot".
        in_batch_max: K, the most in-batch keys (None = all N).
        groups: (N,) int64 group of each pair (e.g. its sequence row), or None. An in-batch
            key of query i's own group is left out of i's candidates.

    Returns:
        the logits; ``.cross_entropy()`` is the sampled-softmax loss (mean over the N pairs).
    """
    if similarity == "cosine":
        queries = F.normalize(queries, dim=-1)
        pos_emb = F.normalize(pos_emb, dim=-1)
        neg_emb = F.normalize(neg_emb, dim=-1) if neg_emb is not None else None
    n = queries.shape[0]
    q = queries / temperature  # (N, D): scaling the queries is cheaper than scaling (N, K + M) logits
    pos_logit = (q * pos_emb).sum(-1)  # (N,)
    if pos_logq is not None:
        pos_logit = pos_logit - pos_logq
    cand_emb, cand_ids, cand_logq = [], [], []
    keys = None
    if in_batch:
        keys = torch.arange(n, device=queries.device)
        if in_batch_max is not None and n > in_batch_max:
            keys = torch.randperm(n)[:in_batch_max].to(queries.device)  # (K,)
        cand_emb.append(pos_emb[keys])
        cand_ids.append(pos_ids[keys])
        cand_logq.append(pos_logq[keys] if pos_logq is not None else None)
    if neg_ids is not None and neg_emb is not None and neg_ids.numel():
        cand_emb.append(neg_emb)
        cand_ids.append(neg_ids)
        cand_logq.append(neg_logq)
    if not cand_emb:
        return SampledLogits(pos_logit, None)
    keys_emb = torch.cat(cand_emb)  # (K + M, D)
    ids = torch.cat(cand_ids)  # (K + M,)
    if any(lq is not None for lq in cand_logq):
        bias = -torch.cat(
            [
                lq if lq is not None else torch.zeros_like(i, dtype=q.dtype)
                for lq, i in zip(cand_logq, cand_ids, strict=True)
            ]
        )
        logits = torch.addmm(bias[None, :].to(q.dtype), q, keys_emb.T)  # (N, K + M), log-Q fused into the matmul
    else:
        logits = q @ keys_emb.T  # (N, K + M)
    logits = logits.float().masked_fill_(pos_ids[:, None] == ids[None, :], MASKED_LOGIT)  # accidental hits
    if groups is not None and keys is not None:
        own = groups[:, None] == groups[keys][None, :]  # (N, K): keys of the query's own group
        logits[:, : keys.numel()].masked_fill_(own, MASKED_LOGIT)
    return SampledLogits(pos_logit, logits)


def batch_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """The backbone's hidden states (B, L, D) of a training batch (see PinFMObjective)."""
    return model(
        batch["item_ids"],
        batch["action_ids"],
        batch["surface_ids"],
        batch.get("content"),
        None,  # right padded: the causal mask alone keeps real tokens away from padding
        time_gaps=batch.get("time_gaps"),
    )


def full_softmax_loss(
    queries: torch.Tensor,
    pos_index: torch.Tensor,
    all_emb: torch.Tensor,
    temperature: torch.Tensor | float,
    similarity: str,
) -> torch.Tensor:
    """Cross-entropy over the whole catalog.

    Args:
        queries: (N, D).
        pos_index: (N,) index of each positive in ``all_emb``.
        all_emb: (I, D) embedding of every catalog item.
    """
    if similarity == "cosine":
        queries, all_emb = F.normalize(queries, dim=-1), F.normalize(all_emb, dim=-1)
    return F.cross_entropy((queries @ all_emb.T / temperature).float(), pos_index)  # (N, I) logits


class CatalogLogSumExp(torch.autograd.Function):
    """``lse[i] = log Σ_j exp(q[i] · e[j])`` over a whole catalog, without the logit matrix.

    The (Q, I) logit matrix is the cost of an exact softmax: with Q ≈ 2,500 queries and
    I ≈ 55,000 items it is 550 MB, and autograd would keep it and two more of its size. Here
    the forward pass scores ``chunk`` queries at a time into one reused fp32 buffer. The
    backward pass needs the softmax of each block: with ``keep`` the forward pass keeps it
    (Q × I values of the matmul dtype, no second scoring); without, it scores the block
    again and turns the buffer into the softmax in place. Every item gets its gradient in
    the same pass. ``torch.logsumexp(q @ e.T, 1)`` is the plain reference (tests check
    that they agree).

    With ``bf16`` the three matmuls take bfloat16 inputs (fp32 accumulation; the logits
    and the softmax are rounded to bf16). On a CPU with AVX512-BF16 they run about 4 ×
    faster than in fp32; the max, the exp and the sum stay in fp32.

    Args (of ``apply``):
        q: (Q, D) queries (already divided by the temperature).
        e: (I, D) catalog embeddings.
        chunk: queries per block (the buffer holds I × chunk floats).
        bf16: bfloat16 matmuls.
        keep: keep each block's softmax for the backward pass instead of scoring it again.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, e: torch.Tensor, chunk: int, bf16: bool, keep: bool) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):  # the dtypes are chosen here, not by autocast
            dtype = torch.bfloat16 if bf16 else torch.float32
            return CatalogLogSumExp._forward(ctx, q.to(dtype), e.to(dtype), chunk, keep and any(ctx.needs_input_grad))

    @staticmethod
    def _blocks(q: torch.Tensor, e: torch.Tensor, chunk: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows of q, their (I, n) fp32 logits, transposed) per block of ``chunk`` queries, in one reused buffer."""
        n_items = e.shape[0]
        buf = torch.empty(n_items * min(chunk, q.shape[0]), device=q.device)
        for c in range(0, q.shape[0], chunk):
            rows = slice(c, min(c + chunk, q.shape[0]))
            block = buf[: n_items * (rows.stop - c)].view(n_items, rows.stop - c)  # (I, n)
            if q.dtype == torch.float32:
                torch.mm(e, q[rows].T, out=block)
            else:
                block.copy_(torch.mm(e, q[rows].T))  # a bf16 mm has a bf16 result
            yield rows, block

    @staticmethod
    def _forward(ctx, q: torch.Tensor, e: torch.Tensor, chunk: int, keep: bool) -> torch.Tensor:
        lse = torch.empty(q.shape[0], device=q.device)  # (Q,)
        kept = []
        for rows, block in CatalogLogSumExp._blocks(q, e, chunk):
            top = block.amax(0)  # (n,)
            block.sub_(top).clamp_(min=EXP_FLOOR).exp_()
            total = block.sum(0)  # (n,)
            lse[rows] = total.log().add_(top)
            if keep:
                kept.append(block.div_(total).to(q.dtype, copy=True))  # the softmax (I, n)
        ctx.save_for_backward(q, e, lse)
        ctx.chunk, ctx.kept = chunk, kept or None
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        with torch.autocast(grad_lse.device.type, enabled=False):
            grad_q, grad_e = CatalogLogSumExp._backward(ctx, grad_lse.float())
        return grad_q, grad_e, None, None, None

    @staticmethod
    def _softmax_blocks(ctx) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, their (I, n) softmax, transposed) per block: the kept ones, or scored again."""
        q, e, lse = ctx.saved_tensors
        if ctx.kept is not None:
            for c, probs in zip(range(0, q.shape[0], ctx.chunk), ctx.kept, strict=True):
                yield slice(c, c + probs.shape[1]), probs
            ctx.kept = None  # freed as the backward pass ends
            return
        for rows, block in CatalogLogSumExp._blocks(q, e, ctx.chunk):
            yield rows, block.sub_(lse[rows]).clamp_(min=EXP_FLOOR).exp_().to(q.dtype)

    @staticmethod
    def _backward(ctx, grad_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, e, _ = ctx.saved_tensors
        grad_q = torch.empty(q.shape, device=q.device)  # (Q, D) fp32
        grad_e = torch.zeros(e.shape, device=e.device)  # (I, D) fp32
        for rows, probs in CatalogLogSumExp._softmax_blocks(ctx):
            probs.mul_(grad_lse[rows].to(probs.dtype))  # × upstream grad
            grad_q[rows] = torch.mm(probs.T, e)
            grad_e.add_(torch.mm(probs, q[rows]))
        return grad_q, grad_e


#: the softmax blocks of a step are kept for the backward pass when they need at most this many bytes
KEEP_SOFTMAX_BYTES = 1 << 30


def catalog_logsumexp(
    q: torch.Tensor, e: torch.Tensor, block_floats: int | None = None, bf16: bool = False, keep: bool | None = None
) -> torch.Tensor:
    """(Q,) log Σ_j exp(q · e_j) with :class:`CatalogLogSumExp`; blocks of ``block_floats`` floats.

    The default block is 4 M floats (16 MB) on CPU, the fastest of the 1–64 M tried on the
    2-core CPU (larger blocks spend their time faulting fresh pages in); 256 M on an
    accelerator. ``keep=None`` keeps the softmax for the backward pass when it needs at
    most :data:`KEEP_SOFTMAX_BYTES` (Q × I × 4 bytes in fp32, × 2 in bf16).
    """
    if block_floats is None:
        block_floats = (1 << 22) if q.device.type == "cpu" else (1 << 28)
    if keep is None:
        keep = q.shape[0] * e.shape[0] * (2 if bf16 else 4) <= KEEP_SOFTMAX_BYTES
    return CatalogLogSumExp.apply(q, e, max(1, block_floats // max(1, e.shape[0])), bf16, keep)


def shared_full_softmax_losses(
    queries: torch.Tensor,
    pair_sets: list[tuple[torch.Tensor, torch.Tensor]],
    all_emb: torch.Tensor,
    temperature: torch.Tensor | float,
    similarity: str,
    block_floats: int | None = None,
    bf16: bool = False,
) -> list[torch.Tensor]:
    """Full-catalog cross-entropy of several pair sets that share their queries.

    Equals ``full_softmax_loss(queries[q], pos, all_emb, ...)`` for every ``(q, pos)`` in
    ``pair_sets`` (the reference), but scores each distinct query against the catalog once,
    in blocks (:func:`catalog_logsumexp`). With the next- and multi-token losses a position
    is the query of up to 1 + L' pairs, so this is what makes the exact softmax affordable.

    Args:
        queries: (Q, D) the distinct query states.
        pair_sets: per loss, (query index (N,) into ``queries``, positive index (N,) into ``all_emb``).
        all_emb: (I, D) embedding of every catalog item.
        block_floats: size of the logit block (None = the device's default).
        bf16: bfloat16 catalog matmuls (see :class:`CatalogLogSumExp`).

    Returns:
        per pair set, the scalar mean cross-entropy over its pairs (sets must be non-empty).
    """
    if similarity == "cosine":
        queries, all_emb = F.normalize(queries, dim=-1), F.normalize(all_emb, dim=-1)
    q = queries / temperature  # (Q, D)
    log_norm = catalog_logsumexp(q, all_emb, block_floats, bf16)  # (Q,)
    return [
        (log_norm[qi] - (q[qi] * all_emb[pos]).sum(-1).float()).mean()  # positive logit: one dot per pair
        for qi, pos in pair_sets
    ]


#: the learnable temperature never goes below this
MIN_TEMPERATURE = 0.01


def temperature_from_log(log_temp: torch.Tensor, min_temperature: float = MIN_TEMPERATURE) -> torch.Tensor:
    """The temperature a learnable ``log_temp`` stands for: exp(log_temp), floored at ``min_temperature``."""
    return log_temp.clamp(min=math.log(min_temperature)).exp()


class PinFMObjective(nn.Module):
    """The weighted sum of the enabled losses, with a learnable temperature.

    ``forward(model, batch)`` takes a :class:`training.model.backbone.PinFM` and a batch dict with
    ``item_ids``, ``action_ids``, ``surface_ids`` (B, L), ``pad_mask`` (B, L) bool (right
    padded), ``positive`` (B, L) bool, optional ``content`` (B, L, C), ``time_gaps`` (B, L)
    and ``read_pos`` (B,), and returns the loss and a dict of floats.

    Args:
        cfg: which losses and how candidates are built.
        catalog: items for sampled negatives and the log-Q correction.

    Example:
        >>> obj = PinFMObjective(ObjectiveConfig(negatives=64), ItemCatalog.from_sequences(seqs))
        >>> loss, stats = obj(model, batch)
    """

    def __init__(self, cfg: ObjectiveConfig, catalog: ItemCatalog, min_temperature: float = MIN_TEMPERATURE) -> None:
        super().__init__()
        self.cfg = cfg
        self.catalog = catalog
        self.log_temp = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))
        self.min_temperature = min_temperature

    @property
    def temperature(self) -> torch.Tensor:
        return temperature_from_log(self.log_temp, self.min_temperature)

    def _candidates(self, model: nn.Module, device: torch.device):
        if self.cfg.negatives == "full" or self.cfg.negatives == 0:
            return None, None, None
        ids, logp = self.catalog.sample(int(self.cfg.negatives), self.cfg.sampler, device)
        return ids, model.item_embedding(ids), logp

    def _bf16_catalog(self, device: torch.device) -> bool:
        if self.cfg.catalog_matmul == "auto":
            return device.type == "cpu" and cpu_has_native_bf16()
        return self.cfg.catalog_matmul == "bf16"

    def _subsample(self, pairs: tuple) -> tuple:
        """At most ``max_pairs`` of the pairs (a random subset)."""
        rows, q_pos, t_pos = pairs
        if self.cfg.max_pairs is not None and rows.numel() > self.cfg.max_pairs:
            keep = torch.randperm(rows.numel())[: self.cfg.max_pairs].to(rows.device)
            rows, q_pos, t_pos = rows[keep], q_pos[keep], t_pos[keep]
        return rows, q_pos, t_pos

    def _full_losses(
        self, model: nn.Module, hidden: torch.Tensor, batch: dict, pair_sets: list[tuple]
    ) -> list[torch.Tensor | None]:
        """Exact full-catalog losses of the pair sets; each distinct query is scored once.

        The catalog is embedded from its ids alone (content vectors are not used here).
        """
        pair_sets = [self._subsample(p) for p in pair_sets]
        live = [p for p in pair_sets if p[0].numel()]
        if not live:
            return [None] * len(pair_sets)
        L = hidden.shape[1]
        flat = torch.cat([rows * L + q_pos for rows, q_pos, _ in live])  # (ΣN,) query position ids
        uniq, inverse = torch.unique(flat, return_inverse=True)  # (Q,), (ΣN,)
        all_ids = self.catalog.ids.to(hidden.device)
        sets, start = [], 0
        for rows, _, t_pos in live:
            n = rows.numel()
            sets.append((inverse[start : start + n], torch.searchsorted(all_ids, batch["item_ids"][rows, t_pos])))
            start += n
        queries = hidden.reshape(-1, hidden.shape[-1])[uniq]  # (Q, D)
        losses = iter(
            shared_full_softmax_losses(
                queries,
                sets,
                model.item_embedding(all_ids),
                self.temperature,
                self.cfg.similarity,
                bf16=self._bf16_catalog(hidden.device),
            )
        )
        return [next(losses) if p[0].numel() else None for p in pair_sets]

    def _loss(
        self, model: nn.Module, hidden: torch.Tensor, batch: dict, pairs: tuple, negs: tuple
    ) -> torch.Tensor | None:
        """Sampled-softmax loss of one pair set (None when the set has no pair)."""
        rows, q_pos, t_pos = self._subsample(pairs)
        if rows.numel() == 0:
            return None
        q = hidden[rows, q_pos]  # (N, D)
        tgt = batch["item_ids"][rows, t_pos]  # (N,)
        temp = self.temperature
        content = batch.get("content")
        k = model.item_embedding(tgt, content[rows, t_pos] if content is not None else None)  # (N, D)
        neg_ids, neg_emb, neg_logp = negs
        pos_logq = neg_logq = None
        if self.cfg.logq_correction:
            # expected number of times each id is a candidate: N draws from the positives'
            # (popularity) distribution in-batch + M draws from the sampler.
            n = min(rows.numel(), self.cfg.in_batch_max or rows.numel()) if self.cfg.in_batch_negatives else 0
            m = 0 if neg_ids is None else neg_ids.numel()

            def expected(ids: torch.Tensor, sampler_logp: torch.Tensor | None) -> torch.Tensor:
                pop = self.catalog.log_prob(ids)
                parts = []
                if n:
                    parts.append(pop + math.log(n))
                if m:
                    samp = sampler_logp if sampler_logp is not None else self._sampler_log_prob(ids)
                    parts.append(samp + math.log(m))
                return torch.logsumexp(torch.stack(parts), dim=0)

            pos_logq = expected(tgt, None)
            if neg_ids is not None:
                neg_logq = expected(neg_ids, neg_logp)
        return sampled_softmax_logits(
            q,
            tgt,
            k,
            neg_ids,
            neg_emb,
            temp,
            pos_logq,
            neg_logq,
            self.cfg.in_batch_negatives,
            self.cfg.similarity,
            self.cfg.in_batch_max,
            rows if self.cfg.mask_own_sequence else None,
        ).cross_entropy()

    def _sampler_log_prob(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.sampler == "uniform":
            return torch.full(ids.shape, -math.log(len(self.catalog)), device=ids.device)
        return self.catalog.log_prob(ids)

    def forward(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.loss_from_hidden(model, batch_hidden(model, batch), batch)

    def loss_from_hidden(self, model: nn.Module, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """The weighted losses given the backbone's hidden states (B, L, D) of ``batch``.

        Used directly when the hidden states already exist, e.g. the auxiliary next-token
        loss of fine-tuning, which reuses the ranker's context pass.
        """
        positive = batch["positive"] & batch["pad_mask"]  # (B, L)
        negs = self._candidates(model, hidden.device)
        total = hidden.sum() * 0.0
        stats: dict[str, float] = {}
        parts = []
        if self.cfg.next_token > 0:
            parts.append(("next", self.cfg.next_token, next_token_pairs(positive)))
        if self.cfg.multi_token > 0:
            parts.append(("multi", self.cfg.multi_token, multi_token_pairs(positive, self.cfg.multi_token_window)))
        if self.cfg.future_token > 0:
            read_pos = batch.get("read_pos")
            if read_pos is None:
                read_pos = read_positions(batch["pad_mask"].sum(1), self.cfg.future_window)
            parts.append(("future", self.cfg.future_token, future_token_pairs(positive, read_pos)))
        if self.cfg.negatives == "full":
            losses = self._full_losses(model, hidden, batch, [p for _, _, p in parts])
        else:
            losses = [self._loss(model, hidden, batch, pairs, negs) for _, _, pairs in parts]
        for (name, weight, pairs), loss in zip(parts, losses, strict=True):
            stats[f"pairs_{name}"] = float(pairs[0].numel())
            if loss is not None:
                total = total + weight * loss
                stats[f"loss_{name}"] = float(loss.detach())
        stats["temperature"] = float(self.temperature.detach())
        return total, stats
