"""PinFM backbone: hashed item embeddings + action/surface tokens → pre-LN causal transformer.

Shapes used in comments: B = batch, L = sequence length, D = ``d_model``, C = content dim,
H = heads. The pretraining losses live in :mod:`training.model.objectives`.

Padding convention: item id 0, action id 0 and surface id 0 are padding. Batches built by
:mod:`training.data` are right-padded (real tokens first), but :meth:`PinFM.forward` also
accepts left padding when ``pad_mask`` is given: positions count real tokens only.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from features.contract import ACTIONS, CONTENT_DIM, SURFACES
from features.settings import Settings
from training.model.recipes import PINFM

# ------------------------------------------------------------------------- hashing
#: Mersenne prime 2^31 - 1: every product below stays < 2^62, so int64 never overflows.
_PRIME = 2_147_483_647
_MASK31 = 0x7FFFFFFF


def _splitmix64(x: int) -> int:
    """One splitmix64 step on Python ints (exact, so identical in every process)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def hash_constants(table: int) -> tuple[int, int, int, int, int]:
    """Fixed multipliers/offsets (all in [1, 2^31 - 1)) of hash function number ``table``."""
    out = []
    state = 0xAF3D_0000 + 7919 * (table + 1)
    for _ in range(5):
        state = _splitmix64(state)
        out.append(1 + state % (_PRIME - 1))
    return tuple(out)  # type: ignore[return-value]


def hash_item_ids(item_ids: torch.Tensor, table: int, buckets: int) -> torch.Tensor:
    """Deterministic bucket of every int64 item id for hash function ``table``.

    Multiply-add-mod-prime (Carter-Wegman) over the low 31 and the high bits of the id,
    then a second multiply-add round; the result does not depend on the process, the
    platform or Python's ``hash()`` seed.

    Args:
        item_ids: int64 tensor of any shape.
        table: which of the independent hash functions to use (0, 1, ...).
        buckets: number of buckets; the result lies in [0, buckets).

    Returns:
        int64 tensor of the same shape as ``item_ids``.
    """
    a1, b1, a2, a3, b3 = hash_constants(table)
    ids = item_ids.to(torch.int64)
    lo = ids & _MASK31  # < 2^31
    hi = torch.remainder(ids >> 31, _PRIME)  # < 2^31 (remainder is non-negative, also for negative ids)
    h = torch.remainder(lo * a1 + b1, _PRIME)
    h = torch.remainder(hi * a2 + h, _PRIME)
    h = torch.remainder(h * a3 + b3, _PRIME)
    return torch.remainder(h, buckets)


# -------------------------------------------------------------------------- config
#: "pre_ln": GPT-2's block; "sasrec": Kang & McAuley's SASRec block (see :class:`Block`)
BLOCK_LAYOUTS = ("pre_ln", "sasrec")


