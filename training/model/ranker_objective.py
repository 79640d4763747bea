"""The fine-tuning loss of the ranker, as an objective of :class:`training.trainer.Trainer`.

Three terms, on one batch of whole requests (laid out by :func:`training.jobs.finetune.batch_tensors`):

* TransAct's head-weighted binary cross-entropy of every action head
  (:func:`training.model.interaction.weighted_bce`);
* TransAct V2's Next Action Loss: the late user vector against the engaged item and the
  request's silent impressions (:func:`next_action_term`);
* optionally the backbone's own next-token loss on the request sequences, so that fine-tuning
  does not forget what pretraining learned (a :class:`training.model.objectives.PinFMObjective`).

Shapes: U = requests of the batch, C = candidates per request, A = actions, D = d_model.
"""

from __future__ import annotations

import torch
from torch import nn

from features.contract import ACTION_IDS, POSITIVE_ACTIONS
from training.model.interaction import weighted_bce
from training.model.objectives import PinFMObjective
from training.model.ranker import Ranker
from training.model.transact import next_action_loss


def ranker_logits(model: Ranker, b: dict, return_user: bool = False):
    """(U, C, A) logits of a ranking batch (and the late user vector (U, D) with ``return_user``).

    A batch with ``late_seq`` (the histories the published user embeddings were computed from)
    gives ``pinfm_late`` and ``hybrid`` rankers their user vector from those; a batch with
    ``user_emb`` (U, D), precomputed ones.
    """
    return model(
        b["seq"],
        b["cand_ids"],
        b["cand_surface_ids"],
        b["cand_content"],
        b["cand_mask"],
        b["cand_age_s"],
        b["request_ts"],
        return_user=return_user,
        user_emb=b.get("user_emb"),
        late_seq=b.get("late_seq"),
    )


def next_action_term(model: Ranker, b: dict, user: torch.Tensor | None) -> torch.Tensor | None:
    """TransAct V2's Next Action Loss of a batch: each request's engaged item vs its other impressions.

    Positive: the request's first impression with any positive label (not ``hide``); negatives:
    its impressions with no label at all. Requests without both are skipped. None without a
    backbone user vector (modes ``none`` and ``transact``).
    """
    if user is None:
        return None
    actions = list(model.actions)
    pos_cols = [j for j, a in enumerate(actions) if a != "hide"]
    engaged = b["labels"][..., pos_cols].amax(-1) > 0  # (U, C)
    engaged = engaged & b["cand_mask"]
    silent = (b["labels"].amax(-1) == 0) & b["cand_mask"]  # (U, C) impressed, nothing done
    valid = engaged.any(1) & silent.any(1)  # (U,)
    if not bool(valid.any()):
        return None
    first = engaged.float().argmax(1)  # (U,) first engaged slot
    rows = torch.arange(len(first), device=first.device)
    content = b["cand_content"]
    pos_ids = b["cand_ids"][rows, first]  # (U,)
    pos_emb = model.backbone.item_embedding(pos_ids, content[rows, first] if content is not None else None)  # (U, D)
    neg_emb = model.backbone.item_embedding(b["cand_ids"], content)  # (U, C, D)
    return next_action_loss(user, pos_emb, neg_emb, silent, valid=valid)


class RankerObjective(nn.Module):
    """Weighted BCE per action head + Next Action Loss + the backbone's next-token loss.

    Args:
        label_weights: (A, A) rows = heads, columns = labels (:func:`weighted_bce`).
        next_action_weight: weight of the Next Action Loss (0 = off).
        aux: the backbone's pretraining objective for the request sequences, or None.
        aux_weight: its weight.

    Example:
        >>> objective = RankerObjective(torch.eye(3), next_action_weight=0.01)
        >>> loss, stats = objective(ranker, batch)  # a batch of finetune.batch_tensors
    """

    def __init__(
        self,
        label_weights: torch.Tensor,
        next_action_weight: float = 0.0,
        aux: PinFMObjective | None = None,
        aux_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("label_weights", label_weights.float())
        self.register_buffer("positive_ids", torch.tensor([ACTION_IDS[a] for a in POSITIVE_ACTIONS]))
        self.next_action_weight = next_action_weight
        self.aux = aux
        self.aux_weight = aux_weight

    def forward(self, model: Ranker, b: dict) -> tuple[torch.Tensor, dict]:
        logits, user = ranker_logits(model, b, return_user=True)  # (U, C, A), (U, D)
        bce = weighted_bce(logits, b["labels"], self.label_weights, mask=b["cand_mask"])
        loss, stats = bce, {"bce": float(bce.detach())}
        if self.next_action_weight > 0 and (nal := next_action_term(model, b, user)) is not None:
            loss = loss + self.next_action_weight * nal
            stats["next_action"] = float(nal.detach())
        if self.aux is not None and self.aux_weight > 0:
            seq = {k: v for k, v in b["seq"].items() if v is not None and k != "ts"}
            seq["positive"] = torch.isin(seq["action_ids"], self.positive_ids) & seq["pad_mask"]
            gaps = model.time_gaps(b["seq"])  # (U, L): the backbone's input as in scoring
            if gaps is not None:
                seq["time_gaps"] = gaps
            aux_loss, _ = self.aux(model.backbone, seq)
            loss = loss + self.aux_weight * aux_loss
            stats["aux_next_token"] = float(aux_loss.detach())
        return loss, stats
