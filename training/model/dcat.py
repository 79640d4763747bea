"""DCAT: score many candidates against one user sequence with a single backbone pass.

The PinFM ranker appends each candidate item as one extra token after the user's activity
sequence and reads the candidate token's final hidden state ("early fusion"). Done naively
that is one full forward pass of ``L + 1`` tokens per (user, candidate) pair. DCAT
(Deduplicated Cross-Attention Transformer) splits the work in two:

* **context pass**: run the backbone once per unique user sequence, exactly as
  :meth:`training.model.backbone.PinFM.forward` does, and keep every layer's keys and values;
* **crossing pass**: run only the candidate tokens through the blocks. At every layer a
  candidate attends to the cached keys/values of its own user's real tokens plus to its own
  key/value, never to the other candidates; the rest (projection, residuals, MLP, final
  LayerNorm) is the block's own computation.

Because the sequence tokens are causal they never see the candidate, so their keys/values
do not depend on it, and the crossing pass gives the same numbers as the naive path
(:func:`naive_candidate_hidden`, the reference) at a fraction of the cost: ``L + C`` token
passes instead of ``C · (L + 1)``.

DCAT reuses the backbone's own modules (embeddings, each block's ``attention_inputs``,
``attn.proj`` and ``after_attention``, ``ln_f``), so it works with any trained :class:`~training.model.backbone.PinFM`,
in eval mode (serving) and in train mode (gradients flow into the backbone, through the
cache too).

Shapes in comments: U = unique user sequences (one request = one row), L = sequence
length, C = candidates per row, D = ``d_model``, H = heads, Dh = D / H, Cd = content dim.
Candidates are grouped per user row, ``(U, C)``; ragged groups are padded and marked with
``cand_mask`` (True = real candidate); padding candidates come out as zeros.

The candidate token is item (+ content) + surface + position ``lengths[u]`` (right after
the user's last real token), with action id 0 and time-gap bucket 0; both are padding rows
of their embeddings (``padding_idx=0``), which are zero and never get gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from training.model.backbone import PinFM


@dataclass
class KVCache:
    """Per-layer keys and values of the user sequences, from :func:`context_pass`."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per block: K, V each (U, H, L, Dh)
    pad_mask: torch.Tensor | None  # (U, L) bool, True at real tokens; None = every token is real
    lengths: torch.Tensor  # (U,) int64 real tokens per row = position of the candidate token


