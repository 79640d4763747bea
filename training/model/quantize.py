"""Per-row scaled int8 / int4 quantization of embedding tables, for serving.

A (N, D) float table is stored as integer codes plus one float32 scale per row (and, for
int4, one float32 offset per row):

* ``int8``: symmetric, ``scale = max|row| / 127``, ``code = round(w / scale)`` in
  [-127, 127], ``w ≈ code · scale``.
* ``int4``: asymmetric, ``scale = (max(row) - min(row)) / 15``, ``offset = min(row)``,
  ``code = round((w - offset) / scale)`` in [0, 15], ``w ≈ offset + code · scale``; two
  codes share a byte (even column in the low nibble, odd column in the high one).

Either way every value is within half a step of its original: ``|w - deq(q(w))| ≤ scale / 2``
per row (up to float32 rounding). A row of zeros keeps scale 0 and dequantizes to zeros.

:class:`QuantizedEmbedding` holds the codes and scales as buffers (so they go into the
state dict and ``model.pt``) and, in its forward, gathers the looked-up rows and
dequantizes only those. :func:`quantize_item_tables` swaps the hashed item-ID sub-tables of
a PinFM or a Ranker (:class:`training.model.backbone.HashedItemEmbedding`) for quantized
ones; the rest of the model, the hashing and the padding rule (id 0 embeds to zeros) stay
as they are. Published user embeddings use the same row formats
(:func:`quantize_rows` / :func:`dequantize_rows`; their byte layout in the online store is
``features.store.encode_user_embeddings``).

Shapes: N = rows, D = row width, P = packed width (``ceil(D / 2)`` for int4, D for int8).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from features.settings import Settings
from training.model.backbone import HashedItemEmbedding

#: storage formats of a table or of the published user embeddings; "fp32" = not quantized
FORMATS: tuple[str, ...] = ("fp32", "int8", "int4")
#: bits of each quantized format
BITS: dict[str, int] = {"int8": 8, "int4": 4}
_INT8_MAX = 127
_INT4_MAX = 15


class QuantizationConfig(Settings):
    """What an exported ranker stores quantized.

    Attributes:
        item_tables: format of the item-ID embedding sub-tables (``int8`` or ``int4``).
        user_embeddings: format of the user embeddings ``publish-embeddings`` writes for
            this model (``fp32`` keeps the float list).

    Example:
        >>> QuantizationConfig(item_tables="int4").bits
        4
    """

    item_tables: str = "int8"
    user_embeddings: str = "int8"

    def check(self) -> None:
        if self.item_tables not in BITS:
            raise ValueError(f"item_tables must be one of {sorted(BITS)}, got {self.item_tables!r}")
        if self.user_embeddings not in FORMATS:
            raise ValueError(f"user_embeddings must be one of {list(FORMATS)}, got {self.user_embeddings!r}")

    @property
    def bits(self) -> int:
        """Bits per code of the item tables."""
        return BITS[self.item_tables]

    @property
    def user_embedding_bits(self) -> int | None:
        """Bits per code of the published user embeddings; None = float32."""
        return BITS.get(self.user_embeddings)


class QuantizedRows(NamedTuple):
    """A quantized (N, D) matrix: ``codes`` (N, P) int8 (int8) or uint8 (int4, packed),
    ``scale`` (N,) float32, ``offset`` (N,) float32 for int4 (None for int8), and ``dim`` = D."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    dim: int


def _check_bits(bits: int) -> None:
    if bits not in (8, 4):
        raise ValueError(f"quantization bits must be 8 or 4, got {bits!r}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, D) codes in [0, 15] → (N, ceil(D / 2)) uint8: column 2j in the low nibble, 2j + 1 in the high one."""
    n, d = codes.shape
    c = codes.to(torch.uint8)
    if d % 2:
        c = torch.cat([c, torch.zeros(n, 1, dtype=torch.uint8, device=c.device)], dim=1)  # (N, D + 1)
    return c[:, 0::2] | (c[:, 1::2] << 4)  # (N, P)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., P) uint8 → (..., dim) int64 codes in [0, 15] (inverse of :func:`pack_int4`)."""
    lo = (packed & 0x0F).long()  # (..., P)
    hi = (packed >> 4).long()  # (..., P)
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :dim]  # (..., dim)