class PinFMConfig(Settings):
    """Size of the backbone. ``d_model`` must be divisible by ``n_heads`` and ``n_hash_tables``."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 64
    n_hash_tables: int = 2
    hash_buckets: int = 8192
    content_dim: int = CONTENT_DIM
    dropout: float = 0.0
    item_dropout: float = 0.0  # training only: a token's item embedding is left out with this probability
    mlp_ratio: int = 4  # hidden width of each block's MLP, in multiples of d_model (SASRec's is 1)
    block_layout: str = "pre_ln"  # one of BLOCK_LAYOUTS: how a block normalises (see Block)
    n_actions: int = len(ACTIONS) + 1  # + padding id 0
    n_surfaces: int = len(SURFACES) + 1
    time_gap_buckets: int = 24  # log2-second buckets of the gap to the previous event; 0 = unknown/padding
    sparse_item_grads: bool = False  # hash tables get sparse gradients (the Trainer then uses SparseAdam for them)
    scale_item_input: bool = False  # multiply the item part of the input by √d_model (SASRec); targets are not scaled

    def check(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % self.n_hash_tables:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_hash_tables={self.n_hash_tables}")
        if self.max_len < 1 or self.hash_buckets < 2:
            raise ValueError(f"max_len must be ≥ 1 and hash_buckets ≥ 2, got {self.max_len}, {self.hash_buckets}")
        if self.mlp_ratio < 1:
            raise ValueError(f"mlp_ratio must be ≥ 1, got {self.mlp_ratio}")
        if self.block_layout not in BLOCK_LAYOUTS:
            raise ValueError(f"unknown block_layout {self.block_layout!r}; expected one of {BLOCK_LAYOUTS}")

    @classmethod
    def preset(cls, name: str) -> PinFMConfig:
        """Named sizes: ``tiny`` (tests), ``small`` (CPU demo), ``base`` (GPU), ``large`` (multi-GPU).

        Every size hashes items as the default recipe does (:data:`training.model.recipes.PINFM`,
        ``n_hash_tables`` sub-tables). ``base`` and ``large`` also take its buckets (2 × 2²¹
        rows: 2 GB of fp32 weights at d = 256, 4 GB at d = 512, for an accelerator). The CPU
        sizes keep fewer:

        * ``small`` (the demo) 2 × 8,192: the demo catalogue has ~1,900 items, so hardly two
          share both rows. 2 × 2²¹ would fit its 24 GB (134 M parameters: 512 MB of weights
          at d = 64, about 2 GB with the gradient and AdamW's two moments) but not its time:
          fine-tuning trains the ranker's copy of the table with dense AdamW, which then
          updates 134 M parameters at every step instead of 0.6 M for the whole backbone
          (a backbone training step: 0.26 s against 0.036 s on the idle 2-core CPU); every
          pinfm and ranker artifact would weigh 512 MB; and ``RankerConfig``'s default
          backbone (this preset) would allocate the table in every ranker test.
        * ``tiny`` (tests) 2 × 1,024: the test worlds have at most a few hundred items.
        """
        tables, big = PINFM.n_hash_tables, PINFM.hash_buckets
        presets = {
            "tiny": cls(d_model=32, n_layers=1, n_heads=2, max_len=32, n_hash_tables=tables, hash_buckets=1024),
            "small": cls(d_model=64, n_layers=2, n_heads=4, max_len=64, n_hash_tables=tables, hash_buckets=8192),
            "base": cls(
                d_model=256, n_layers=4, n_heads=8, max_len=256, n_hash_tables=tables, hash_buckets=big, dropout=0.1
            ),
            "large": cls(
                d_model=512, n_layers=8, n_heads=8, max_len=512, n_hash_tables=tables, hash_buckets=big, dropout=0.1
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]


# ------------------------------------------------------------------------- modules
class HashedItemEmbedding(nn.Module):
    """k sub-tables of ``hash_buckets × D/k``, one independent hash each, concatenated.

    Unseen ids need no vocabulary rebuild. Id 0 is padding and embeds to zeros. When a
    content vector is present its projection is added. With ``sparse_item_grads`` a step
    touches only the rows it looked up: a dense gradient would zero and add the whole table
    once per lookup, which costs more than the rest of a small model's step.
    """

    def __init__(self, cfg: PinFMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        sub = cfg.d_model // cfg.n_hash_tables
        self.tables = nn.ModuleList(
            nn.Embedding(cfg.hash_buckets, sub, sparse=cfg.sparse_item_grads) for _ in range(cfg.n_hash_tables)
        )
        self.content_proj = nn.Linear(cfg.content_dim, cfg.d_model, bias=False)

    def buckets(self, item_ids: torch.Tensor) -> torch.Tensor:
        """(...,) int64 ids → (..., k) bucket per sub-table."""
        return torch.stack(
            [hash_item_ids(item_ids, t, self.cfg.hash_buckets) for t in range(self.cfg.n_hash_tables)], dim=-1
        )

    def forward(
        self,
        item_ids: torch.Tensor,
        content: torch.Tensor | None = None,
        content_mask: torch.Tensor | None = None,
        id_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed ids.

        Args:
            item_ids: (...,) int64, 0 = padding.
            content: (..., C) float content vectors, or None.
            content_mask: (...,) bool, True where ``content`` is real; default: rows not all zero.
            id_keep: (...,) bool, False where the ID part is dropped (the content part stays), or None.

        Returns:
            (..., D) embeddings; zeros at padding.
        """
        b = self.buckets(item_ids)  # (..., k)
        emb = torch.cat([tab(b[..., t]) for t, tab in enumerate(self.tables)], dim=-1)  # (..., D)
        if id_keep is not None:
            emb = emb * id_keep.unsqueeze(-1).to(emb.dtype)
        if content is not None:
            if content.shape[-1] != self.cfg.content_dim:
                raise ValueError(f"content has dim {content.shape[-1]}, the model expects {self.cfg.content_dim}")
            if content_mask is None:
                content_mask = content.abs().sum(-1) > 0  # (...,)
            emb = emb + self.content_proj(content.to(emb.dtype)) * content_mask.unsqueeze(-1).to(emb.dtype)
        return emb * (item_ids != 0).unsqueeze(-1).to(emb.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: PinFMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def qkv_heads(
        self, x: torch.Tensor, kv_input: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) inputs → per-head queries, keys, values, each (B, H, L, D/H).

        Queries, keys and values all come from ``x``, or, with ``kv_input``, the keys and values
        from ``kv_input`` (same shape) with the same projection weights.
        """
        B, L, D = x.shape
        heads = (B, L, self.n_heads, D // self.n_heads)
        if kv_input is None:
            q, k, v = self.qkv(x).split(D, dim=-1)  # 3 × (B, L, D)
        else:
            w_q, w_kv = self.qkv.weight.split((D, 2 * D))  # (D, D), (2D, D)
            b_q, b_kv = self.qkv.bias.split((D, 2 * D))
            q = F.linear(x, w_q, b_q)  # (B, L, D)
            k, v = F.linear(kv_input, w_kv, b_kv).split(D, dim=-1)  # 2 × (B, L, D)
        return q.view(heads).transpose(1, 2), k.view(heads).transpose(1, 2), v.view(heads).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of (B, H, L, D/H) heads (causal when ``attn_mask`` is None), then the output projection."""
        B, _, L, _ = q.shape
        p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, H, L, D/H)
        return self.proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)  # (B, H, L, D/H)
        return self.attend(q, k, v, attn_mask)  # (B, L, D)


