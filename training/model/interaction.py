"""Feature crossing for the ranker: parallel MaskNet → stacked DCNv2 → MLP → one logit per action.

The ordering follows Pinterest's "feature interaction for ranking under latency and memory
limits" stack: parallel MaskNet blocks (Wang et al. 2021, "MaskNet: Introducing
Feature-Wise Multiplication to CTR Ranking Models by Instance-Guided Mask"), then stacked
DCNv2 cross layers (Wang et al. 2021, "DCN V2"), then an MLP tower with one head per action.
The pieces are small modules that :class:`InteractionArch` takes as constructor arguments
(TorchRec-DLRM style); :meth:`InteractionArch.from_config` builds the default stack.

The loss :func:`weighted_bce` is TransAct's head-weighted cross-entropy with a label-weight
matrix.

Shapes used in comments: ``...`` = any leading batch dims (e.g. B or (B, C)), F = input
feature dim, M = mask hidden dim, N = ``n_blocks × block_dim``, A = number of actions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from features.contract import LABEL_ACTIONS
from features.settings import Settings


# -------------------------------------------------------------------------- config
class InteractionConfig(Settings):
    """Size of the crossing stack (the input dim comes from the features, see ``from_config``)."""

    n_mask_blocks: int = 3
    mask_block_dim: int = 128
    mask_reduction_ratio: float = 2.0  # aggregation-layer width / mask width (MaskNet's r)
    n_cross_layers: int = 2
    cross_low_rank: int | None = None  # None = full-rank W; r = W factored as U Vᵀ of rank r
    mlp_hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    actions: tuple[str, ...] = LABEL_ACTIONS

    def check(self) -> None:
        if self.n_mask_blocks < 1 or self.mask_block_dim < 1:
            raise ValueError(
                f"n_mask_blocks and mask_block_dim must be ≥ 1, got {self.n_mask_blocks}, {self.mask_block_dim}"
            )
        if self.mask_reduction_ratio <= 0:
            raise ValueError(f"mask_reduction_ratio must be > 0, got {self.mask_reduction_ratio}")
        if self.n_cross_layers < 0:
            raise ValueError(f"n_cross_layers must be ≥ 0, got {self.n_cross_layers}")
        if self.cross_low_rank is not None and self.cross_low_rank < 1:
            raise ValueError(f"cross_low_rank must be None or ≥ 1, got {self.cross_low_rank}")
        if any(h < 1 for h in self.mlp_hidden):
            raise ValueError(f"mlp_hidden sizes must be ≥ 1, got {self.mlp_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.actions or len(set(self.actions)) != len(self.actions):
            raise ValueError(f"actions must be non-empty and unique, got {self.actions}")


# ------------------------------------------------------------------------- MaskNet
class MaskBlock(nn.Module):
    """MaskNet's MaskBlock: an instance-guided mask multiplies the normalised input feature-wise.

    ``mask = W2 ReLU(W1 m + b1) + b2`` (aggregation layer of width ``hidden``, projection
    layer back to ``in_dim``), then ``out = ReLU(LN(W (mask ⊙ LN(x))))`` of width ``out_dim``.
    In the parallel MaskNet ``x`` and ``m`` are both the feature embedding; in the serial
    one ``x`` is the previous block's output.

    Args:
        in_dim: width of ``x`` (the input the mask multiplies).
        mask_input_dim: width of ``m`` (the input the mask is computed from).
        hidden: aggregation-layer width, or None for ``round(mask_input_dim × reduction_ratio)``.
        out_dim: output width.
        reduction_ratio: MaskNet's r (aggregation width / mask-input width), used when ``hidden`` is None.

    Example:
        >>> blk = MaskBlock(in_dim=32, mask_input_dim=32, hidden=None, out_dim=16)
        >>> blk(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 16])
    """

    def __init__(
        self, in_dim: int, mask_input_dim: int, hidden: int | None, out_dim: int, reduction_ratio: float = 2.0
    ) -> None:
        super().__init__()
        if hidden is None:
            hidden = max(1, round(mask_input_dim * reduction_ratio))
        self.in_dim, self.out_dim = in_dim, out_dim
        self.ln_in = nn.LayerNorm(in_dim)
        self.aggregate = nn.Linear(mask_input_dim, hidden)
        self.project = nn.Linear(hidden, in_dim)
        self.hidden = nn.Linear(in_dim, out_dim, bias=False)  # the LayerNorm after it carries the bias
        self.ln_out = nn.LayerNorm(out_dim)

    def mask(self, mask_input: torch.Tensor) -> torch.Tensor:
        """(..., Fm) → (..., F) instance-guided mask."""
        return self.project(F.relu(self.aggregate(mask_input)))  # (..., F)

    def forward(self, x: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
        """(..., F) input and (..., Fm) mask input → (..., out_dim)."""
        masked = self.mask(mask_input) * self.ln_in(x)  # (..., F)
        return F.relu(self.ln_out(self.hidden(masked)))  # (..., out_dim)


class ParallelMaskNet(nn.Module):
    """Parallel MaskNet: ``n_blocks`` MaskBlocks read the same input; their outputs are concatenated.

    Every block computes its mask from the full input and applies it to the LayerNorm'ed input.

    Args:
        in_dim: input feature width F.
        n_blocks: number of parallel MaskBlocks.
        block_dim: output width of each block.
        reduction_ratio: MaskNet's r for every block's aggregation layer.

    Example:
        >>> net = ParallelMaskNet(in_dim=32, n_blocks=3, block_dim=16)
        >>> net(torch.randn(4, 5, 32)).shape
        torch.Size([4, 5, 48])
    """

    def __init__(self, in_dim: int, n_blocks: int, block_dim: int, reduction_ratio: float = 2.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = n_blocks * block_dim
        self.blocks = nn.ModuleList(
            MaskBlock(in_dim, in_dim, None, block_dim, reduction_ratio) for _ in range(n_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., F) → (..., n_blocks × block_dim)."""
        return torch.cat([blk(x, x) for blk in self.blocks], dim=-1)  # (..., N)