def quantize_rows(w: torch.Tensor, bits: int) -> QuantizedRows:
    """Quantize each row of a (N, D) float matrix with its own scale.

    Args:
        w: (N, D) float tensor.
        bits: 8 (symmetric int8) or 4 (asymmetric int4, packed two per byte).

    Returns:
        :class:`QuantizedRows`; :func:`dequantize_rows` gives the (N, D) float32 approximation.

    Example:
        >>> q = quantize_rows(torch.tensor([[0.5, -1.0, 0.25]]), 8)
        >>> q.codes.tolist(), round(q.scale.item() * 127, 6)
        ([[64, -127, 32]], 1.0)
    """
    _check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"quantize_rows expects a (N, D) matrix, got shape {tuple(w.shape)}")
    w = w.detach().float()
    if bits == 8:
        scale = w.abs().amax(dim=1) / _INT8_MAX  # (N,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: codes 0
        codes = torch.round(w / safe[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)  # (N, D)
        return QuantizedRows(codes, scale, None, w.shape[1])
    lo = w.amin(dim=1)  # (N,)
    scale = (w.amax(dim=1) - lo) / _INT4_MAX  # (N,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant rows: codes 0, value = offset
    codes = torch.round((w - lo[:, None]) / safe[:, None]).clamp(0, _INT4_MAX)  # (N, D)
    return QuantizedRows(pack_int4(codes), scale, lo, w.shape[1])


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, dim: int, bits: int
) -> torch.Tensor:
    """Float32 values of codes of any leading shape: (..., P) codes, (...,) scale/offset → (..., dim)."""
    if bits == 8:
        return codes.float() * scale.unsqueeze(-1)  # (..., D)
    if offset is None:
        raise ValueError("int4 codes need their per-row offset")
    return unpack_int4(codes, dim).float() * scale.unsqueeze(-1) + offset.unsqueeze(-1)  # (..., D)


def dequantize_rows(q: QuantizedRows) -> torch.Tensor:
    """(N, D) float32 matrix of a :class:`QuantizedRows` (from :func:`quantize_rows`)."""
    bits = 8 if q.offset is None else 4
    return dequantize_codes(q.codes, q.scale, q.offset, q.dim, bits)


def roundtrip(w: torch.Tensor, bits: int | None) -> torch.Tensor:
    """``dequantize_rows(quantize_rows(w, bits))`` for a (..., D) tensor (rows = the last dim); ``w`` itself for None."""
    if bits is None:
        return w
    flat = w.reshape(-1, w.shape[-1])  # (N, D)
    return dequantize_rows(quantize_rows(flat, bits)).to(w.dtype).reshape(w.shape)


