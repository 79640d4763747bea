"""TransAct and TransAct V2 pieces: realtime-sequence encoder, time-window mask, NAL, lifelong selection.

* :func:`random_time_window_mask` — TransAct's training-time trick: drop the actions of a
  random window just before the request so the model does not lean on the newest ones only.
* :class:`TransActEncoder` — TransAct's realtime-sequence module: (action ⊕ item) tokens
  early-fused with the candidate, a small bidirectional transformer, then
  :class:`TransActSummary` (K most recent token outputs ⊕ max-pool).
* :func:`next_action_loss` — TransAct V2's Next Action Loss (the user representation must
  pick the next engaged item over the impressed-but-not-engaged ones).
* :func:`select_lifelong` / :func:`gather_selected` — TransAct V2's candidate-anchored
  nearest-neighbour selection of a lifelong sequence.

Sequences are oldest first; padding may be on either side (real positions come from
``pad_mask``, True at real tokens). Shapes: B batch, L length, C candidates per row,
D model dim, Di item-embedding dim, Cd content dim, K first-k / top-k, r recent, N impressions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from features.contract import ACTIONS

#: logit of a masked candidate: finite, so a row whose candidates are all masked keeps finite gradients
MASKED_LOGIT = -1e30


def _most_recent(pad_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the k most recent real tokens of every row, most recent first.

    Args:
        pad_mask: (B, L) bool, True at real tokens (oldest first, any padding side).
        k: how many.

    Returns:
        (B, k) int64 positions (0 where missing) and (B, k) bool validity.
    """
    B, L = pad_mask.shape
    kk = min(k, L)
    score = pad_mask.long() * torch.arange(1, L + 1, device=pad_mask.device)  # (B, L): later real = larger, pad = 0
    top, pos = score.topk(kk, dim=1)  # (B, kk) descending = most recent first
    valid = top > 0
    pos = pos * valid
    if kk < k:
        pos = F.pad(pos, (0, k - kk))
        valid = F.pad(valid, (0, k - kk))
    return pos, valid


# ------------------------------------------------------------------ time-window mask
def random_time_window_mask(
    ts: torch.Tensor,
    pad_mask: torch.Tensor,
    request_ts: torch.Tensor,
    max_window_s: int,
    p: float,
    generator: torch.Generator | None = None,
    *,
    training: bool = True,
) -> torch.Tensor:
    """TransAct's random time window mask: which actions the sequence model may read.

    In training, each row is masked with probability ``p``: a window length
    ``w ~ U(0, max_window_s)`` seconds is drawn and every action with
    ``request_ts - w <= ts < request_ts`` is dropped. In eval (``training=False``) nothing is
    dropped. Padding is never kept.

    Args:
        ts: (B, L) int64 unix seconds of the actions.
        pad_mask: (B, L) bool, True at real actions.
        request_ts: (B,) int64 unix seconds of the request.
        max_window_s: largest window, seconds.
        p: probability that a row is masked at all.
        generator: RNG for the row draws and window lengths (on the device it was created on).
        training: False = no masking.

    Returns:
        (B, L) bool keep-mask (a subset of ``pad_mask``).
    """
    keep = pad_mask.bool()
    if not training or p <= 0.0 or max_window_s <= 0:
        return keep.clone()
    B = ts.shape[0]
    dev = generator.device if generator is not None else ts.device
    u = torch.rand(2, B, generator=generator, device=dev, dtype=torch.float64).to(ts.device)  # (2, B)
    apply = u[0] < p  # (B,)
    start = request_ts.double() - u[1] * max_window_s  # (B,)
    t = ts.double()
    in_window = (t >= start[:, None]) & (t < request_ts.double()[:, None])  # (B, L)
    return keep & ~(apply[:, None] & in_window)


