"""``afm bench quantize``: a registered ranker with float, int8 and int4 item tables, side by side.

For one ranker version (default: CURRENT) it builds the three models (the float source and its
:func:`training.model.quantize.quantize_item_tables` copies) and reports, per item-table format:

* memory: the item tables' bytes and the bytes ``model.pt`` takes (the serialized state dict);
* speed: candidates/s of scoring one request, as the service's ``ServingModel.score`` scores it
  (the ranker's forward under ``torch.no_grad`` and the sigmoid, with a stored user embedding
  and the request's sequence), for ``candidates`` catalogue items: the eval day's request with
  the longest sequence. The formats are timed in turn within every repetition (so load changes
  hit all three alike) after warm-up; the figure is the median over repetitions;
* quality (``evaluate``): per-action AUC and HIT@3 on the version's evaluation day, for every
  item-table format with the user embeddings in float32, int8 and int4 (as ``publish-embeddings``
  would store them for an exported model), by :class:`training.jobs.export.EvalDay`;
* the bytes one user embedding takes in the online store's value for each format (the payload
  of ``features.store.encode_user_embeddings``, or 4 · D for the float list).

One JSON line; speed figures are measurements, not assertions (no test times them).
"""

from __future__ import annotations

import copy
import statistics
import time

import numpy as np
import torch

from features.config import Layout
from features.store import encode_user_embeddings
from training.jobs import registry
from training.jobs.export import EvalDay, ranker_of, state_dict_bytes
from training.jobs.finetune import batch_tensors
from training.model.backbone import device_name
from training.model.inputs import history_len
from training.model.quantize import BITS, FORMATS, quantize_item_tables, table_bytes
from training.model.ranker import Ranker

TABLE_FORMATS = ("fp32", "int8", "int4")


def _request(day: EvalDay, model: Ranker, candidates: int, seed: int) -> dict:
    """Inputs of one request with ``candidates`` catalogue items: the eval day's request with the longest sequence."""
    data = day.data
    longest = int(np.argmax(data.sequences.lengths))
    idx = np.flatnonzero(data.req_index == longest)
    b = batch_tensors(data, idx, day.items, torch.device("cpu"), history_len(model.cfg), model.uses_user_embedding)
    pool = np.unique(np.concatenate([data.item_ids, data.sequences.item_ids[data.sequences.item_ids > 0]]))
    rng = np.random.default_rng(seed)
    ids = rng.choice(pool, size=candidates, replace=candidates > len(pool))  # (C,)
    request_ts = b["request_ts"]  # (1,)
    out = {
        "seq": b["seq"],
        "cand_ids": torch.from_numpy(ids)[None, :],  # (1, C)
        "cand_surface_ids": b["cand_surface_ids"][:, :1].expand(1, candidates).contiguous(),  # (1, C)
        "cand_age_s": torch.from_numpy(day.items.created.age_at(ids, int(request_ts[0])))[None],  # (1, C)
        "cand_content": torch.from_numpy(day.items.content.lookup(ids[None, :])) if len(day.items.content) else None,
        "request_ts": request_ts,
        "late_seq": b.get("late_seq"),
    }
    return out


@torch.no_grad()
def _stored_embedding(model: Ranker, req: dict) -> torch.Tensor | None:
    """(1, D) the user embedding publish-embeddings would store for the request's user (None if the ranker ignores it)."""
    late = req["late_seq"]
    if not model.uses_user_embedding or late is None:
        return None
    emb = model.user_embedding(
        late["item_ids"], late["action_ids"], late["surface_ids"], late.get("content"), late["pad_mask"], late.get("ts")
    )  # (K, D)
    return emb[late["index"]]  # (1, D)


def bench_quantize(
    layout: Layout,
    version: str | None = None,
    candidates: int = 500,
    reps: int = 30,
    warmup: int = 5,
    evaluate: bool = True,
    seed: int = 0,
) -> dict:
    """Memory, scoring speed and quality of a ranker version with fp32, int8 and int4 item tables (CPU).

    Args:
        layout: data root with the registry and the version's evaluation day.
        version: a float ranker version; None = CURRENT.
        candidates: candidates of the timed request.
        reps: timed calls per format (each repetition times every format once, in turn).
        warmup: untimed calls per format first.
        evaluate: also report per-action AUC and HIT@3 on the evaluation day per table and user-embedding format.
        seed: which catalogue items are the candidates.

    Returns:
        ``{"version", "candidates", "reps", "device", "history_len", "formats": {fmt: {...}},
        "user_embedding_bytes": {fmt: n}, "quality": [rows]}``.
    """
    version = version or registry.current_version(layout)
    if version is None:
        raise registry.RegistryError(f"no ranker is promoted ({registry.current_file(layout)}); name --version")
    art = registry.load_artifact(layout, "ranker", version)
    fp32 = ranker_of(art)
    models: dict[str, Ranker] = {"fp32": fp32}
    for fmt in ("int8", "int4"):
        models[fmt] = copy.deepcopy(fp32)
        quantize_item_tables(models[fmt], BITS[fmt])
    day = EvalDay(layout, art)
    req = _request(day, fp32, candidates, seed)
    user = _stored_embedding(fp32, req)

    def score(model: Ranker) -> np.ndarray:
        with torch.no_grad():
            logits = model(
                req["seq"], req["cand_ids"], req["cand_surface_ids"], req["cand_content"],
                cand_age_s=req["cand_age_s"], request_ts=req["request_ts"], user_emb=user,
            )  # fmt: skip
            return torch.sigmoid(logits[0]).numpy()  # (C, A)

    ref = score(fp32)
    for _ in range(warmup):
        for m in models.values():
            score(m)
    times: dict[str, list[float]] = {f: [] for f in models}
    order = list(models)
    for r in range(reps):
        for f in order[r % len(order) :] + order[: r % len(order)]:  # a different format first each time
            t0 = time.perf_counter()
            score(models[f])
            times[f].append(time.perf_counter() - t0)
    formats = {}
    base = statistics.median(times["fp32"])
    for f, m in models.items():
        med = statistics.median(times[f])
        formats[f] = {
            "cand_per_s": round(candidates / med, 1),
            "median_ms": round(med * 1e3, 3),
            "speed_vs_fp32": round(base / med, 3),
            "table_bytes": table_bytes(m),
            "model_pt_bytes": state_dict_bytes(m),
            "max_abs_prob_diff": float(np.abs(score(m) - ref).max()),
        }
    d = fp32.cfg.backbone.d_model
    probe = np.linspace(-1, 1, d, dtype=np.float32)[None, :]
    user_bytes = {f: (4 * d if f == "fp32" else len(encode_user_embeddings(probe, BITS[f])[0])) for f in FORMATS}
    out = {
        "version": version,
        "eval_day": day.ds,
        "candidates": candidates,
        "reps": reps,
        "device": device_name(torch.device("cpu")),
        "history_len": int(req["seq"]["pad_mask"].sum()),
        "sequence": fp32.cfg.sequence,
        "formats": formats,
        "user_embedding_bytes": user_bytes,
    }
    if evaluate:
        rows = []
        for f, m in models.items():
            for u in FORMATS if fp32.uses_user_embedding else ("fp32",):
                metrics = day.metrics(m, BITS.get(u))
                rows.append({"item_tables": f, "user_embeddings": u, **{k: metrics.get(k) for k in _QUALITY}})
        out["quality"] = rows
    return out


_QUALITY = ("auc_click", "auc_save", "auc_hide", "hit3_click", "auc_click_new", "auc_click_old")