class Block(nn.Module):
    """One transformer block, in one of two layouts (``cfg.block_layout``).

    ``pre_ln`` (GPT-2): x + attn(ln1(x)); then x + mlp(ln2(x)), a GELU MLP.

    ``sasrec`` (Kang & McAuley's SASRec): h = ln1(x); h + attn(queries from h, keys and
    values from the un-normalised x); then g = ln2(·) and g + mlp(g), a ReLU MLP with dropout
    on its hidden layer too. The residual stream restarts from a normalised vector twice
    per block.

    :meth:`attention_inputs` and :meth:`after_attention` split :meth:`forward` around the
    attention itself, so that DCAT can attend to a cache with the same block.

    Args:
        cfg: the backbone's config (``d_model``, ``n_heads``, ``mlp_ratio``, ``dropout``, ``block_layout``).

    Example:
        >>> block = Block(PinFMConfig(d_model=32, n_heads=2, block_layout="sasrec"))
        >>> block(torch.randn(4, 10, 32), None).shape
        torch.Size([4, 10, 32])
    """

    def __init__(self, cfg: PinFMConfig) -> None:
        super().__init__()
        self.sasrec = cfg.block_layout == "sasrec"
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        hidden = cfg.mlp_ratio * cfg.d_model
        if self.sasrec:
            act: list[nn.Module] = [nn.ReLU(), nn.Dropout(cfg.dropout)]
        else:
            act = [nn.GELU()]
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, hidden), *act, nn.Linear(hidden, cfg.d_model), nn.Dropout(cfg.dropout)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def attention_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) block input → queries, keys, values (B, H, L, D/H) and the residual (B, L, D)."""
        h = self.ln1(x)  # (B, L, D)
        if self.sasrec:
            return *self.attn.qkv_heads(h, kv_input=x), h
        return *self.attn.qkv_heads(h), x

    def after_attention(self, residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Residual (B, L, D) + projected attention output (B, L, D) → block output (B, L, D)."""
        x = residual + self.drop(y)  # (B, L, D)
        if self.sasrec:
            g = self.ln2(x)
            return g + self.mlp(g)
        return x + self.mlp(self.ln2(x))  # (B, L, D)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v, residual = self.attention_inputs(x)  # (B, H, L, D/H) × 3, (B, L, D)
        return self.after_attention(residual, self.attn.attend(q, k, v, attn_mask))  # (B, L, D)


