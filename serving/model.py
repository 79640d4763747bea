"""What the scoring service holds: one ranker version on CPU, eval mode, no autograd.

Two calls: :meth:`ServingModel.user_embeddings` (once per user, can be precomputed and
published) and :meth:`ServingModel.score` (per request, for any number of candidates). An
early-fusion ranker (``hybrid``, ``pinfm_early``: DCAT) or a TransAct ranker also reads the
request's sequence in :meth:`score`: one context pass, then every candidate cross-attends to it.

The default ranker, ``hybrid`` (TransAct's hybrid), reads both: the user embedding (PinFM's
pass over the user's history, published per model version by ``publish-embeddings``) and the
realtime sequence (DCAT at request time). ``pinfm_late`` reads the embedding alone; the other
modes ignore it (:attr:`ServingModel.uses_user_embedding`), and for them
:meth:`~ServingModel.user_embeddings` runs no model pass and returns zeros. The published
embedding of day D covers the user's events before D 00:00 UTC (:func:`history_before_day`),
as fine-tuning computes it (:func:`training.jobs.finetune.late_sequences`). Without a stored
embedding, ``score(None, …, sequence=…, request_ts=…)`` computes that one, and only where the
scores read it: when no event of the request's day is in the sequence, in the DCAT context
pass that reads the sequence for the candidates anyway (one pass, not two); it gives the
scores of ``score(user_embeddings([history_before_day(sequence, request_ts)])[0], …)``.

A sequence may carry ``"ts"``, each event's time (unix seconds or datetimes, oldest first,
aligned with ``item_ids``): a ranker trained with ``RankerConfig.time_gaps`` then gets the
same log-time-gap buckets as in offline scoring (:func:`training.jobs.finetune.batch_tensors`).
A sequence without ``"ts"`` (or ``None``) has unknown gaps: it is scored without them.

The rules that decide the ranker's inputs are training's own (:mod:`training.model.inputs`):
the history length, the candidate's age at the request and the time gaps; the sequence
tensors come from :func:`training.data.encode_sequences` and
:meth:`training.data.SequenceArrays.tensors`, as in fine-tuning. :meth:`ServingModel.ranker_inputs`
shows what one request feeds the ranker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from features.config import Layout
from features.contract import SURFACE_IDS, ContractError
from training.data import ContentTable, ItemCreatedAt, SequenceArrays, encode_sequences
from training.model.inputs import history_len, reads_event_times
from training.model.quantize import QuantizationConfig, quantize_item_tables
from training.model.ranker import Ranker, RankerConfig

#: UTC days: the user embeddings published after day D's pipeline serve the requests of D + 1
DAY_S = 86_400


def history_before_day(sequence: dict, request_s: int) -> dict:
    """The sequence's events before the UTC day of ``request_s``: the history a published user embedding covers.

    ``publish-embeddings`` runs on a day's snapshot, so during day D the stored embedding is of
    the user's events before D 00:00 UTC. A sequence without event times (``ts`` absent or None)
    is taken whole.

    Args:
        sequence: "item_ids", "actions", "surfaces" and optionally "ts" (unix seconds, oldest first).
        request_s: the request time, unix seconds.
    """
    ts = sequence.get("ts")
    if ts is None:
        return sequence
    start = int(request_s) - int(request_s) % DAY_S
    n = sum(1 for t in ts if int(t) < start)  # oldest first: a prefix
    return {key: (None if values is None else list(values)[:n]) for key, values in sequence.items()}


def _settings_of(quant: dict) -> dict:
    """The :class:`QuantizationConfig` fields of a config.json ``quantization`` section (it also records bits, tables, source)."""
    return {k: v for k, v in quant.items() if k in QuantizationConfig.model_fields}


class ServingModel:
    """A loaded ranker version.

    A version exported with ``afm model export --quantize`` serves as it was saved: its item-ID
    tables stay quantized (:mod:`training.model.quantize`), and ``user_embedding_bits`` says how
    its published user embeddings are stored.

    Attributes:
        version: the ranker version string.
        actions: action names of the score columns.
        embedding_dim: size of a user embedding.
        max_len: sequences are truncated to their newest ``max_len`` events
            (:func:`training.model.inputs.history_len`).
        user_embedding_bits: 8 or 4 when ``publish-embeddings`` stores this version's user
            embeddings quantized, None for float32.
    """

    def __init__(
        self,
        ranker: Ranker,
        version: str,
        content: ContentTable | None = None,
        created: ItemCreatedAt | None = None,
        user_embedding_bits: int | None = None,
    ) -> None:
        self.ranker = ranker.cpu().eval()
        # how publish-embeddings stores this version's user embeddings: 8 / 4 bits per value, None = float32
        self.user_embedding_bits = user_embedding_bits
        self.version = version
        self.actions: tuple[str, ...] = tuple(ranker.cfg.actions)
        self.embedding_dim: int = ranker.cfg.backbone.d_model
        self.max_len: int = history_len(ranker.cfg)  # as fine-tuning reads the ranking examples
        self.content = content if content is not None else ContentTable.empty(ranker.cfg.backbone.content_dim)
        # creation times: items created after the ranker's training data are scored from content
        self.created = created if created is not None else ItemCreatedAt(np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.chunk = 1024  # users per backbone pass in user_embeddings

    @property
    def uses_user_embedding(self) -> bool:
        """Whether the scores read the user embedding (``hybrid``, ``pinfm_late``); other rankers ignore it."""
        return self.ranker.uses_user_embedding

    @classmethod
    def from_artifact(cls, layout: Layout, artifact: dict) -> ServingModel:
        """Build from :func:`training.jobs.registry.load_artifact` output (``config["ranker"]`` holds the shape)."""
        cfg_dict = artifact["config"].get("ranker")
        if cfg_dict is None:
            raise ContractError(f"{artifact['path']}/config.json has no 'ranker' section; is it a ranker artifact?")
        ranker = Ranker(RankerConfig.from_dict(cfg_dict))
        quant = artifact["config"].get("quantization")
        if quant is not None:  # an exported version: its state dict holds quantized item tables
            quantize_item_tables(ranker, int(quant["bits"]), structure_only=True)
        ranker.load_state_dict(artifact["state_dict"])
        content = ContentTable.from_layout(layout, ranker.cfg.backbone.content_dim)
        user_bits = None if quant is None else QuantizationConfig.from_dict(_settings_of(quant)).user_embedding_bits
        return cls(ranker, artifact["version"], content, ItemCreatedAt.from_layout(layout), user_bits)

    def _event_times(self, seq: dict, where: str) -> list | None:
        """The sequence's per-event times when the ranker reads them, else None (unknown or unused).

        Raises:
            ContractError: when ``seq["ts"]`` is given but not aligned with ``seq["item_ids"]``.
        """
        if not reads_event_times(self.ranker.cfg):
            return None  # a ranker without time gaps never reads them
        ts = seq.get("ts")
        if ts is None:
            return None
        ts = list(ts)
        n = 0 if seq["item_ids"] is None else len(seq["item_ids"])
        if len(ts) != n:
            raise ContractError(f"{where} has {len(ts)} event times for {n} events; 'ts' must align with 'item_ids'")
        return ts

    def _encode(self, sequences: Sequence[dict], times: Sequence[list] | None) -> SequenceArrays:
        """Right-padded arrays of the newest ``max_len`` events; ``ts`` (N, L) seconds when ``times`` is given."""
        return encode_sequences(
            [s["item_ids"] for s in sequences],
            [s["actions"] for s in sequences],
            [s["surfaces"] for s in sequences],
            self.max_len,
            times,
        )

    def user_embeddings(self, sequences: Sequence[dict]) -> np.ndarray:
        """User embeddings of a batch of sequences.

        Args:
            sequences: dicts with "item_ids", "actions", "surfaces" lists (oldest first,
                newest last; empty lists allowed) and optionally "ts", the events' times
                (unix seconds, aligned with "item_ids"; absent or None = unknown).

        Returns:
            (U, D) float32: the ranker's :meth:`~training.model.ranker.Ranker.user_embedding` of
            the newest ``max_len`` events; zeros, without a model pass, when the ranker does not
            read a user embedding (:attr:`uses_user_embedding`).
        """
        if not sequences:
            return np.zeros((0, self.embedding_dim), np.float32)
        for i, s in enumerate(sequences):
            missing = [k for k in ("item_ids", "actions", "surfaces") if k not in s]
            if missing:
                raise ContractError(f"sequence {i} lacks keys {missing}")
        times = [self._event_times(s, f"sequence {i}") for i, s in enumerate(sequences)]
        if not self.uses_user_embedding:  # its scores never read it: compute nothing
            return np.zeros((len(sequences), self.embedding_dim), np.float32)
        known = np.array([t is not None for t in times])  # (U,)
        out = np.zeros((len(sequences), self.embedding_dim), np.float32)
        # sequences with and without times in separate passes: unknown times mean no gaps, not zero gaps
        for group in (np.flatnonzero(known), np.flatnonzero(~known)):
            if not len(group):
                continue
            arrays = self._encode([sequences[i] for i in group], [times[i] for i in group] if known[group[0]] else None)
            for start in range(0, len(arrays), self.chunk):
                rows = np.arange(start, min(start + self.chunk, len(arrays)))
                b = arrays.tensors(rows, self.content)
                with torch.no_grad():
                    emb = self.ranker.user_embedding(
                        b["item_ids"], b["action_ids"], b["surface_ids"], b["content"], b["pad_mask"], b.get("ts")
                    )  # (chunk, D)
                out[group[rows]] = emb.numpy()
        return out

    def ranker_inputs(
        self,
        candidates: Sequence[int],
        surface: str,
        content: dict[int, Sequence[float]] | None = None,
        sequence: dict | None = None,
        request_ts: int | None = None,
    ) -> dict:
        """What one request feeds the ranker: the inputs of :meth:`score`, laid out as one row of
        :func:`training.jobs.finetune.batch_tensors`.

        Args: as in :meth:`score`.

        Returns:
            ``seq`` (the sequence's tensors, (1, L) each: ``item_ids``, ``action_ids``,
            ``surface_ids``, ``pad_mask``, ``content`` (1, L, Cd) or None, ``ts`` (1, L) seconds
            when the ranker reads event times and the sequence has them), ``cand_ids``,
            ``cand_surface_ids``, ``cand_age_s`` (1, C) int64 (-1 = unknown), ``cand_content``
            (1, C, Cd) float32 and ``request_ts`` (1,) int64.

        Raises:
            ContractError: an unknown surface, action or candidate content of the wrong size, or
                a sequence that lacks keys or has misaligned event times.
        """
        if surface not in SURFACE_IDS:
            raise ContractError(f"unknown surface {surface!r}; expected one of {sorted(SURFACE_IDS)}")
        ids = np.asarray(candidates, dtype=np.int64).reshape(-1)  # (C,)
        cand_content = self.content.lookup(ids)  # (C, Cd)
        if content:
            rows = [j for j, item in enumerate(ids.tolist()) if content.get(item) is not None]
            vectors = [content[int(ids[j])] for j in rows]
            for j, vec in zip(rows, vectors, strict=True):
                if len(vec) != self.content.dim:
                    raise ContractError(
                        f"content of item {int(ids[j])} has {len(vec)} values, expected {self.content.dim}"
                    )
            if rows:
                cand_content[rows] = np.asarray(vectors, dtype=np.float32)  # (R, Cd) in one copy
        now = int(time.time()) if request_ts is None else int(request_ts)
        seq = sequence or {"item_ids": [], "actions": [], "surfaces": []}
        missing = [k for k in ("item_ids", "actions", "surfaces") if k not in seq]
        if missing:
            raise ContractError(f"the sequence lacks keys {missing}")
        times = self._event_times(seq, "the sequence")
        arrays = self._encode([seq], None if times is None else [times])
        return {
            "seq": arrays.tensors(np.arange(1), self.content),  # (1, L) each, "ts" (1, L) seconds when read
            "cand_ids": torch.from_numpy(ids)[None, :],  # (1, C)
            "cand_surface_ids": torch.full((1, len(ids)), SURFACE_IDS[surface], dtype=torch.long),  # (1, C)
            "cand_age_s": torch.from_numpy(self.created.age_at(ids, now))[None],  # (1, C) seconds, -1 = unknown
            "cand_content": torch.from_numpy(cand_content)[None],  # (1, C, Cd)
            "request_ts": torch.tensor([now], dtype=torch.long),  # (1,)
        }

    def score(
        self,
        user_embedding: np.ndarray | None,
        candidates: Sequence[int],
        surface: str,
        content: dict[int, Sequence[float]] | None = None,
        sequence: dict | None = None,
        request_ts: int | None = None,
    ) -> np.ndarray:
        """Per-action probabilities of each candidate.

        Args:
            user_embedding: (D,) from :meth:`user_embeddings` (the published one, for this
                model version), or None: computed here as publish-embeddings computes it, from
                :func:`history_before_day` of ``sequence`` (for ``hybrid`` in the DCAT context
                pass when that history is the whole sequence); ignored by rankers that do not
                read it (:attr:`uses_user_embedding`).
            candidates: C item ids.
            surface: one of features.contract.SURFACES.
            content: optional item_id → content vector, overriding the catalogue's.
            sequence: the user's sequence ("item_ids", "actions", "surfaces", optionally "ts"
                as in :meth:`user_embeddings`), read by early-fusion and TransAct rankers
                (None = an unknown user's empty sequence).
            request_ts: the request time in unix seconds (default: now); with the catalogue's
                creation times it gives each candidate's age, which tells which candidates are
                newer than the ranker's training data.

        Returns:
            (C, A) float32 probabilities, columns in ``self.actions`` order.
        """
        return self.score_many([ScoreRequest(user_embedding, candidates, surface, content, sequence, request_ts)])[0]

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[np.ndarray]:
        """Per-action probabilities of several requests; what :meth:`score` gives each, in fewer ranker passes.

        Requests that read the sequence per candidate (DCAT, TransAct) and agree on what their
        inputs carry (event times known or not, a user embedding given or computed in the pass,
        an empty sequence or not) share one pass: sequences right-padded to the longest,
        candidates padded to the most and masked, one row per request. Each candidate's score
        depends only on its own request's row, so the scores are :meth:`score`'s up to float
        rounding. Other rankers score the requests one after another.

        Args:
            requests: the requests, each as the arguments of :meth:`score`.

        Returns:
            One (C_i, A) float32 array per request, in order.

        Raises:
            ContractError: as :meth:`score`, naming the first invalid request.
        """
        prepared = [self._prepare(r) for r in requests]
        out: list[np.ndarray | None] = [None] * len(prepared)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prepared):
            if p is None:
                out[i] = np.zeros((0, len(self.actions)), np.float32)
            elif not self.ranker.uses_sequence_per_candidate:
                out[i] = self._score_late(p)
            else:
                groups.setdefault(_batch_key(p), []).append(i)
        for rows in groups.values():
            for i, probs in zip(rows, self._score_per_candidate([prepared[i] for i in rows]), strict=True):
                out[i] = probs
        return out  # type: ignore[return-value]

    def _prepare(self, r: ScoreRequest) -> dict | None:
        """One request's validated ranker inputs and user vector (None: no candidates)."""
        if r.surface not in SURFACE_IDS:
            raise ContractError(f"unknown surface {r.surface!r}; expected one of {sorted(SURFACE_IDS)}")
        user = None
        if r.user_embedding is not None:
            user = np.asarray(r.user_embedding, dtype=np.float32).reshape(-1)
            if user.shape != (self.embedding_dim,):
                raise ContractError(
                    f"user embedding has {user.size} values, model {self.version} expects {self.embedding_dim}"
                )
        if len(r.candidates) == 0:
            return None
        per_candidate = self.ranker.uses_sequence_per_candidate
        if user is None and self.uses_user_embedding:
            seq = r.sequence or {"item_ids": [], "actions": [], "surfaces": []}
            history = history_before_day(seq, int(time.time()) if r.request_ts is None else int(r.request_ts))
            if not per_candidate or len(history["item_ids"]) < len(seq["item_ids"]):  # a pass of its own
                user = self.user_embeddings([history])[0]
            # else (hybrid, no event of the day): the context pass over the sequence gives it
        if user is None or not self.uses_user_embedding:
            user = np.zeros(self.embedding_dim, np.float32)  # not read; hybrid computes its own in the pass
            stored = None
        else:
            stored = torch.from_numpy(user)[None, :]  # (1, D)
        b = self.ranker_inputs(r.candidates, r.surface, r.content, r.sequence if per_candidate else None, r.request_ts)
        return {"inputs": b, "user": user, "stored": stored}

    def _score_late(self, p: dict) -> np.ndarray:
        """A ranker that reads a user vector, not the sequence per candidate: (C, A) probabilities."""
        b = p["inputs"]
        with torch.no_grad():
            logits = self.ranker.score_from_user_embedding(
                torch.from_numpy(p["user"])[None, :],  # (1, D)
                b["cand_ids"],
                b["cand_content"],
                b["cand_surface_ids"],
                cand_age_s=b["cand_age_s"],
                request_ts=b["request_ts"],
            )  # (1, C, A)
        return torch.sigmoid(logits[0]).numpy().astype(np.float32)

    def _score_per_candidate(self, group: list[dict]) -> list[np.ndarray]:
        """Requests of one batch key in one ranker pass: (C_i, A) probabilities each."""
        seqs = [p["inputs"]["seq"] for p in group]
        width = max(s["item_ids"].shape[1] for s in seqs)
        seq = {
            key: None if seqs[0][key] is None else torch.cat([_pad_right(s[key], width) for s in seqs])
            for key in seqs[0]
        }  # (U, L) each, content (U, L, Cd)
        n_cand = [p["inputs"]["cand_ids"].shape[1] for p in group]
        most = max(n_cand)

        def cands(key: str, fill: float = 0) -> torch.Tensor:
            return torch.cat([_pad_right(p["inputs"][key], most, fill) for p in group])  # (U, C, ...)

        stored = None if group[0]["stored"] is None else torch.cat([p["stored"] for p in group])  # (U, D)
        cand_ids = cands("cand_ids")  # (U, C)
        mask = torch.arange(most)[None, :] < torch.tensor(n_cand)[:, None]  # (U, C)
        with torch.no_grad():
            logits = self.ranker(
                seq,
                cand_ids,
                cands("cand_surface_ids"),
                cands("cand_content"),
                cand_mask=mask if len(group) > 1 else None,
                cand_age_s=cands("cand_age_s", -1),
                request_ts=torch.cat([p["inputs"]["request_ts"] for p in group]),
                user_emb=stored,  # hybrid without it: the user vector of this context pass
            )  # (U, C, A)
        probs = torch.sigmoid(logits).numpy().astype(np.float32)
        return [probs[u, : n_cand[u]] for u in range(len(group))]


@dataclass(frozen=True)
class ScoreRequest:
    """One request to :meth:`ServingModel.score_many`: the arguments of :meth:`ServingModel.score`."""

    user_embedding: np.ndarray | None
    candidates: Sequence[int]
    surface: str
    content: dict[int, Sequence[float]] | None = None
    sequence: dict | None = None
    request_ts: int | None = None


def _batch_key(p: dict) -> tuple:
    """What requests must agree on to share one ranker pass."""
    seq = p["inputs"]["seq"]
    return ("ts" in seq, p["stored"] is None, bool(seq["pad_mask"].any()))


def _pad_right(t: torch.Tensor, width: int, fill: float = 0) -> torch.Tensor:
    """(1, W, ...) → (1, width, ...), the new columns ``fill`` (padding ids, False masks, zero content)."""
    missing = width - t.shape[1]
    if missing <= 0:
        return t
    pad = torch.full((t.shape[0], missing, *t.shape[2:]), fill, dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def load_ranker(layout: Layout, version: str | None = None) -> ServingModel:
    """Load a registered ranker for serving (CPU, eval mode).

    Args:
        layout: data root (item content is read from ``layout.items`` when present).
        version: a ranker version; None = CURRENT.

    Raises:
        training.jobs.registry.RegistryError: nothing is promoted, or the version does not exist.
    """
    from training.jobs.registry import RegistryError, current_file, current_version, load_artifact

    if version is None:
        version = current_version(layout)
        if version is None:
            raise RegistryError(
                f"no ranker is promoted: {current_file(layout)} does not exist "
                "(run `afm train finetune` or `afm model promote VERSION`)"
            )
    return ServingModel.from_artifact(layout, load_artifact(layout, "ranker", version))
