"""Ranker: a user-sequence module + candidate features → parallel MaskNet → DCNv2 → one logit per action.

The sequence module is one of (``RankerConfig.sequence``):

* ``none``: no sequence; candidate and surface features only (the ablation's floor).
* ``transact``: TransAct's realtime-sequence encoder (candidate early-fused into every token,
  bidirectional transformer, first-K + max-pool summary), trained from scratch.
* ``pinfm_late``: the pretrained PinFM backbone's hidden state at the last real position —
  one vector per user that can be precomputed and published ("PinFM-lite", late fusion).
* ``pinfm_early``: the candidate is a token appended to the user's sequence (early fusion),
  computed with DCAT: one context pass per unique sequence caches K/V, every candidate
  cross-attends to it (:mod:`training.model.dcat`). The same pass's last hidden state is the
  user vector of the late features: everything comes from the request-time sequence.
* ``hybrid`` (the default; TransAct's hybrid ranker as the papers deploy it): the early fusion
  of ``pinfm_early`` over the realtime sequence, scored per candidate with DCAT at request
  time, fused with the batch user embedding: PinFM's pass over the long history, precomputed
  and published with the model version (``user_emb``; in training, ``late_seq``: the history as
  the publisher saw it). The user vector of its late features is a learned fusion of that
  embedding and the realtime sequence's summary (the DCAT context pass's last hidden state)
  (``RankerConfig.hybrid_user="fused"``), or the embedding alone (``"stored"``).

The batch user vector of ``pinfm_late`` and ``hybrid`` comes, in this order, from ``user_emb``
(precomputed, (U, D)), from ``late_seq`` (a backbone pass over those sequences, with
gradients in training) or from the request's own sequence (``hybrid``: the same context pass
that fills the DCAT cache, so it costs nothing extra).

New-item handling during fine-tuning (:class:`NewItemConfig`): candidate-ID randomization
(an id is swapped for a random, never-seen one, so the model learns to score from content
and context) and item-age-dependent dropout of the candidate's ID embedding (the younger the
item, the likelier its ID part is dropped; its content part stays). Optionally a learned
vector stands in for the dropped ID part, so the crossing layers can tell a content-only
candidate from a trained one and put both on one scale.

Shapes: U = unique user sequences (requests), L = sequence length, C = candidates per
request, D = d_model, S = surface dim, A = actions, Cd = content dim.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from features.settings import Settings
from training.model.backbone import PinFM, PinFMConfig, last_hidden
from training.model.dcat import (
    KVCache,
    candidate_tokens,
    context_cache,
    context_pass,
    crossing_pass,
    naive_candidate_hidden,
)
from training.model.folded_head import FoldedHead
from training.model.inputs import TIME_GAPS_DEFAULT, history_len, saved_time_gaps, time_gap_buckets
from training.model.interaction import InteractionArch, InteractionConfig
from training.model.transact import TransActEncoder, gather_selected, random_time_window_mask, select_lifelong

SEQUENCE_MODES: tuple[str, ...] = ("none", "transact", "pinfm_late", "pinfm_early", "hybrid")
#: modes that append the candidate to the sequence (DCAT early fusion)
EARLY_FUSION_MODES: tuple[str, ...] = ("pinfm_early", "hybrid")
#: modes whose late features read a user vector that can be precomputed and published
USER_EMBEDDING_MODES: tuple[str, ...] = ("pinfm_late", "hybrid")
#: the head is folded per request (:class:`training.model.folded_head.FoldedHead`) from this many candidates on
FOLD_MIN_CANDIDATES = 32
#: ``hybrid``: the late features' user vector fuses the batch embedding with the realtime summary, or is the former
HYBRID_USERS: tuple[str, ...] = ("fused", "stored")
#: ids drawn by candidate-ID randomization come from [RANDOM_ID_BASE, 2·RANDOM_ID_BASE): far above real ids
RANDOM_ID_BASE = 1 << 40
DAY_S = 86_400


class NewItemConfig(Settings):
    """Fine-tuning techniques for items the backbone never saw (all off in eval).

    Attributes:
        id_randomization: probability that a training candidate's id is replaced by a random id.
        age_dropout_max: probability of dropping the ID embedding of an item created at the request time.
        age_horizon_days: the drop probability falls linearly to 0 at this item age.
        content_only_unseen: at inference, items created after the ranker's training data
            (``RankerConfig.id_cutoff_s``) are scored from content alone: their ID rows were
            never trained (a hashed id only shares rows with other items), and age dropout
            taught the model to score ID-less candidates.
        expected_keep_young: at inference, a young item that was trained is scored with its
            expected keep probability under age dropout, k = 1 − p(age) (the model saw it with
            the ID a share k of the time, without it otherwise): by default its ID part is
            scaled by k.
        young_mix: with ``expected_keep_young``, mix the predictions instead: every action's
            probability is k · σ(logit with the ID) + (1 − k) · σ(logit without it), the
            expectation over the two inputs the model was trained on (the candidate is scored
            twice; only the candidate side runs twice, the sequence side once).
        missing_id_vector: learn one vector that stands in for a dropped ID part: a candidate
            keeping a share k of its ID part gets (1 − k) of this vector (0 = kept, 1 = dropped
            or content-only). Without it a dropped ID is a zero vector, which the crossing
            layers cannot tell from a small trained one.
    """

    id_randomization: float = 0.1
    age_dropout_max: float = 0.5
    age_horizon_days: float = 7.0
    content_only_unseen: bool = True
    expected_keep_young: bool = True
    young_mix: bool = False
    missing_id_vector: bool = False

    def check(self) -> None:
        for name in ("id_randomization", "age_dropout_max"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.age_horizon_days <= 0:
            raise ValueError(f"age_horizon_days must be > 0, got {self.age_horizon_days}")

    @classmethod
    def off(cls) -> NewItemConfig:
        return cls(
            id_randomization=0.0, age_dropout_max=0.0, content_only_unseen=False, expected_keep_young=False,
            young_mix=False, missing_id_vector=False,
        )  # fmt: skip


class RankerConfig(Settings):
    """Ranker shape.

    Attributes:
        backbone: the PinFM backbone's config (a pretrained backbone brings its own).
        sequence: one of :data:`SEQUENCE_MODES`.
        surface_dim: width of the request-surface embedding.
        interaction: the MaskNet → DCNv2 → heads stack (its ``actions`` are the heads).
        new_items: candidate-ID randomization and age-dependent ID dropout.
        time_gaps: feed log-time-gap buckets of the sequence to the backbone, from the
            sequence's ``ts`` (a sequence without ``ts`` is scored without gaps;
            :func:`training.model.inputs.time_gap_buckets`). A new config feeds them
            (:data:`training.model.inputs.TIME_GAPS_DEFAULT`): the offline tables and the online
            ``user_sequence`` (``event_ts_s``) both carry event times; fine-tuning follows the
            backbone's ``PretrainConfig.time_gaps`` (:func:`training.model.inputs.resolve_time_gaps`).
            A saved config without the entry predates the setting and loads without them
            (:meth:`from_dict`, :func:`training.model.inputs.saved_time_gaps`).
        transact_layers, transact_heads, transact_first_k: the TransAct encoder.
        transact_window_s, transact_window_p: TransAct's random time-window mask in training
            (drop actions within a random window of up to this many seconds before the
            request, in this share of rows).
        lifelong_top_k, lifelong_recent_r: TransAct V2's candidate-anchored selection for
            ``transact``: each candidate reads its own subsequence of the user's history, the
            ``lifelong_recent_r`` most recent actions plus the ``lifelong_top_k`` actions whose
            content is most similar to the candidate's (needs content); 0 = the whole sequence.
        id_cutoff_s: unix seconds of the end of the fine-tuning data (set by fine-tuning): an
            item created later cannot have a trained ID (see ``NewItemConfig.content_only_unseen``).
        hybrid_user: ``hybrid`` only: the user vector of the late features, one of
            :data:`HYBRID_USERS`: ``fused`` = a learned linear map of the batch embedding and the
            realtime sequence's summary (starts as their mean), ``stored`` = the batch embedding alone.
    """

    backbone: PinFMConfig = Field(default_factory=lambda: PinFMConfig.preset("small"))
    sequence: str = "hybrid"
    surface_dim: int = 16
    interaction: InteractionConfig = Field(default_factory=InteractionConfig)
    new_items: NewItemConfig = Field(default_factory=NewItemConfig)
    time_gaps: bool = TIME_GAPS_DEFAULT
    transact_layers: int = 1
    transact_heads: int = 2
    transact_first_k: int = 3
    transact_window_s: int = 6 * 3600
    transact_window_p: float = 0.5
    lifelong_top_k: int = 0
    lifelong_recent_r: int = 8
    id_cutoff_s: int | None = None
    hybrid_user: str = "fused"

    def check(self) -> None:
        if self.sequence not in SEQUENCE_MODES:
            raise ValueError(f"sequence must be one of {SEQUENCE_MODES}, got {self.sequence!r}")
        if self.hybrid_user not in HYBRID_USERS:
            raise ValueError(f"hybrid_user must be one of {HYBRID_USERS}, got {self.hybrid_user!r}")
        if self.lifelong_top_k < 0 or self.lifelong_recent_r < 0:
            raise ValueError(
                f"lifelong_top_k and lifelong_recent_r must be >= 0, got {self.lifelong_top_k}, {self.lifelong_recent_r}"
            )

    @property
    def actions(self) -> tuple[str, ...]:
        return self.interaction.actions

    @classmethod
    def upgrade_saved(cls, d: dict[str, Any]) -> dict[str, Any]:
        """A missing field takes its default, except ``time_gaps``: a config saved without it
        was trained without time gaps and loads that way."""
        return {**d, "time_gaps": saved_time_gaps(d)}


class Ranker(nn.Module):
    """Scores (user sequence, candidates, surface) with one logit per action.

    Args:
        cfg: the shape; ``cfg.sequence`` picks the sequence module.

    Example:
        >>> ranker = Ranker(RankerConfig(backbone=PinFMConfig.preset("tiny")))
        >>> seq = {"item_ids": torch.tensor([[3, 4, 0]]), "action_ids": torch.tensor([[2, 2, 0]]),
        ...        "surface_ids": torch.tensor([[1, 1, 0]]), "pad_mask": torch.tensor([[True, True, False]])}
        >>> ranker(seq, torch.tensor([[7, 8]]), torch.tensor([[1, 1]])).shape  # (U, C, A)
        torch.Size([1, 2, 3])
    """

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.backbone.d_model
        self.backbone = PinFM(cfg.backbone)  # its item embedding serves every mode
        self.surface_emb = nn.Embedding(cfg.backbone.n_surfaces, cfg.surface_dim, padding_idx=0)
        # stands in for a dropped ID part (NewItemConfig.missing_id_vector); starts at zero = no change
        self.missing_id = nn.Parameter(torch.zeros(d)) if cfg.new_items.missing_id_vector else None
        self.transact: TransActEncoder | None = None
        seq_dim = {"none": 0, "pinfm_late": 2 * d + 1, "pinfm_early": 3 * d + 1, "hybrid": 3 * d + 1}.get(
            cfg.sequence, 0
        )
        if cfg.sequence == "transact":
            self.transact = TransActEncoder(
                item_dim=d,
                d_model=d,
                n_heads=cfg.transact_heads,
                n_layers=cfg.transact_layers,
                first_k=cfg.transact_first_k,
                n_actions=cfg.backbone.n_actions,
            )
            seq_dim = self.transact.out_dim
        # hybrid: [batch embedding, realtime summary] → the late features' user vector, from their mean
        self.user_fuse: nn.Linear | None = None
        if cfg.sequence == "hybrid" and cfg.hybrid_user == "fused":
            self.user_fuse = nn.Linear(2 * d, d)
            with torch.no_grad():
                self.user_fuse.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)], dim=1) / 2)
                self.user_fuse.bias.zero_()
        in_dim = d + cfg.surface_dim + seq_dim  # candidate, surface, sequence features
        self.in_norm = nn.LayerNorm(in_dim)
        self.interaction = InteractionArch.from_config(cfg.interaction, in_dim)
        self._folded: FoldedHead | None = None  # the inference head of the late-feature modes
        if cfg.sequence in ("pinfm_late", *EARLY_FUSION_MODES):
            early = d if cfg.sequence in EARLY_FUSION_MODES else 0
            folded = FoldedHead(d, cfg.surface_dim, early)
            self._folded = folded if folded.applies(self.in_norm, self.interaction) else None

    @property
    def actions(self) -> tuple[str, ...]:
        return self.cfg.actions

    @property
    def uses_sequence_per_candidate(self) -> bool:
        """True when scoring needs the sequence itself, not only a precomputed user vector."""
        return self.cfg.sequence in ("transact", *EARLY_FUSION_MODES)

    @property
    def uses_user_embedding(self) -> bool:
        """True when the scores read a user vector that is precomputed and published
        (:meth:`user_embedding`; ``pinfm_late`` and ``hybrid``); other modes ignore it."""
        return self.cfg.sequence in USER_EMBEDDING_MODES

    # ------------------------------------------------------------------ pieces
    def time_gaps(self, seq: dict) -> torch.Tensor | None:
        """(U, L) log-time-gap buckets the backbone reads for ``seq`` (None: gaps off or no ``ts``)."""
        return time_gap_buckets(self.cfg, seq)

    def _age_drop_probability(self, cand_age_s: torch.Tensor) -> torch.Tensor:
        """(U, C) ages in seconds → probability that age dropout removes the ID part (0 for unknown ages)."""
        nic = self.cfg.new_items
        age_days = cand_age_s.float() / DAY_S
        p = nic.age_dropout_max * (1.0 - age_days / nic.age_horizon_days).clamp(0.0, 1.0)  # (U, C)
        return torch.where(cand_age_s < 0, torch.zeros_like(p), p)

    def candidate_embedding(
        self,
        cand_ids: torch.Tensor,
        cand_content: torch.Tensor | None = None,
        cand_age_s: torch.Tensor | None = None,
        request_ts: torch.Tensor | None = None,
        id_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(U, C) ids [+ content, + item age] → (U, C, D), with the new-item techniques.

        ``cand_age_s`` (U, C) is the item's age at the request in seconds (< 0 = unknown);
        ``request_ts`` (U,) the request time in unix seconds. In training: ID randomization
        and age dropout; at inference: items created after ``cfg.id_cutoff_s`` lose their
        (never trained) ID part when ``content_only_unseen``, and younger trained items keep
        ``1 − p(age)`` of it when ``expected_keep_young``. ``id_keep`` (U, C) overrides the
        inference rule (the share of the ID part each candidate keeps).
        """
        nic = self.cfg.new_items
        ids = cand_ids
        keep_id = None  # (U, C) bool where the ID part is kept; None = all
        if self.training and nic.id_randomization > 0:
            swap = torch.rand(cand_ids.shape, device=cand_ids.device) < nic.id_randomization
            random_ids = RANDOM_ID_BASE + torch.randint(0, RANDOM_ID_BASE, cand_ids.shape, device=cand_ids.device)
            ids = torch.where(swap & (cand_ids != 0), random_ids, cand_ids)
        if self.training and nic.age_dropout_max > 0 and cand_age_s is not None:
            p = self._age_drop_probability(cand_age_s)  # (U, C)
            keep_id = torch.rand(p.shape, device=p.device) >= p
        if id_keep is not None:
            keep_id = id_keep
        elif not self.training:
            keep_id = self._inference_keep(cand_age_s, request_ts)
        # padding slots keep id 0 through the swap, so they embed to zeros
        emb = self.backbone.items(ids, cand_content, id_keep=keep_id)  # (U, C, D)
        if self.missing_id is not None and keep_id is not None:
            dropped = (1.0 - keep_id.to(emb.dtype)) * (cand_ids != 0).to(emb.dtype)  # (U, C)
            emb = emb + dropped.unsqueeze(-1) * self.missing_id  # (U, C, D)
        return emb

    def _inference_keep(self, cand_age_s: torch.Tensor | None, request_ts: torch.Tensor | None) -> torch.Tensor | None:
        """(U, C) share of the ID part an inference candidate keeps (None = all of it).

        0 for items created after ``cfg.id_cutoff_s`` (``content_only_unseen``); 1 − p(age) for
        younger trained items (``expected_keep_young``); 1 otherwise.
        """
        nic = self.cfg.new_items
        if not nic.content_only_unseen or self.cfg.id_cutoff_s is None or cand_age_s is None or request_ts is None:
            return None
        created = request_ts.unsqueeze(1) - cand_age_s  # (U, C) unix seconds
        keep = ((cand_age_s < 0) | (created <= self.cfg.id_cutoff_s)).float()  # (U, C)
        if nic.expected_keep_young and nic.age_dropout_max > 0:
            keep = keep * (1.0 - self._age_drop_probability(cand_age_s))  # (U, C) expected keep
        return keep

    def _young_mix_keep(self, cand_age_s: torch.Tensor | None, request_ts: torch.Tensor | None) -> torch.Tensor | None:
        """(U, C) expected keep when predictions are to be mixed (``young_mix``), else None."""
        nic = self.cfg.new_items
        if self.training or not (nic.young_mix and nic.expected_keep_young):
            return None
        keep = self._inference_keep(cand_age_s, request_ts)
        if keep is None or not bool(((keep > 0) & (keep < 1)).any()):
            return None  # every candidate is all-ID or content-only: one pass is exact
        return keep

    @staticmethod
    def _mix_logits(logits2: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(U, 2C, A) logits with / without the ID → (U, C, A) logits of the keep-weighted mixture."""
        with_id, without_id = logits2.chunk(2, dim=1)  # (U, C, A) each
        k = keep.unsqueeze(-1).to(logits2.dtype)  # (U, C, 1)
        p = k * torch.sigmoid(with_id) + (1.0 - k) * torch.sigmoid(without_id)  # (U, C, A)
        return torch.logit(p, eps=1e-7)

    def user_embedding(
        self,
        item_ids: torch.Tensor,
        action_ids: torch.Tensor,
        surface_ids: torch.Tensor,
        content: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Late-fusion user vector: backbone hidden state at the last real position, (U, L) → (U, D).

        This is the user embedding that ``publish-embeddings`` computes over every user's history
        and the service passes back to :meth:`forward` (``user_emb``) for ``pinfm_late`` and ``hybrid``.
        """
        if pad_mask is None:
            pad_mask = item_ids != 0  # (U, L)
        seq = {"ts": ts, "pad_mask": pad_mask}
        hidden = self.backbone(item_ids, action_ids, surface_ids, content, pad_mask, time_gaps=self.time_gaps(seq))
        return last_hidden(hidden, pad_mask)  # (U, D)

    def _late_features(self, user: torch.Tensor, cand: torch.Tensor) -> list[torch.Tensor]:
        u = user.unsqueeze(1).expand_as(cand)  # (U, C, D)
        cos = nn.functional.cosine_similarity(u, cand, dim=-1, eps=1e-6).unsqueeze(-1)  # (U, C, 1)
        return [u, u * cand, cos]

    def _head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.interaction(self.in_norm(torch.cat(feats, dim=-1)))  # (U, C, A)

    def _late_head(
        self, cand: torch.Tensor, surf: torch.Tensor, early: torch.Tensor | None, user: torch.Tensor, fold: bool | None
    ) -> torch.Tensor:
        """(U, C, A) logits from ``[cand, surf, early, u, u ⊙ cand, cos]``.

        ``fold``: compute the per-request part once per request (:class:`training.model.folded_head.FoldedHead`),
        True / False, or None = where it applies: inference (eval mode, no gradients, no autocast)
        with at least :data:`FOLD_MIN_CANDIDATES` candidates per request.
        """
        if fold is None:
            fold = (
                self._folded is not None
                and not self.training
                and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(cand.device.type)
                and cand.shape[1] >= FOLD_MIN_CANDIDATES
            )
        if fold and self._folded is not None:
            return self._folded(self.in_norm, self.interaction, cand, surf, early, user)
        feats = [cand, surf, *([] if early is None else [early]), *self._late_features(user, cand)]
        return self._head(feats)

    def _late_user(
        self, seq: dict, user_emb: torch.Tensor | None, late_seq: dict | None, n_rows: int
    ) -> torch.Tensor | None:
        """(U, D) late user vector from ``user_emb`` or ``late_seq``; None when neither is given."""
        if user_emb is not None:
            if (
                user_emb.dim() != 2
                or user_emb.shape[0] not in (1, n_rows)
                or user_emb.shape[1] != self.cfg.backbone.d_model
            ):
                raise ValueError(
                    f"user_emb must be ({n_rows}, {self.cfg.backbone.d_model}) or (1, {self.cfg.backbone.d_model}), "
                    f"got {tuple(user_emb.shape)}"
                )
            return user_emb.expand(n_rows, -1)
        if late_seq is None:
            return None
        emb = self.user_embedding(
            late_seq["item_ids"], late_seq["action_ids"], late_seq["surface_ids"], late_seq.get("content"),
            late_seq["pad_mask"], late_seq.get("ts"),
        )  # fmt: skip
        index = late_seq.get("index")
        user = emb if index is None else emb[index]  # (U, D)
        if user.shape[0] != n_rows:
            raise ValueError(f"late_seq gives {user.shape[0]} user vectors for {n_rows} candidate rows")
        return user

    # ------------------------------------------------------------------ scoring
    def forward(
        self,
        seq: dict,
        cand_ids: torch.Tensor,
        cand_surface_ids: torch.Tensor,
        cand_content: torch.Tensor | None = None,
        cand_mask: torch.Tensor | None = None,
        cand_age_s: torch.Tensor | None = None,
        request_ts: torch.Tensor | None = None,
        return_user: bool = False,
        naive: bool = False,
        *,
        user_emb: torch.Tensor | None = None,
        late_seq: dict | None = None,
        fold: bool | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of every candidate of every request.

        Args:
            seq: the U unique sequences: ``item_ids``, ``action_ids``, ``surface_ids`` (U, L)
                int64, ``pad_mask`` (U, L) bool, optional ``content`` (U, L, Cd) and ``ts``
                (U, L) int64 seconds.
            cand_ids: (U, C) candidate ids grouped by request (0 = padding slot).
            cand_surface_ids: (U, C) or (U,) surface ids.
            cand_content: (U, C, Cd) or None.
            cand_mask: (U, C) bool, True at real candidates (default: ``cand_ids != 0``).
            cand_age_s: (U, C) item age at the request in seconds (< 0 unknown), for age dropout.
            request_ts: (U,) request time in seconds, for TransAct's time-window mask.
            return_user: also return the late features' user vector (U, D) (None without one; for a
                ``fused`` hybrid the fusion of the batch embedding and the realtime summary).
            naive: early fusion only: compute it the slow, obvious way (one full backbone pass per
                candidate, :func:`training.model.dcat.naive_candidate_hidden`), the reference DCAT
                must match (eval mode; no new-item dropout on that path).
            user_emb: ``pinfm_late`` and ``hybrid``: the precomputed user embedding, (U, D) or
                (1, D) (:meth:`user_embedding` of the user's history, as published); ignored by
                the other modes.
            late_seq: ``pinfm_late`` and ``hybrid`` without ``user_emb``: the sequences the user
                vector is computed from (keys as ``seq``, (K, L) each, plus an optional ``index``
                (U,) row of each request). Without either, the request's own ``seq``.
            fold: fold the head per request (:meth:`_late_head`); None = where it applies.

        Returns:
            (U, C, A) logits (and the user vector when ``return_user``).
        """
        if fold and self._folded is None:
            raise ValueError(f"the {self.cfg.sequence!r} ranker's head cannot be folded")
        late = {"user_emb": user_emb, "late_seq": late_seq, "fold": fold}
        keep = None if naive else self._young_mix_keep(cand_age_s, request_ts)
        if keep is None:
            return self._forward(
                seq, cand_ids, cand_surface_ids, cand_content, cand_mask, cand_age_s, request_ts, return_user, naive,
                **late,
            )  # fmt: skip
        # young_mix: every candidate twice, with its ID and without it, in one crossing pass
        twice = [
            None if t is None else torch.cat([t, t], dim=1) for t in (cand_ids, cand_content, cand_mask, cand_age_s)
        ]
        surfaces = cand_surface_ids if cand_surface_ids.dim() == 1 else torch.cat([cand_surface_ids] * 2, dim=1)
        id_keep = torch.cat([(keep > 0).float(), torch.zeros_like(keep)], dim=1)  # (U, 2C)
        logits2, user = self._forward(
            seq, twice[0], surfaces, twice[1], twice[2], twice[3], request_ts, True, False, id_keep, **late
        )  # (U, 2C, A)
        logits = self._mix_logits(logits2, keep)  # (U, C, A)
        if cand_mask is None:
            cand_mask = cand_ids != 0
        logits = logits.masked_fill(~cand_mask.bool().unsqueeze(-1), 0.0)
        return (logits, user) if return_user else logits

    def _forward(
        self,
        seq: dict,
        cand_ids: torch.Tensor,
        cand_surface_ids: torch.Tensor,
        cand_content: torch.Tensor | None,
        cand_mask: torch.Tensor | None,
        cand_age_s: torch.Tensor | None,
        request_ts: torch.Tensor | None,
        return_user: bool,
        naive: bool,
        id_keep: torch.Tensor | None = None,
        user_emb: torch.Tensor | None = None,
        late_seq: dict | None = None,
        fold: bool | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` with one input per candidate; ``id_keep`` overrides the inference ID rule."""
        U, C = cand_ids.shape
        if seq["item_ids"].shape[0] != U:
            raise ValueError(f"{seq['item_ids'].shape[0]} sequences for {U} candidate rows")
        if cand_surface_ids.dim() == 1:
            cand_surface_ids = cand_surface_ids.unsqueeze(1).expand(U, C)  # (U, C)
        if cand_mask is None:
            cand_mask = cand_ids != 0
        pad_mask = seq["pad_mask"].bool()
        cand = self.candidate_embedding(cand_ids, cand_content, cand_age_s, request_ts, id_keep)  # (U, C, D)
        surf = self.surface_emb(cand_surface_ids)  # (U, C, S)
        user = None
        mode = self.cfg.sequence
        if mode in ("pinfm_late", *EARLY_FUSION_MODES):
            bb = self.backbone
            args = (seq["item_ids"], seq["action_ids"], seq["surface_ids"], seq.get("content"), pad_mask)
            gaps = self.time_gaps(seq)
            batch = self._late_user(seq, user_emb, late_seq, U) if mode in USER_EMBEDDING_MODES else None  # (U, D)
            early = None
            if mode == "pinfm_late":
                user = batch if batch is not None else last_hidden(bb(*args, time_gaps=gaps), pad_mask)  # (U, D)
            else:
                if batch is None or self.user_fuse is not None:  # the realtime summary is read: the full pass
                    hidden, cache = context_pass(bb, *args, gaps)  # (U, L, D) + every layer's K/V
                    realtime = last_hidden(hidden, pad_mask)  # (U, D)
                    # without a published embedding, the one the model computes from this sequence
                    batch = realtime if batch is None else batch
                    if mode == "pinfm_early":
                        user = realtime
                    elif self.user_fuse is None:  # hybrid_user="stored"
                        user = batch
                    else:
                        user = self.user_fuse(torch.cat([batch, realtime], dim=-1))  # (U, D)
                else:  # hybrid_user="stored" with a given embedding: the cache alone
                    cache, user = context_cache(bb, *args, gaps), batch
                early = self._early(bb, args, gaps, cache, cand, cand_ids, cand_surface_ids, cand_content, cand_mask,
                                    naive)  # fmt: skip
            logits = self._late_head(cand, surf, early, user, fold)  # (U, C, A)
        else:
            feats = [cand, surf]
            if mode == "transact":
                feats.append(self._transact(seq, pad_mask, cand, cand_content, request_ts))
            logits = self._head(feats)  # (U, C, A)
        logits = logits.masked_fill(~cand_mask.unsqueeze(-1), 0.0)
        return (logits, user) if return_user else logits

    def _early(
        self,
        bb: PinFM,
        args: tuple,
        gaps: torch.Tensor | None,
        cache: KVCache,
        cand: torch.Tensor,
        cand_ids: torch.Tensor,
        cand_surface_ids: torch.Tensor,
        cand_content: torch.Tensor | None,
        cand_mask: torch.Tensor,
        naive: bool,
    ) -> torch.Tensor:
        """(U, C, D) early fusion: every candidate's final hidden state as a token after its user's sequence."""
        lengths = cache.lengths
        if lengths.numel() and int(lengths.max()) > history_len(self.cfg):
            raise ValueError(
                f"early fusion appends the candidate after the sequence: sequences must be shorter than "
                f"the backbone's max_len={bb.cfg.max_len}; truncate them to {history_len(self.cfg)}"
            )
        if naive:
            return naive_candidate_hidden(
                bb, *args[:3], cand_ids, cand_surface_ids, args[3], args[4], cand_content, cand_mask, gaps
            )  # (U, C, D)
        tokens = candidate_tokens(bb, cand_ids, cand_surface_ids, lengths, item_emb=cand)  # (U, C, D)
        return crossing_pass(bb, cache, tokens, cand_mask)  # (U, C, D)

    def _transact(
        self,
        seq: dict,
        pad_mask: torch.Tensor,
        cand: torch.Tensor,
        cand_content: torch.Tensor | None,
        request_ts: torch.Tensor | None,
    ) -> torch.Tensor:
        """(U, C, (K+1)·D) TransAct's summary of the sequence for every candidate."""
        keep = pad_mask
        if self.training and seq.get("ts") is not None and request_ts is not None:
            keep = random_time_window_mask(
                seq["ts"], pad_mask, request_ts, self.cfg.transact_window_s, self.cfg.transact_window_p
            )  # (U, L)
        seq_emb = self.backbone.items(seq["item_ids"], seq.get("content"))  # (U, L, D)
        actions = seq["action_ids"] * keep  # (U, L)
        if self.cfg.lifelong_top_k > 0:
            return self._lifelong_transact(seq, seq_emb, actions, keep, cand, cand_content)
        return self.transact(seq_emb, actions, keep, cand)  # (U, C, (K+1)·D)

    def _lifelong_transact(
        self,
        seq: dict,
        seq_emb: torch.Tensor,
        actions: torch.Tensor,
        keep: torch.Tensor,
        cand: torch.Tensor,
        cand_content: torch.Tensor | None,
    ) -> torch.Tensor:
        """TransAct over each candidate's own selection from the history (TransAct V2) → (U, C, (K+1)·D)."""
        if seq.get("content") is None or cand_content is None:
            raise ValueError(
                "lifelong_top_k > 0 selects actions by content similarity: sequences and candidates need content"
            )
        U, C, _ = cand.shape
        idx, valid = select_lifelong(
            seq["item_ids"], seq["content"], keep, cand_content, self.cfg.lifelong_top_k, self.cfg.lifelong_recent_r
        )  # (U, C, S) positions, validity
        S = idx.shape[-1]
        sel_emb = gather_selected(seq_emb, idx).reshape(U * C, S, -1)  # (U·C, S, D)
        sel_actions = (gather_selected(actions, idx) * valid).reshape(U * C, S)  # (U·C, S)
        out = self.transact(sel_emb, sel_actions, valid.reshape(U * C, S), cand.reshape(U * C, 1, -1))
        return out.view(U, C, -1)  # (U, C, (K+1)·D)

    def score_from_user_embedding(
        self,
        user_emb: torch.Tensor,
        cand_ids: torch.Tensor,
        cand_content: torch.Tensor | None,
        surface_ids: torch.Tensor,
        cand_age_s: torch.Tensor | None = None,
        request_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Late-fusion scoring from precomputed user vectors (modes ``none`` and ``pinfm_late``).

        Args:
            user_emb: (U, D), or (1, D) broadcast over the U rows of ``cand_ids``.
            cand_ids: (U, C) int64.
            cand_content: (U, C, Cd) or None.
            surface_ids: (U,) or (U, C) int64.
            cand_age_s, request_ts: as in :meth:`forward` (items created after
                ``cfg.id_cutoff_s`` are scored from content).

        Returns:
            (U, C, A) logits.
        """
        if self.uses_sequence_per_candidate:
            raise ValueError(f"a {self.cfg.sequence!r} ranker scores from the sequence: call forward(seq, …)")
        U, C = cand_ids.shape
        if surface_ids.dim() == 1:
            surface_ids = surface_ids.unsqueeze(1).expand(U, C)  # (U, C)

        def head(id_keep: torch.Tensor | None) -> torch.Tensor:
            cand = self.candidate_embedding(cand_ids, cand_content, cand_age_s, request_ts, id_keep)  # (U, C, D)
            surf = self.surface_emb(surface_ids)  # (U, C, S)
            if self.cfg.sequence == "pinfm_late":
                return self._late_head(cand, surf, None, user_emb.expand(U, -1), None)  # (U, C, A)
            return self._head([cand, surf])  # (U, C, A)

        keep = self._young_mix_keep(cand_age_s, request_ts)
        if keep is None:
            return head(None)
        return self._mix_logits(torch.cat([head((keep > 0).float()), head(torch.zeros_like(keep))], dim=1), keep)


def init_from_backbone(ranker: Ranker, state_dict: dict) -> None:
    """Load pretrained PinFM weights into ``ranker.backbone`` (shapes must match)."""
    missing, unexpected = ranker.backbone.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if not k.startswith("gap_emb")]:
        raise ValueError(f"backbone weights do not fit: missing {missing}, unexpected {unexpected}")


def backbone_param_names(ranker: Ranker) -> set[str]:
    """Names of the pretrained part (trained at a lower learning rate)."""
    return {f"backbone.{n}" for n, _ in ranker.backbone.named_parameters()}