# ------------------------------------------------------------------------- checks
def _lengths(item_ids: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """(U,) number of real tokens of every row."""
    U, L = item_ids.shape
    if pad_mask is None:
        return torch.full((U,), L, dtype=torch.long, device=item_ids.device)
    if pad_mask.shape != item_ids.shape:
        raise ValueError(f"pad_mask has shape {tuple(pad_mask.shape)}, item_ids {tuple(item_ids.shape)}")
    return pad_mask.bool().sum(1)


def _check_fits(model: PinFM, lengths: torch.Tensor) -> None:
    if lengths.numel() and int(lengths.max()) >= model.cfg.max_len:
        raise ValueError(
            f"a user sequence has {int(lengths.max())} real tokens: with the candidate token it needs "
            f"{int(lengths.max()) + 1} positions but max_len={model.cfg.max_len}; keep at most max_len - 1 events"
        )


def _check_candidates(
    n_users: int,
    cand_ids: torch.Tensor,
    cand_surface_ids: torch.Tensor,
    cand_content: torch.Tensor | None,
    cand_mask: torch.Tensor | None,
) -> None:
    if cand_ids.dim() != 2 or cand_ids.shape[0] != n_users:
        raise ValueError(
            f"cand_ids must be (U, C) with one row per user sequence (U={n_users}), got {tuple(cand_ids.shape)}"
        )
    if cand_surface_ids.shape != cand_ids.shape:
        raise ValueError(
            f"cand_surface_ids has shape {tuple(cand_surface_ids.shape)}, cand_ids {tuple(cand_ids.shape)}"
        )
    if cand_content is not None and cand_content.shape[:2] != cand_ids.shape:
        raise ValueError(
            f"cand_content has shape {tuple(cand_content.shape)}, expected {tuple(cand_ids.shape)} + (Cd,)"
        )
    if cand_mask is not None and cand_mask.shape != cand_ids.shape:
        raise ValueError(f"cand_mask has shape {tuple(cand_mask.shape)}, cand_ids {tuple(cand_ids.shape)}")


# ---------------------------------------------------------------------- the passes
def candidate_tokens(
    model: PinFM,
    cand_ids: torch.Tensor,
    cand_surface_ids: torch.Tensor,
    lengths: torch.Tensor,
    cand_content: torch.Tensor | None = None,
    item_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """Input embeddings of the candidate tokens (before the embedding dropout).

    Args:
        model: the backbone.
        cand_ids: (U, C) int64 item ids, 0 = padding candidate.
        cand_surface_ids: (U, C) int64 surface ids of the request.
        lengths: (U,) real tokens of every user row: the candidate's position.
        cand_content: (U, C, Cd) float content vectors, or None.
        item_emb: (U, C, D) item embeddings already computed (e.g. with the ranker's new-item
            techniques applied); None = ``model.items(cand_ids, cand_content)``.

    Returns:
        (U, C, D) item (+ content, × √D with ``scale_item_input``) + surface + position
        embeddings; action and time gap are the zero padding rows.
    """
    _check_fits(model, lengths)
    if item_emb is None:
        item_emb = model.items(cand_ids, cand_content)  # (U, C, D)
    if model.cfg.scale_item_input:  # as the backbone scales the sequence's items
        item_emb = item_emb * math.sqrt(model.cfg.d_model)
    x = item_emb + model.surface_emb(cand_surface_ids)  # (U, C, D)
    return x + model.pos_emb(lengths).unsqueeze(1)  # (U, C, D)


def context_pass(
    model: PinFM,
    item_ids: torch.Tensor,
    action_ids: torch.Tensor,
    surface_ids: torch.Tensor,
    content: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
    time_gaps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """:meth:`PinFM.forward` over the unique user sequences, keeping every layer's K and V.

    Args: as :meth:`PinFM.forward`, ``(U, L)`` each (``content`` (U, L, Cd)).

    Returns:
        hidden: (U, L, D), identical to ``model(...)``.
        cache: the keys/values, padding mask and lengths for :func:`crossing_pass`.
    """
    hidden, cache = _context(model, item_ids, action_ids, surface_ids, content, pad_mask, time_gaps, True)
    return cast(torch.Tensor, hidden), cache


def context_cache(
    model: PinFM,
    item_ids: torch.Tensor,
    action_ids: torch.Tensor,
    surface_ids: torch.Tensor,
    content: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
    time_gaps: torch.Tensor | None = None,
) -> KVCache:
    """:func:`context_pass` when only the cache is needed: it stops once the last layer's K, V are known
    (the last attention, MLP and ``ln_f`` over the sequence are skipped). Arguments as :func:`context_pass`."""
    return _context(model, item_ids, action_ids, surface_ids, content, pad_mask, time_gaps, False)[1]


def _context(
    model: PinFM,
    item_ids: torch.Tensor,
    action_ids: torch.Tensor,
    surface_ids: torch.Tensor,
    content: torch.Tensor | None,
    pad_mask: torch.Tensor | None,
    time_gaps: torch.Tensor | None,
    with_hidden: bool,
) -> tuple[torch.Tensor | None, KVCache]:
    """:func:`context_pass`; without ``with_hidden`` it stops once the last layer's K, V are known."""
    x, attn_mask = model.embed(item_ids, action_ids, surface_ids, content, pad_mask, time_gaps=time_gaps)  # (U, L, D)
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, block in enumerate(model.blocks):
        q, k, v, residual = block.attention_inputs(x)  # (U, H, L, Dh) each, (U, L, D)
        layers.append((k.contiguous(), v.contiguous()))
        if not with_hidden and i == len(model.blocks) - 1:
            break  # the crossing pass needs the cache only: skip the last attention, MLP and ln_f
        x = block.after_attention(residual, block.attn.attend(q, k, v, attn_mask))  # (U, L, D), as Block.forward
    cache = KVCache(
        layers=layers,
        pad_mask=None if pad_mask is None else pad_mask.bool(),
        lengths=_lengths(item_ids, pad_mask),
    )
    return (model.ln_f(x) if with_hidden else None), cache  # (U, L, D)


def crossing_pass(
    model: PinFM,
    cache: KVCache,
    cand_tokens: torch.Tensor,
    cand_mask: torch.Tensor | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Final hidden state of every candidate token, each attending to its user's cache and itself.

    Args:
        model: the backbone that filled ``cache``.
        cache: from :func:`context_pass`.
        cand_tokens: (U, C, D) from :func:`candidate_tokens`.
        cand_mask: (U, C) bool, True at real candidates; None = all real.
        fused: attend with :func:`_cross_attention_fused` (True) or the plain PyTorch
            reference :func:`_cross_attention_reference` (False); None = fused where it gives
            the same numbers (CPU, no gradients, no attention dropout).

    Returns:
        (U, C, D) hidden states after ``ln_f``; zeros at padding candidates.
    """
    U, C, D = cand_tokens.shape
    if cache.lengths.shape[0] != U:
        raise ValueError(f"cand_tokens has {U} rows but the cache holds {cache.lengths.shape[0]} user sequences")
    if len(cache.layers) != len(model.blocks):
        raise ValueError(f"the cache has {len(cache.layers)} layers, the model {len(model.blocks)}")
    if cand_mask is not None and cand_mask.shape != (U, C):
        raise ValueError(f"cand_mask has shape {tuple(cand_mask.shape)}, expected {(U, C)}")
    H = model.cfg.n_heads
    scale = 1.0 / math.sqrt(D // H)  # as scaled_dot_product_attention
    p_drop = model.cfg.dropout if model.training else 0.0
    padding = cache.pad_mask is not None and not bool(cache.pad_mask.all())
    hidden = ~cache.pad_mask[:, None, None, :] if padding else None  # (U, 1, 1, L) True = padding
    if fused is None:
        fused = _use_fused(cand_tokens.device, model)
    elif fused and not fused_cross_attention_available(cand_tokens.device):
        raise ValueError(f"the fused crossing attention runs on CPU only, not on {cand_tokens.device}")
    attend = _cross_attention_fused if fused else _cross_attention_reference

    x = model.drop(cand_tokens)  # (U, C, D)
    for block, (K, V) in zip(model.blocks, cache.layers, strict=True):
        q, k, v, residual = block.attention_inputs(x)  # (U, H, C, Dh) each, (U, C, D)
        y = attend(q, k, v, K, V, hidden, scale, p_drop)  # (U, H, C, Dh)
        y = block.attn.proj(y.transpose(1, 2).reshape(U, C, D))  # (U, C, D)
        x = block.after_attention(residual, y)  # (U, C, D), as Block.forward
    out = model.ln_f(x)  # (U, C, D)
    if cand_mask is not None:
        out = out.masked_fill(~cand_mask.bool().unsqueeze(-1), 0.0)
    return out


# ------------------------------------------------------------- crossing attention
def fused_cross_attention_available(device: torch.device) -> bool:
    """The fused path uses PyTorch's CPU flash-attention kernel (it also returns the log-sum-exp)."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _use_fused(device: torch.device, model: PinFM) -> bool:
    """Fused kernels where they give the same numbers: CPU, no gradients, no dropout."""
    return (
        fused_cross_attention_available(device)
        and not torch.is_grad_enabled()
        and not (model.training and model.cfg.dropout)
    )


def _cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    hidden: torch.Tensor | None,
    scale: float,
    p_drop: float,
) -> torch.Tensor:
    """Candidates attend to the cached K/V plus their own k/v, one softmax over both (plain PyTorch).

    Args:
        q, k, v: (U, H, C, Dh) the candidates' queries, keys, values.
        K, V: (U, H, L, Dh) the cached keys and values of the user sequences.
        hidden: (U, 1, 1, L) bool, True at padding keys, or None.
        scale: the attention scale (1/√Dh).
        p_drop: attention dropout.

    Returns:
        (U, H, C, Dh) attention outputs (before the output projection).
    """
    L = K.shape[2]
    q = q * scale
    s_ctx = torch.matmul(q, K.transpose(-1, -2))  # (U, H, C, L) candidate · cached keys
    if hidden is not None:
        s_ctx = s_ctx.masked_fill(hidden, float("-inf"))
    s_self = (q * k).sum(-1, keepdim=True)  # (U, H, C, 1) candidate · own key
    probs = torch.cat([s_ctx, s_self], dim=-1).softmax(-1)  # (U, H, C, L + 1) one softmax over both
    if p_drop > 0:
        probs = F.dropout(probs, p_drop)
    return torch.matmul(probs[..., :L], V) + probs[..., L:] * v  # (U, H, C, Dh)


def _cross_attention_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    hidden: torch.Tensor | None,
    scale: float,
    p_drop: float,
) -> torch.Tensor:
    """:func:`_cross_attention_reference` through the flash-attention kernel (no gradients, no dropout).

    The kernel attends the candidates to the cached keys alone and also returns the
    log-sum-exp ``lse`` of those scores; the candidate's own key joins the same softmax by
    the exact merge ``y = (1 − w)·y_ctx + w·v`` with ``w = σ(q·k·scale − lse)``, because
    ``exp(s_self) / (exp(lse) + exp(s_self)) = σ(s_self − lse)``. No (U, H, C, L) score
    matrix is written out. Arguments and result as :func:`_cross_attention_reference`.
    """
    if p_drop > 0:
        raise ValueError("the fused crossing attention has no dropout; use the reference path in training")
    mask = None
    if hidden is not None:
        mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
    y_ctx, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, K, V, attn_mask=mask, scale=scale
    )  # (U, H, C, Dh), (U, H, C)
    if hidden is not None:  # the kernel gives y = 0, lse = 0 where every key is masked: make that lse = -inf
        lse = lse.masked_fill(hidden.all(-1), float("-inf"))  # (U, H, C); such a candidate sees only itself
    s_self = (q * k).sum(-1) * scale  # (U, H, C)
    w = torch.sigmoid(s_self - lse).unsqueeze(-1)  # (U, H, C, 1) share of the candidate's own value
    return torch.lerp(y_ctx, v, w)  # (U, H, C, Dh)


def dcat_scores(
    model: PinFM,
    item_ids: torch.Tensor,
    action_ids: torch.Tensor,
    surface_ids: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_surface_ids: torch.Tensor,
    content: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
    cand_content: torch.Tensor | None = None,
    cand_mask: torch.Tensor | None = None,
    time_gaps: torch.Tensor | None = None,
) -> torch.Tensor:
    """User × candidate hidden states by DCAT: context pass + crossing pass.

    Args:
        model: the backbone.
        item_ids, action_ids, surface_ids: (U, L) int64 user sequences (one row per unique user
            sequence), ``content`` (U, L, Cd), ``pad_mask`` (U, L), ``time_gaps`` (U, L) as in
            :meth:`PinFM.forward`.
        cand_ids, cand_surface_ids: (U, C) int64 candidates grouped by user row.
        cand_content: (U, C, Cd) float or None.
        cand_mask: (U, C) bool, True at real candidates, or None.

    Returns:
        (U, C, D) final hidden state of every candidate token; zeros at padding candidates.
    """
    _check_candidates(item_ids.shape[0], cand_ids, cand_surface_ids, cand_content, cand_mask)
    _check_fits(model, _lengths(item_ids, pad_mask))
    cache = context_cache(model, item_ids, action_ids, surface_ids, content, pad_mask, time_gaps)
    tokens = candidate_tokens(model, cand_ids, cand_surface_ids, cache.lengths, cand_content)  # (U, C, D)
    return crossing_pass(model, cache, tokens, cand_mask)  # (U, C, D)


# ----------------------------------------------------------------------- reference
def _insert(
    seq: torch.Tensor, user: torch.Tensor, src: torch.Tensor, at: torch.Tensor, cand: torch.Tensor | int
) -> torch.Tensor:
    """(U, Lt + 1) sequences → (P, Lt + 1): row ``user[p]`` read at columns ``src[p]``, ``cand`` where ``at``."""
    return torch.where(at, cand, seq[user].gather(1, src))  # (P, Lt + 1)


def naive_candidate_hidden(
    model: PinFM,
    item_ids: torch.Tensor,
    action_ids: torch.Tensor,
    surface_ids: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_surface_ids: torch.Tensor,
    content: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
    cand_content: torch.Tensor | None = None,
    cand_mask: torch.Tensor | None = None,
    time_gaps: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Reference for :func:`dcat_scores`: one full forward pass per (user, candidate) pair.

    Every candidate is inserted into its user's sequence at position ``lengths[u]`` (right
    after the last real token, before the padding) with action 0, its surface and no time
    gap; the hidden state there is read. Pairs are batched ``chunk`` at a time; padding
    candidates are not computed (zeros). Arguments as :func:`dcat_scores`; sequences must
    be right-padded.

    Returns:
        (U, C, D) hidden states.
    """
    U, L = item_ids.shape
    _check_candidates(U, cand_ids, cand_surface_ids, cand_content, cand_mask)
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    dev = item_ids.device
    lengths = _lengths(item_ids, pad_mask)  # (U,)
    _check_fits(model, lengths)
    if pad_mask is not None and not torch.equal(pad_mask.bool(), torch.arange(L, device=dev) < lengths[:, None]):
        raise ValueError("naive_candidate_hidden needs right-padded sequences (real tokens first)")

    # trim trailing all-padding columns so that sequence + candidate fits max_len, then add
    # one zero column: gathering column j - (j > length) builds the sequence with a gap at `length`
    Lt = int(lengths.max()) if U else 0

    def ext(t: torch.Tensor) -> torch.Tensor:  # (U, Lt, ...) → (U, Lt + 1, ...)
        t = t[:, :Lt]
        return torch.cat([t, t.new_zeros((U, 1, *t.shape[2:]))], dim=1)

    seq_items, seq_actions, seq_surfaces = ext(item_ids), ext(action_ids), ext(surface_ids)  # (U, Lt + 1)
    seq_gaps = None if time_gaps is None else ext(time_gaps)  # (U, Lt + 1)
    ref = content if content is not None else cand_content
    seq_content = c_content = None  # (U, Lt + 1, Cd), (U, C, Cd): zeros (no content) where one side has none
    if ref is not None:
        seq_content = ext(content) if content is not None else ref.new_zeros((U, Lt + 1, ref.shape[-1]))
        c_content = cand_content if cand_content is not None else ref.new_zeros((*cand_ids.shape, ref.shape[-1]))

    C = cand_ids.shape[1]
    pairs = torch.arange(U * C, device=dev)  # (U·C,) flat (user, candidate) index
    if cand_mask is not None:
        pairs = pairs[cand_mask.bool().reshape(-1)]
    out = torch.zeros(U * C, model.cfg.d_model, device=dev, dtype=model.ln_f.weight.dtype)  # (U·C, D)
    j = torch.arange(Lt + 1, device=dev)  # (Lt + 1,)
    for start in range(0, pairs.numel(), chunk):
        pr = pairs[start : start + chunk]  # (P,)
        user = pr // C  # (P,)
        n = lengths[user]  # (P,) candidate position
        src = j - (j > n[:, None]).long()  # (P, Lt + 1) source column of every position
        at = j == n[:, None]  # (P, Lt + 1) True at the candidate
        items = _insert(seq_items, user, src, at, cand_ids.reshape(-1)[pr][:, None])
        actions = _insert(seq_actions, user, src, at, 0)
        surfaces = _insert(seq_surfaces, user, src, at, cand_surface_ids.reshape(-1)[pr][:, None])
        gaps = None if seq_gaps is None else _insert(seq_gaps, user, src, at, 0)
        mask = j[None, :] <= n[:, None]  # (P, Lt + 1) real tokens and the candidate
        cont = None
        if seq_content is not None and c_content is not None:
            Cd = seq_content.shape[-1]
            rows = seq_content[user].gather(1, src[..., None].expand(-1, -1, Cd))  # (P, Lt + 1, Cd)
            cont = torch.where(at[..., None], c_content.reshape(-1, Cd)[pr][:, None, :], rows)
        h = model(items, actions, surfaces, cont, mask, time_gaps=gaps)  # (P, Lt + 1, D)
        out[pr] = h[torch.arange(pr.numel(), device=dev), n].to(out.dtype)  # (P, D)
    return out.view(U, C, -1)  # (U, C, D)
