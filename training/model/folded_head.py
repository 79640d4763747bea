"""The ranker's head at inference with the per-request work done once per request, not per candidate.

The ranker's head reads, per candidate, the features ``f = [c, s, e, u, u ⊙ c, cos(u, c)]``
(candidate embedding, surface embedding, the early-fusion output, the user vector, their
product and cosine; :class:`training.model.ranker.Ranker`), normalises them
(``in_norm``) and feeds them to the parallel MaskNet, whose blocks all start with a Linear of
width ``r · F`` over the whole normalised input (:class:`training.model.interaction.MaskBlock`'s
``aggregate``). Of the ``F`` input columns, ``u`` is the same for every candidate of a request,
and ``u ⊙ c`` is a per-request reweighting of ``c``. With ``x̃ = (f − μ) · ρ ⊙ g + b``
(``μ``, ``ρ`` the candidate's mean and reciprocal standard deviation, ``g``, ``b`` the
LayerNorm's affine), every block's aggregation ``A x̃ + a`` is, exactly::

    A x̃ + a = ρ · ( (A_c + A_uc · diag(u)) c + A_u u + A_rest f_rest − μ · A 1 ) + (A b + a)

with ``A_· = A diag(g)`` restricted to a column block. So the aggregations of all blocks
run as two GEMMs over ``c`` (with the request's folded weight) and the remaining per-candidate
columns, instead of one GEMM over all ``F`` columns: the ``u`` and ``u ⊙ c`` columns cost once
per request. The rest of every block (mask projection, the mask times its own LayerNorm of the
input, the hidden Linear, LayerNorm, ReLU) and DCNv2 and the heads are computed as the modules
compute them, with the blocks' shared LayerNorm statistics computed once. The scores are the
module path's up to float rounding (a unit test compares the two).

Used at inference only (no gradients, eval mode, no autocast): the folded weights are cached and
rebuilt whenever a parameter changes (its storage or its version counter).

Shapes: C = candidates of one request, D = d_model, S = surface dim, E = early-fusion width
(D or 0), F = the head's input width, H = a MaskBlock's aggregation width, A = actions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.model.interaction import InteractionArch, MaskBlock, ParallelMaskNet


class FoldedHead:
    """The head of a ranker whose features end with ``[u, u ⊙ c, cos]``, folded per request.

    Args:
        d_model: D, the width of ``c`` and ``u``.
        surface_dim: S.
        early_dim: E, the width of the early-fusion features between the surface and ``u`` (0: none).

    Example:
        >>> head = FoldedHead(d_model, surface_dim, early_dim)
        >>> head.applies(ranker.in_norm, ranker.interaction)
        True
        >>> logits = head(ranker.in_norm, ranker.interaction, cand, surf, early, user)  # (U, C, A)
    """

    def __init__(self, d_model: int, surface_dim: int, early_dim: int) -> None:
        self.D, self.S, self.E = d_model, surface_dim, early_dim
        self._key: tuple | None = None
        self._w: dict[str, torch.Tensor] = {}

    @property
    def in_dim(self) -> int:
        return 3 * self.D + self.S + self.E + 1

    def applies(self, in_norm: nn.LayerNorm, arch: InteractionArch) -> bool:
        """Whether the head has the shape the folding assumes (the default MaskNet → DCNv2 → heads)."""
        mn = arch.masknet
        return (
            isinstance(mn, ParallelMaskNet)
            and all(type(b) is MaskBlock for b in mn.blocks)
            and len({b.aggregate.out_features for b in mn.blocks}) == 1
            and in_norm.elementwise_affine
            and in_norm.normalized_shape == (self.in_dim,)
            and mn.in_dim == self.in_dim
        )

    # ------------------------------------------------------------------ weights
    @staticmethod
    def _params(in_norm: nn.LayerNorm, blocks: list[MaskBlock]) -> list[torch.Tensor]:
        out = [in_norm.weight, in_norm.bias]
        for b in blocks:
            out += [b.aggregate.weight, b.aggregate.bias]
        return out

    def _weights(self, in_norm: nn.LayerNorm, blocks: list[MaskBlock]) -> dict[str, torch.Tensor]:
        """The request-independent folded weights, rebuilt when a parameter changed."""
        params = self._params(in_norm, blocks)
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        if key == self._key:
            return self._w
        D, S, E = self.D, self.S, self.E
        A = torch.cat([b.aggregate.weight for b in blocks])  # (3H, F)
        a = torch.cat([b.aggregate.bias for b in blocks])  # (3H,)
        Ag = A * in_norm.weight  # (3H, F) A diag(g)
        c0, s0, e0 = 0, D, D + S
        u0 = e0 + E
        uc0 = u0 + D
        # the per-candidate columns besides c: surface, early, cos, −μ against A_g 1, and 1 against the bias
        bias = A @ in_norm.bias + a  # (3H,)
        rest = torch.cat([Ag[:, s0:u0], Ag[:, uc0 + D :], Ag.sum(1, keepdim=True), bias[:, None]], dim=1)
        self._w = {
            "c_t": Ag[:, c0:s0].t().contiguous(),  # (D, 3H)
            "uc_t": Ag[:, uc0 : uc0 + D].t().contiguous(),  # (D, 3H)
            "u": Ag[:, u0:uc0].contiguous(),  # (3H, D)
            "rest_t": rest.t().contiguous(),  # (S + E + 3, 3H)
        }
        self._key = key
        return self._w

    # ------------------------------------------------------------------ scoring
    def __call__(
        self,
        in_norm: nn.LayerNorm,
        arch: InteractionArch,
        cand: torch.Tensor,
        surf: torch.Tensor,
        early: torch.Tensor | None,
        user: torch.Tensor,
    ) -> torch.Tensor:
        """Logits of every candidate.

        Args:
            in_norm: the ranker's input LayerNorm.
            arch: the ranker's MaskNet → DCNv2 → heads.
            cand: (U, C, D) candidate embeddings.
            surf: (U, C, S) surface embeddings.
            early: (U, C, E) early-fusion features, or None (E = 0).
            user: (U, D) user vectors.

        Returns:
            (U, C, A) logits.
        """
        blocks = list(arch.masknet.blocks)
        w = self._weights(in_norm, blocks)
        rows = [
            self._request(in_norm, arch, blocks, w, cand[r], surf[r], None if early is None else early[r], user[r])
            for r in range(cand.shape[0])
        ]
        return torch.stack(rows)  # (U, C, A)

    def _request(
        self,
        in_norm: nn.LayerNorm,
        arch: InteractionArch,
        blocks: list[MaskBlock],
        w: dict[str, torch.Tensor],
        c: torch.Tensor,
        s: torch.Tensor,
        e: torch.Tensor | None,
        u: torch.Tensor,
    ) -> torch.Tensor:
        """One request: (C, D) candidates, (C, S) surfaces, (C, E) early features, (D,) user → (C, A)."""
        C, D = c.shape
        if e is None:
            e = c.new_zeros((C, 0))
        cos = F.cosine_similarity(u.expand(C, D), c, dim=-1, eps=1e-6).unsqueeze(-1)  # (C, 1)
        f = torch.cat([c, s, e, u.expand(C, D), u * c, cos], dim=-1)  # (C, F), as the module path builds it
        x, mu, rho = torch.native_layer_norm(f, (f.shape[-1],), in_norm.weight, in_norm.bias, in_norm.eps)
        # the aggregations of every block: per-request weight for c (and the constant u columns), static for the rest
        w_req = torch.empty((D + 1, w["c_t"].shape[1]), dtype=c.dtype, device=c.device)  # (D + 1, 3H)
        torch.addcmul(w["c_t"], w["uc_t"], u.unsqueeze(1), out=w_req[:D])  # (A_c + A_uc diag(u))ᵀ
        torch.mv(w["u"], u, out=w_req[D])  # A_u u
        ones = torch.ones_like(cos)  # (C, 1)
        v_req = torch.cat([c, ones], dim=-1) * rho  # (C, D + 1)
        v_rest = torch.cat([torch.cat([s, e, cos, -mu], dim=-1) * rho, ones], dim=-1)  # (C, S + E + 3)
        z = torch.mm(v_rest, w["rest_t"])  # (C, 3H); the bias comes in as a column, not as a copy of (C, 3H)
        z.addmm_(v_req, w_req).relu_()  # (C, 3H) every block's ReLU(aggregate(x))
        H = blocks[0].aggregate.out_features
        normed: dict[float, torch.Tensor] = {}  # every block's LayerNorm of x shares its statistics
        outs = []
        for k, b in enumerate(blocks):
            if b.ln_in.eps not in normed:
                normed[b.ln_in.eps] = torch.native_layer_norm(x, (x.shape[-1],), None, None, b.ln_in.eps)[0]
            mask = torch.addmm(b.project.bias, z[:, k * H : (k + 1) * H], b.project.weight.t())  # (C, F)
            mask.mul_(torch.addcmul(b.ln_in.bias, normed[b.ln_in.eps], b.ln_in.weight))  # mask ⊙ ln_in(x)
            outs.append(F.relu(b.ln_out(mask @ b.hidden.weight.t())))  # (C, block_dim)
        return arch.head(arch.cross(torch.cat(outs, dim=-1)))  # (C, A)