# -------------------------------------------------------------------------- DCNv2
class CrossLayerV2(nn.Module):
    """DCNv2 cross layer: x_{l+1} = x_0 ⊙ (W x_l + b) + x_l.

    Full-rank ``W`` (dim × dim) or, with ``low_rank=r``, ``W = U Vᵀ`` with U, V of shape
    (dim, r): the layer then costs 2·dim·r instead of dim² multiply-adds.

    Args:
        dim: feature width.
        low_rank: None for a full-rank W, else the rank r.

    Example:
        >>> layer = CrossLayerV2(16, low_rank=4)
        >>> x0 = torch.randn(2, 16)
        >>> layer(x0, x0).shape
        torch.Size([2, 16])
    """

    def __init__(self, dim: int, low_rank: int | None = None) -> None:
        super().__init__()
        self.dim, self.low_rank = dim, low_rank
        if low_rank is None:
            self.w = nn.Linear(dim, dim)
            nn.init.normal_(self.w.weight, std=0.01)
            nn.init.zeros_(self.w.bias)
            self.v: nn.Linear | None = None
            self.u: nn.Linear | None = None
        else:
            self.v = nn.Linear(dim, low_rank, bias=False)  # weight = Vᵀ (r, dim)
            self.u = nn.Linear(low_rank, dim)  # weight = U (dim, r), bias = b
            nn.init.normal_(self.u.weight, std=0.01)
            nn.init.zeros_(self.u.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) x_0 and x_l → (..., dim) x_{l+1}."""
        if self.low_rank is None:
            wx = self.w(x)  # (..., dim)
        else:
            wx = self.u(self.v(x))  # (..., r) → (..., dim)
        return x0 * wx + x  # (..., dim)


class DCNv2(nn.Module):
    """``n_layers`` stacked :class:`CrossLayerV2` (the stacked/serial DCNv2); 0 layers = identity.

    Example:
        >>> DCNv2(16, n_layers=2, low_rank=None)(torch.randn(3, 16)).shape
        torch.Size([3, 16])
    """

    def __init__(self, dim: int, n_layers: int, low_rank: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(CrossLayerV2(dim, low_rank) for _ in range(n_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """(..., dim) → (..., dim)."""
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


# ------------------------------------------------------------------------ the head
class MultiActionHead(nn.Module):
    """MLP tower (Linear → ReLU → Dropout per hidden size) then one logit per action.

    The final Linear to ``len(actions)`` is one linear head per action sharing the tower.

    Args:
        in_dim: input width.
        hidden: tower widths (may be empty: the heads read the input directly).
        actions: action names, in logit order.
        dropout: dropout after every tower layer.

    Example:
        >>> MultiActionHead(32, (16,), ("click", "save"))(torch.randn(4, 32)).shape
        torch.Size([4, 2])
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], actions: tuple[str, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.actions = tuple(actions)
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(), nn.Dropout(dropout)]
            prev = h
        self.tower = nn.Sequential(*layers)
        self.heads = nn.Linear(prev, len(self.actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) → (..., A) logits."""
        return self.heads(self.tower(x))


class InteractionArch(nn.Module):
    """Parallel MaskNet → stacked DCNv2 → MLP → one logit per action.

    Args:
        masknet: maps (..., F) features to (..., N); must expose ``out_dim``.
        cross: DCNv2 over (..., N); must expose ``dim``.
        head: maps (..., N) to (..., A); must expose ``in_dim`` and ``actions``.

    Example:
        >>> arch = InteractionArch.from_config(InteractionConfig(mask_block_dim=16), in_dim=40)
        >>> arch(torch.randn(2, 5, 40)).shape  # (B, C, F) → (B, C, A)
        torch.Size([2, 5, 3])
    """

    def __init__(self, masknet: ParallelMaskNet, cross: DCNv2, head: MultiActionHead) -> None:
        super().__init__()
        if not masknet.out_dim == cross.dim == head.in_dim:
            raise ValueError(
                f"dims do not chain: masknet out {masknet.out_dim}, cross {cross.dim}, head in {head.in_dim}"
            )
        self.masknet = masknet
        self.cross = cross
        self.head = head

    @classmethod
    def from_config(cls, cfg: InteractionConfig, in_dim: int) -> InteractionArch:
        masknet = ParallelMaskNet(in_dim, cfg.n_mask_blocks, cfg.mask_block_dim, cfg.mask_reduction_ratio)
        cross = DCNv2(masknet.out_dim, cfg.n_cross_layers, cfg.cross_low_rank)
        head = MultiActionHead(masknet.out_dim, cfg.mlp_hidden, cfg.actions, cfg.dropout)
        return cls(masknet, cross, head)

    @property
    def actions(self) -> tuple[str, ...]:
        return self.head.actions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., F) features → (..., A) logits."""
        h = self.masknet(x)  # (..., N)
        h = self.cross(h)  # (..., N)
        return self.head(h)  # (..., A)


# -------------------------------------------------------------------------- loss
def default_label_weights(actions: tuple[str, ...]) -> torch.Tensor:
    """(A, A) identity: every head weighs 1 on every example, i.e. plain BCE."""
    return torch.eye(len(actions))


def label_weight_per_head(labels: torch.Tensor, label_weights: torch.Tensor) -> torch.Tensor:
    """Weight of each head's loss on each example (see :func:`weighted_bce`).

    Args:
        labels: (..., A) float in {0, 1}.
        label_weights: (A, A); entry [a, b] = weight of head a's loss when label b is positive.

    Returns:
        (..., A) weights ``w_a = max(1, max_b y_b · W[a, b])``.
    """
    A = labels.shape[-1]
    if label_weights.shape != (A, A):
        raise ValueError(f"label_weights must be ({A}, {A}), got {tuple(label_weights.shape)}")
    W = label_weights.to(device=labels.device, dtype=labels.dtype)
    per_label = labels.unsqueeze(-2) * W  # (..., A_head, A_label): y_b · W[a, b]
    return per_label.amax(dim=-1).clamp(min=1.0)  # (..., A)


def weighted_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_weights: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TransAct's head-weighted binary cross-entropy with a label-weight matrix W.

    TransAct weighs each head's loss by the user's action on the example (a repin is a
    stronger signal than a click, so a repinned example also weighs more in the click head).
    Definition used here: ``W[a, b]`` is the weight of head a's loss on an example whose
    label b is positive; an example with several positive labels takes the largest, and a
    weight is never below 1, which is every head's weight on an example with no positive
    label::

        w_a = max(1, max_b y_b · W[a, b])
        loss = Σ_{valid examples} Σ_a w_a · BCE(logit_a, y_a) / (n_valid · A)

    With W = identity (:func:`default_label_weights`) every weight is 1 and the loss is
    ``F.binary_cross_entropy_with_logits(logits, labels)`` over the valid examples.
    Entries ≤ 1 therefore mean "no up-weighting"; e.g. ``W[click, save] = 3`` makes a saved
    example count 3× in the click head.

    Args:
        logits: (..., A) per-head logits.
        labels: (..., A) float in {0, 1}.
        label_weights: (A, A) W, rows = heads, columns = labels.
        mask: (...,) bool, True at examples that count, or None for all.

    Returns:
        Scalar loss (0 with a graph when no example is valid).
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in shape")
    labels = labels.to(logits.dtype)
    w = label_weight_per_head(labels, label_weights)  # (..., A)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (..., A)
    per_example = (w * bce).mean(dim=-1)  # (...,)
    if mask is None:
        return per_example.mean()
    m = mask.to(per_example.dtype)
    return (per_example * m).sum() / m.sum().clamp(min=1.0)
