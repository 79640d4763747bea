"""Ranker: PinFM backbone as user-sequence module + candidate embedding → DCNv2 crossing → per-action logits.

Late fusion for now: the user embedding is the backbone's hidden state at the last real
position of the sequence, so it can be precomputed once per user (or per request) and
reused for every candidate. Shapes: B = batch (users/requests), C = candidates per row,
D = d_model, A = number of actions (``LABEL_ACTIONS``), S = surface embedding dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from features.contract import LABEL_ACTIONS
from training.model import PinFM, PinFMConfig, last_hidden


@dataclass(frozen=True)
class RankerConfig:
    """Ranker shape: the backbone config plus the crossing/MLP head."""

    backbone: PinFMConfig = field(default_factory=lambda: PinFMConfig.preset("small"))
    surface_dim: int = 16
    n_cross_layers: int = 2
    mlp_hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    actions: tuple[str, ...] = LABEL_ACTIONS

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mlp_hidden"] = list(self.mlp_hidden)
        d["actions"] = list(self.actions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RankerConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RankerConfig fields {unknown}")
        if "backbone" in d:
            d["backbone"] = PinFMConfig.from_dict(d["backbone"])
        if "mlp_hidden" in d:
            d["mlp_hidden"] = tuple(d["mlp_hidden"])
        if "actions" in d:
            d["actions"] = tuple(d["actions"])
        return cls(**d)


class CrossLayer(nn.Module):
    """DCNv2 full-rank cross layer: x_{l+1} = x_0 ⊙ (W x_l + b) + x_l."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        nn.init.normal_(self.lin.weight, std=0.01)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.lin(x) + x  # (..., F)


class Ranker(nn.Module):
    """Scores (user sequence, candidate, surface) with one logit per action."""

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.backbone.d_model
        self.backbone = PinFM(cfg.backbone)
        self.surface_emb = nn.Embedding(cfg.backbone.n_surfaces, cfg.surface_dim, padding_idx=0)
        in_dim = 3 * d + cfg.surface_dim + 1  # user, candidate, user ⊙ candidate, surface, cosine
        self.in_norm = nn.LayerNorm(in_dim)
        self.cross = nn.ModuleList(CrossLayer(in_dim) for _ in range(cfg.n_cross_layers))
        layers: list[nn.Module] = []
        prev = in_dim
        for h in cfg.mlp_hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            prev = h
        layers.append(nn.Linear(prev, len(cfg.actions)))
        self.mlp = nn.Sequential(*layers)

    @property
    def actions(self) -> tuple[str, ...]:
        return self.cfg.actions

    def user_embedding(
        self,
        item_ids: torch.Tensor,
        action_ids: torch.Tensor,
        surface_ids: torch.Tensor,
        content: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Backbone hidden state at the last real position: (B, L) sequence tensors → (B, D)."""
        if pad_mask is None:
            pad_mask = item_ids != 0  # (B, L)
        hidden = self.backbone(item_ids, action_ids, surface_ids, content, pad_mask)  # (B, L, D)
        return last_hidden(hidden, pad_mask)  # (B, D)

    def score_from_user_embedding(
        self,
        user_emb: torch.Tensor,
        cand_ids: torch.Tensor,
        cand_content: torch.Tensor | None,
        surface_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Logits for candidates given precomputed user embeddings.

        Args:
            user_emb: (B, D), or (1, D) broadcast over the B rows of ``cand_ids``.
            cand_ids: (B, C) int64 candidate item ids.
            cand_content: (B, C, Cd) content vectors or None.
            surface_ids: (B,) or (B, C) int64 surface ids.

        Returns:
            (B, C, A) logits.
        """
        B, C = cand_ids.shape
        cand = self.backbone.item_embedding(cand_ids, cand_content)  # (B, C, D)
        user = user_emb.unsqueeze(1).expand(B, C, -1)  # (B, C, D)
        if surface_ids.dim() == 1:
            surface_ids = surface_ids.unsqueeze(1).expand(B, C)  # (B, C)
        surf = self.surface_emb(surface_ids)  # (B, C, S)
        cos = nn.functional.cosine_similarity(user, cand, dim=-1, eps=1e-6).unsqueeze(-1)  # (B, C, 1)
        x0 = self.in_norm(torch.cat([user, cand, user * cand, surf, cos], dim=-1))  # (B, C, F)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)  # (B, C, F)
        return self.mlp(x)  # (B, C, A)

    def forward(
        self,
        item_ids: torch.Tensor,
        action_ids: torch.Tensor,
        surface_ids: torch.Tensor,
        content: torch.Tensor | None,
        pad_mask: torch.Tensor | None,
        cand_ids: torch.Tensor,
        cand_content: torch.Tensor | None,
        cand_surface_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Sequence (B, L) + candidates (B, C) → (B, C, A) logits."""
        user = self.user_embedding(item_ids, action_ids, surface_ids, content, pad_mask)  # (B, D)
        return self.score_from_user_embedding(user, cand_ids, cand_content, cand_surface_ids)  # (B, C, A)