class QuantizedEmbedding(nn.Module):
    """An ``nn.Embedding`` stand-in (inference only) whose rows are stored quantized per row.

    The buffers ``codes`` (N, P), ``scale`` (N,) and, for int4, ``offset`` (N,) are in the
    state dict. :meth:`forward` gathers the looked-up rows' codes and scales and dequantizes
    only those; :meth:`reference` dequantizes the whole table first, then indexes (the same
    values, computed the slow way).

    Args:
        num_embeddings: rows N.
        embedding_dim: row width D.
        bits: 8 or 4.

    Example:
        >>> emb = QuantizedEmbedding.from_embedding(nn.Embedding(10, 4), bits=8)
        >>> emb(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 4])
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int) -> None:
        super().__init__()
        _check_bits(bits)
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        if bits == 8:
            self.register_buffer("codes", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))  # (N, D)
        else:
            packed = (embedding_dim + 1) // 2
            self.register_buffer("codes", torch.zeros(num_embeddings, packed, dtype=torch.uint8))  # (N, P)
            self.register_buffer("offset", torch.zeros(num_embeddings))  # (N,)
        self.register_buffer("scale", torch.zeros(num_embeddings))  # (N,)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int) -> QuantizedEmbedding:
        """Quantize a (N, D) float weight matrix."""
        q = quantize_rows(weight, bits)
        out = cls(weight.shape[0], weight.shape[1], bits)
        out.codes.copy_(q.codes)
        out.scale.copy_(q.scale)
        if q.offset is not None:
            out.offset.copy_(q.offset)
        return out.to(weight.device)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int) -> QuantizedEmbedding:
        """Quantize an ``nn.Embedding``'s weight (its ``padding_idx``, if any, stays a zero row)."""
        return cls.from_weight(emb.weight, bits)

    def _offset(self) -> torch.Tensor | None:
        return self.offset if self.bits == 4 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) int64 row ids → (..., D) float32: the gathered rows, dequantized."""
        offset = self._offset()
        return dequantize_codes(
            self.codes[ids],  # (..., P)
            self.scale[ids],  # (...,)
            None if offset is None else offset[ids],
            self.embedding_dim,
            self.bits,
        )  # (..., D)

    def dequantized_weight(self) -> torch.Tensor:
        """(N, D) float32: the whole table dequantized."""
        return dequantize_codes(self.codes, self.scale, self._offset(), self.embedding_dim, self.bits)

    def reference(self, ids: torch.Tensor) -> torch.Tensor:
        """What :meth:`forward` returns, computed by dequantizing the whole table, then indexing."""
        return nn.functional.embedding(ids, self.dequantized_weight())  # (..., D)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def item_tables(model: nn.Module) -> dict[str, nn.Module]:
    """The item-ID sub-tables of every :class:`HashedItemEmbedding` in ``model``, by qualified name."""
    return {
        f"{name}.tables.{t}" if name else f"tables.{t}": tab
        for name, module in model.named_modules()
        if isinstance(module, HashedItemEmbedding)
        for t, tab in enumerate(module.tables)
    }


def quantize_item_tables(model: nn.Module, bits: int, *, structure_only: bool = False) -> list[str]:
    """Swap the item-ID sub-tables of a PinFM or Ranker for :class:`QuantizedEmbedding`, in place.

    Only the hashed item tables change: action, surface, position and time-gap embeddings,
    the content projection and every other weight stay float. The model should be in eval
    mode afterwards (a quantized table has no gradient).

    Args:
        model: a module holding one or more :class:`HashedItemEmbedding`.
        bits: 8 or 4.
        structure_only: build empty quantized tables of the right shapes (to ``load_state_dict``
            an exported model into) instead of quantizing the current weights.

    Returns:
        The swapped tables' qualified names, e.g. ``["backbone.items.tables.0", …]``.

    Raises:
        ValueError: the model has no item tables, or they are already quantized.
    """
    _check_bits(bits)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, HashedItemEmbedding):
            continue
        for t, tab in enumerate(module.tables):
            qualified = f"{name}.tables.{t}" if name else f"tables.{t}"
            if isinstance(tab, QuantizedEmbedding):
                raise ValueError(f"{qualified} is already quantized ({tab.bits} bits)")
            if not isinstance(tab, nn.Embedding):
                raise ValueError(f"{qualified} is a {type(tab).__name__}, not an nn.Embedding")
            if structure_only:
                new = QuantizedEmbedding(tab.num_embeddings, tab.embedding_dim, bits).to(tab.weight.device)
            else:
                new = QuantizedEmbedding.from_embedding(tab, bits)
            module.tables[t] = new
            names.append(qualified)
    if not names:
        raise ValueError(f"{type(model).__name__} has no hashed item tables to quantize")
    return names


def table_bytes(model: nn.Module) -> int:
    """Bytes of the item-ID sub-tables' tensors (weights, or codes + scales + offsets)."""
    total = 0
    for tab in item_tables(model).values():
        tensors = list(tab.parameters(recurse=False)) + list(tab.buffers(recurse=False))
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@torch.no_grad()
def max_abs_error(fp32: nn.Module, quantized: nn.Module) -> dict[str, float]:
    """Per table, the largest |w - deq(q(w))| between a float model and its quantized copy (same table names)."""
    ref, got = item_tables(fp32), item_tables(quantized)
    out = {}
    for name, tab in got.items():
        if not isinstance(tab, QuantizedEmbedding):
            raise ValueError(f"{name} of the second model is not quantized")
        out[name] = float((ref[name].weight.float() - tab.dequantized_weight()).abs().max())
    return out