# ---------------------------------------------------------------------- summary
class TransActSummary(nn.Module):
    """TransAct's output compression: the K most recent token outputs ⊕ max-pool over real tokens.

    TransAct orders the sequence most recent first and keeps the first K columns; here
    sequences are oldest first, so the K most recent *real* tokens are taken (most recent
    first). Missing ones (rows with fewer than K real tokens) are zeros; the max-pool of an
    empty row is zeros.

    Args:
        d_model: D, width of the token outputs.
        first_k: K.

    Example:
        >>> s = TransActSummary(d_model=8, first_k=2)
        >>> s(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)).shape
        torch.Size([3, 24])
    """

    def __init__(self, d_model: int, first_k: int) -> None:
        super().__init__()
        self.d_model, self.first_k = d_model, first_k
        self.out_dim = (first_k + 1) * d_model

    def forward(self, h: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) token outputs and (B, L) bool real-token mask → (B, (K+1)·D)."""
        B, L, D = h.shape
        pad_mask = pad_mask.bool()
        pos, valid = _most_recent(pad_mask, self.first_k)  # (B, K)
        recent = h[torch.arange(B, device=h.device)[:, None], pos]  # (B, K, D)
        recent = recent * valid.unsqueeze(-1).to(h.dtype)
        pooled = h.masked_fill(~pad_mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, D)
        pooled = torch.where(pad_mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))
        return torch.cat([recent.reshape(B, self.first_k * D), pooled], dim=-1)  # (B, (K+1)·D)


# ---------------------------------------------------------------------- encoder
class TransActEncoder(nn.Module):
    """TransAct's realtime-sequence module, scoring C candidates per row.

    Token t = action embedding ⊕ item embedding ⊕ candidate embedding (early fusion), projected
    to ``d_model``; a bidirectional pre-LN transformer encoder reads the sequence (padding
    keys masked); :class:`TransActSummary` compresses it. No positional encoding: order
    enters through the summary's most-recent-first slots.

    Early fusion makes the transformer run once per (row, candidate): B·C sequences of
    length L. The projection of the concatenation is computed as the sum of a sequence part
    (B, L, D), computed once per row, and a candidate part (B, C, D), computed once per
    candidate, broadcast to (B, C, L, D) and reshaped to (B·C, L, D) for one batched
    transformer call.

    Args:
        item_dim: Di, width of the item embeddings (sequence items and candidates).
        d_model: transformer width D.
        n_heads: attention heads (divides ``d_model``).
        n_layers: transformer layers.
        first_k: K of the summary.
        n_actions: size of the action vocabulary (id 0 = padding).
        action_dim: width of the action embedding.
        dim_feedforward: transformer MLP width (default 4·D).
        dropout: transformer dropout.

    Example:
        >>> enc = TransActEncoder(item_dim=16, d_model=32, n_heads=2, n_layers=1, first_k=3)
        >>> out = enc(torch.randn(2, 10, 16), torch.randint(1, 5, (2, 10)), torch.ones(2, 10, dtype=torch.bool),
        ...           torch.randn(2, 4, 16))
        >>> out.shape  # (B, C, (K+1)·D)
        torch.Size([2, 4, 128])
    """

    def __init__(
        self,
        item_dim: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        first_k: int = 3,
        n_actions: int = len(ACTIONS) + 1,
        action_dim: int = 16,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.item_dim, self.d_model = item_dim, d_model
        self.action_emb = nn.Embedding(n_actions, action_dim, padding_idx=0)
        self.seq_proj = nn.Linear(action_dim + item_dim, d_model)  # the (action ⊕ item) part of the token projection
        self.cand_proj = nn.Linear(item_dim, d_model, bias=False)  # the candidate part
        layer = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=dim_feedforward or 4 * d_model,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.summary = TransActSummary(d_model, first_k)
        self.out_dim = self.summary.out_dim

    def forward(
        self,
        seq_item_emb: torch.Tensor,
        seq_action_ids: torch.Tensor,
        pad_mask: torch.Tensor,
        cand_emb: torch.Tensor,
    ) -> torch.Tensor:
        """Summary of the sequence as seen from every candidate.

        Args:
            seq_item_emb: (B, L, Di) item embeddings of the actions.
            seq_action_ids: (B, L) int64 ids of features.contract.ACTION_IDS (0 = padding).
            pad_mask: (B, L) bool, True at real actions.
            cand_emb: (B, C, Di) candidate embeddings.

        Returns:
            (B, C, (K+1)·D).
        """
        B, L, _ = seq_item_emb.shape
        C = cand_emb.shape[1]
        pad_mask = pad_mask.bool()
        seq = self.seq_proj(torch.cat([self.action_emb(seq_action_ids), seq_item_emb], dim=-1))  # (B, L, D)
        cand = self.cand_proj(cand_emb)  # (B, C, D)
        x = (seq.unsqueeze(1) + cand.unsqueeze(2)).reshape(B * C, L, self.d_model)  # (B·C, L, D)
        mask = pad_mask.repeat_interleave(C, dim=0)  # (B·C, L)
        # an empty row would mask every key (NaN attention): let it attend to its padding; the summary zeroes it
        key_padding = ~(mask | ~mask.any(1, keepdim=True))  # (B·C, L) True = ignore
        h = self.encoder(x, src_key_padding_mask=key_padding)  # (B·C, L, D)
        return self.summary(h, mask).view(B, C, self.out_dim)  # (B, C, (K+1)·D)


# -------------------------------------------------------------- next action loss
def next_action_loss(
    user_repr: torch.Tensor,
    next_item_emb: torch.Tensor,
    impression_emb: torch.Tensor,
    impression_mask: torch.Tensor,
    temperature: float | torch.Tensor = 0.1,
    valid: torch.Tensor | None = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """TransAct V2's Next Action Loss: pick the next engaged item over impressed-but-not-engaged ones.

    Sampled softmax per row over ``[next item, impression_1 … impression_N]`` (the positive
    in column 0) with logits ``⟨u, e⟩ / temperature`` (cosine when ``normalize``); masked
    impressions are left out. The loss is the mean cross-entropy over valid rows. It is an
    auxiliary loss: the caller adds it to the ranking loss with a small weight (TransAct V2
    uses about 0.01).

    Args:
        user_repr: (B, D) user representation from the sequence.
        next_item_emb: (B, D) embedding of the item the user engaged with next.
        impression_emb: (B, N, D) impressed, not engaged items (negatives).
        impression_mask: (B, N) bool, True at real impressions.
        temperature: softmax temperature (> 0).
        valid: (B,) bool, False for rows without a next positive; None = all rows.
        normalize: L2-normalise the user and item vectors first.

    Returns:
        Scalar loss (0 with a graph when no row is valid).
    """
    if normalize:
        user_repr = F.normalize(user_repr, dim=-1)
        next_item_emb = F.normalize(next_item_emb, dim=-1)
        impression_emb = F.normalize(impression_emb, dim=-1)
    pos = (user_repr * next_item_emb).sum(-1, keepdim=True)  # (B, 1)
    neg = torch.einsum("bd,bnd->bn", user_repr, impression_emb)  # (B, N)
    neg = neg.masked_fill(~impression_mask.bool(), MASKED_LOGIT)
    logits = torch.cat([pos, neg], dim=1) / temperature  # (B, 1 + N)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    ce = F.cross_entropy(logits, target, reduction="none")  # (B,)
    if valid is None:
        return ce.mean()
    m = valid.to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1.0)


# ------------------------------------------------------------- lifelong selection
def select_lifelong(
    seq_item_ids: torch.Tensor,
    seq_content: torch.Tensor,
    pad_mask: torch.Tensor,
    cand_content: torch.Tensor,
    top_k: int,
    recent_r: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TransAct V2's candidate-anchored nearest-neighbour selection from a lifelong sequence.

    For every candidate: the ``recent_r`` most recent real actions always, plus the
    ``top_k`` other real actions whose content is most cosine-similar to the candidate's.
    Real actions are those with ``pad_mask`` True and item id ≠ 0. Selected positions are
    sorted chronologically (by position; sequences are oldest first); slots left empty
    (rows with fewer than ``top_k + recent_r`` real actions) come last, hold position 0 and
    are False in the mask.

    Args:
        seq_item_ids: (B, L) int64 item ids (0 = padding).
        seq_content: (B, L, Cd) content vectors of the actions.
        pad_mask: (B, L) bool, True at real actions.
        cand_content: (B, C, Cd) content vectors of the candidates.
        top_k: K, similarity picks per candidate.
        recent_r: r, most recent actions kept for every candidate.

    Returns:
        (B, C, K + r) int64 positions into the sequence and (B, C, K + r) bool validity.
    """
    B, L = seq_item_ids.shape
    C = cand_content.shape[1]
    real = pad_mask.bool() & (seq_item_ids != 0)  # (B, L)
    rec_pos, rec_valid = _most_recent(real, recent_r)  # (B, r)
    slot = torch.where(rec_valid, rec_pos, torch.full_like(rec_pos, L))  # (B, r); empty slots → spare column L
    is_recent = torch.zeros(B, L + 1, dtype=torch.bool, device=real.device).scatter_(1, slot, True)[:, :L]  # (B, L)

    sim = torch.einsum(
        "bcd,bld->bcl", F.normalize(cand_content.float(), dim=-1), F.normalize(seq_content.float(), dim=-1)
    )  # (B, C, L) cosine
    eligible = (real & ~is_recent).unsqueeze(1).expand(B, C, L)  # (B, C, L)
    sim = sim.masked_fill(~eligible, float("-inf"))
    kk = min(top_k, L)
    top_val, top_pos = sim.topk(kk, dim=-1)  # (B, C, kk)
    top_valid = torch.isfinite(top_val)
    if kk < top_k:
        top_pos = F.pad(top_pos, (0, top_k - kk))
        top_valid = F.pad(top_valid, (0, top_k - kk))

    pos = torch.cat([rec_pos.unsqueeze(1).expand(B, C, -1), top_pos], dim=-1)  # (B, C, r + K)
    valid = torch.cat([rec_valid.unsqueeze(1).expand(B, C, -1), top_valid], dim=-1)  # (B, C, r + K)
    key = torch.where(valid, pos, pos.new_full((), L))  # empty slots sort last
    key, order = key.sort(dim=-1, stable=True)
    valid = valid.gather(-1, order)
    pos = torch.where(valid, key, torch.zeros_like(key))
    return pos, valid


def gather_selected(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-candidate selection of sequence features.

    Args:
        x: (B, L, ...) any per-position tensor.
        idx: (B, C, S) int64 positions (e.g. from :func:`select_lifelong`).

    Returns:
        (B, C, S, ...) with ``out[b, c, s] = x[b, idx[b, c, s]]``.
    """
    B = x.shape[0]
    return x[torch.arange(B, device=x.device)[:, None, None], idx]