class PinFM(nn.Module):
    """The user-sequence foundation model (GPT-2 style, causal)."""

    def __init__(self, cfg: PinFMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = HashedItemEmbedding(cfg)
        self.action_emb = nn.Embedding(cfg.n_actions, cfg.d_model, padding_idx=0)
        self.surface_emb = nn.Embedding(cfg.n_surfaces, cfg.d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.gap_emb = nn.Embedding(cfg.time_gap_buckets, cfg.d_model, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(_init_weights)

    def item_embedding(self, item_ids: torch.Tensor, content: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding of candidate/target items: (...,) ids [+ (..., C) content] → (..., D)."""
        return self.items(item_ids, content)

    def forward(
        self,
        item_ids: torch.Tensor,
        action_ids: torch.Tensor,
        surface_ids: torch.Tensor,
        content: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        *,
        time_gaps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden state after every token (causal: position t sees tokens ≤ t only).

        Args:
            item_ids: (B, L) int64, 0 = padding.
            action_ids: (B, L) int64 ids of features.contract.ACTION_IDS.
            surface_ids: (B, L) int64 ids of features.contract.SURFACE_IDS.
            content: (B, L, C) float or None.
            pad_mask: (B, L) bool, True at real tokens; None = no padding, or right padding
                (the causal mask alone keeps real tokens from seeing the padding after them).
            time_gaps: (B, L) int64 buckets of :func:`bucketize_time_gaps` (0 = unknown), or None.

        Returns:
            (B, L, D) hidden states (final LayerNorm applied).
        """
        x, attn_mask = self.embed(item_ids, action_ids, surface_ids, content, pad_mask, time_gaps=time_gaps)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)  # (B, L, D)

    def embed(
        self,
        item_ids: torch.Tensor,
        action_ids: torch.Tensor,
        surface_ids: torch.Tensor,
        content: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        *,
        time_gaps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input of the first block and the attention mask :meth:`forward` uses (arguments as there).

        Returns:
            x: (B, L, D) summed token embeddings after dropout.
            attn_mask: (B, 1, L, L) bool (True = may attend), or None for plain causal attention.
        """
        B, L = item_ids.shape
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={self.cfg.max_len}; truncate to the newest events")
        if pad_mask is None:
            pos = torch.arange(L, device=item_ids.device).expand(B, L)  # (B, L)
            attn_mask = None
        else:
            pad_mask = pad_mask.bool()
            pos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, L) index among real tokens
            causal = torch.ones(L, L, dtype=torch.bool, device=item_ids.device).tril()  # (L, L)
            eye = torch.eye(L, dtype=torch.bool, device=item_ids.device)
            # a query sees earlier real keys, and always itself (so all-pad rows stay finite)
            attn_mask = (causal & (pad_mask[:, None, :] | eye)).unsqueeze(1)  # (B, 1, L, L)
        item_x = self.items(item_ids, content)  # (B, L, D)
        if self.cfg.scale_item_input:
            item_x = item_x * math.sqrt(self.cfg.d_model)
        if self.training and self.cfg.item_dropout > 0:  # whole items left out; position, action, surface stay
            kept = torch.rand(B, L, 1, device=item_x.device) >= self.cfg.item_dropout  # (B, L, 1)
            item_x = item_x * kept
        x = item_x + self.action_emb(action_ids) + self.surface_emb(surface_ids) + self.pos_emb(pos)  # (B, L, D)
        if time_gaps is not None:
            x = x + self.gap_emb(time_gaps.clamp(0, self.cfg.time_gap_buckets - 1))
        return self.drop(x), attn_mask  # (B, L, D), (B, 1, L, L) or None


def bucketize_time_gaps(ts: torch.Tensor, n_buckets: int, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bucket of the gap (seconds) between each event and the previous one of its row.

    Bucket 0 = unknown (the first event, padding); bucket b ≥ 1 holds gaps in
    [2^(b-1) - 1, 2^b - 1) seconds, capped at ``n_buckets - 1``.

    Args:
        ts: (B, L) int64 unix seconds, oldest first.
        n_buckets: the model's ``time_gap_buckets``.
        pad_mask: (B, L) bool, True at real events, or None.

    Returns:
        (B, L) int64 buckets.
    """
    gap = torch.zeros_like(ts)
    gap[:, 1:] = (ts[:, 1:] - ts[:, :-1]).clamp(min=0)
    b = torch.floor(torch.log2(gap.double() + 1.0)).long() + 1  # (B, L)
    b = b.clamp(max=n_buckets - 1)
    b[:, 0] = 0
    if pad_mask is not None:
        b = b * pad_mask.long()
    return b


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def last_hidden(hidden: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last real position of each right-padded row.

    Args:
        hidden: (B, L, D).
        pad_mask: (B, L) bool, True at real tokens (right padding).

    Returns:
        (B, D); rows with no real token take position 0.
    """
    idx = (pad_mask.long().sum(1) - 1).clamp(min=0)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, D)


def resolve_device(device: str) -> torch.device:
    """'auto' → cuda when available, else cpu; 'cpu'/'cuda' as given (error when cuda is missing)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """What benchmarks report as the device: the GPU's name, or the CPU's cores and threads."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
