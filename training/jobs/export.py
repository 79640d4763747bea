"""``afm model export``: a registered ranker → a new ranker version with quantized serving tables.

The export reads a ranker version (default: CURRENT), swaps its item-ID sub-tables for per-row
int8 or int4 ones (:mod:`training.model.quantize`) and saves the result as a NEW version of
the registry, never touching the source. The new version's

* ``model.pt`` holds the quantized buffers (codes, scales, offsets) instead of the float tables;
* ``config.json`` is the source's with a ``quantization`` section: the item-table format and
  bits, the format of the user embeddings ``publish-embeddings`` writes for it, the swapped
  tables and the source version (the serving model rebuilds the quantized structure from it);
* ``quantization.json`` records the tables' bytes before and after, both ``model.pt`` sizes,
  the largest absolute error per table and, when the source's evaluation day has ranking
  examples, the per-action AUC of the source and of the quantized model on that day;
* ``metrics.json`` holds the quantized model's own evaluation (or is empty without one), so
  the promotion gate compares the model that would be served.

Nothing is promoted: ``afm model promote VERSION`` serves it, ``afm model rollback`` undoes that.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import logging
import time

import numpy as np
import torch

from features.config import Layout
from training.data import RankingData, load_ranking_data
from training.jobs import registry
from training.jobs.finetune import LATE_LOAD_FACTOR, ItemFacts, batch_tensors, evaluate
from training.model.inputs import history_len
from training.model.quantize import (
    BITS,
    FORMATS,
    QuantizationConfig,
    max_abs_error,
    quantize_item_tables,
    roundtrip,
    table_bytes,
)
from training.model.ranker import Ranker, RankerConfig
from training.model.ranker_objective import ranker_logits

log = logging.getLogger(__name__)

#: the per-action figures the export compares (source vs quantized)
COMPARED = ("auc_click", "auc_save", "auc_hide", "hit3_click")


class ExportError(ValueError):
    """An export cannot be done (unknown version, bad format, already quantized); the message says which."""


def _check_format(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ExportError(f"{name} must be one of {list(allowed)}, got {value!r}")


def ranker_of(artifact: dict) -> Ranker:
    """The float ranker of a registry artifact (eval mode, CPU); ExportError for a quantized or non-ranker one."""
    cfg = artifact["config"]
    if "ranker" not in cfg:
        raise ExportError(f"{artifact['path']}/config.json has no 'ranker' section; is it a ranker artifact?")
    if "quantization" in cfg:
        src = cfg["quantization"].get("source_version")
        raise ExportError(
            f"ranker {artifact['version']} is already quantized ({cfg['quantization'].get('item_tables')}); "
            f"export from its float source {src}"
        )
    model = Ranker(RankerConfig.from_dict(cfg["ranker"]))
    model.load_state_dict(artifact["state_dict"])
    return model.eval()


def quantized_ranker(artifact: dict) -> Ranker:
    """The ranker of an exported (quantized) artifact: the quantized structure rebuilt, then its state dict loaded.

    A float artifact loads as it is. Eval mode, CPU.
    """
    cfg = artifact["config"]
    model = Ranker(RankerConfig.from_dict(cfg["ranker"]))
    quant = cfg.get("quantization")
    if quant is not None:
        quantize_item_tables(model, int(quant["bits"]), structure_only=True)
    model.load_state_dict(artifact["state_dict"])
    return model.eval()


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes ``torch.save`` writes for the model's state dict (what ``model.pt`` holds)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getbuffer().nbytes


@torch.no_grad()
def predict_with_user_format(
    model: Ranker,
    data: RankingData,
    items: ItemFacts,
    user_bits: int | None,
    device: torch.device | None = None,
    batch: int = 2048,
) -> np.ndarray:
    """(N, A) probabilities of every impression, the user embeddings quantized as the online store would hold them.

    As :func:`training.jobs.finetune.predict`, except that for rankers that read a published
    user embedding (``hybrid``, ``pinfm_late``) the embedding of each request's history before
    its day is computed, round-tripped through ``user_bits`` (None: kept float) and given to
    the ranker as ``user_emb``. With ``user_bits=None`` the probabilities are ``predict``'s.
    """
    device = device or torch.device("cpu")
    model.eval()
    out = np.zeros((len(data), len(model.actions)), np.float32)
    history, late = history_len(model.cfg), model.uses_user_embedding
    for idx in data.request_batches(batch, rng=None):
        b = batch_tensors(data, idx, items, device, history, late)
        late_seq = b.pop("late_seq", None)
        if late_seq is not None:
            emb = model.user_embedding(
                late_seq["item_ids"], late_seq["action_ids"], late_seq["surface_ids"], late_seq.get("content"),
                late_seq["pad_mask"], late_seq.get("ts"),
            )  # fmt: skip
            b["user_emb"] = roundtrip(emb, user_bits)[late_seq["index"]]  # (U, D)
        logits = ranker_logits(model, b)[b["inverse"], b["slot"]]  # (N, A)
        out[idx] = torch.sigmoid(logits).cpu().numpy()
    return out


class EvalDay:
    """The evaluation day of a ranker artifact, loaded once: its impressions, the items and the new-item cutoff.

    Args:
        layout: data root.
        artifact: a ranker artifact (its ``data_version`` names ``eval_day`` and ``new_item_cutoff``).
        ds: evaluate on this day instead.

    Raises:
        FileNotFoundError: the day has no ranking examples.

    Example:
        >>> day = EvalDay(layout, registry.load_artifact(layout, "ranker", version))  # doctest: +SKIP
        >>> day.metrics(model, user_bits=8)["auc_click"]  # doctest: +SKIP
    """

    def __init__(self, layout: Layout, artifact: dict, ds: str | None = None) -> None:
        dv = artifact["data_version"]
        self.ds = ds or dv.get("eval_day")
        if self.ds is None:
            raise FileNotFoundError(f"ranker {artifact['version']} names no eval_day in its data_version.json")
        if self.ds not in layout.available_days(layout.ranking_examples):
            raise FileNotFoundError(f"no ranking examples for ds={self.ds} under {layout.ranking_examples}")
        rcfg = RankerConfig.from_dict(artifact["config"]["ranker"])
        seq_len = history_len(rcfg) * (LATE_LOAD_FACTOR if rcfg.sequence in ("pinfm_late", "hybrid") else 1)
        self.data = load_ranking_data(layout, [self.ds], seq_len)  # as fine-tuning loads its eval day
        self.items = ItemFacts.from_layout(layout, rcfg.backbone.content_dim)
        cutoff = dv.get("new_item_cutoff")
        self.cutoff_s = int(dt.datetime.fromisoformat(cutoff).timestamp()) if cutoff else None

    def metrics(self, model: Ranker, user_bits: int | None = None) -> dict:
        """:func:`training.jobs.finetune.evaluate`'s figures, user embeddings in ``user_bits`` (None = float)."""
        probs = predict_with_user_format(model, self.data, self.items, user_bits)
        ev = evaluate(model, self.data, self.items, torch.device("cpu"), self.cutoff_s, probs=probs)
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in ev.items()}


def export_quantized(
    layout: Layout,
    version: str | None = None,
    quantize: str = "int8",
    user_embeddings: str = "int8",
    evaluate_day: bool = True,
) -> dict:
    """Save a new ranker version whose item-ID tables are quantized; the source stays as it is.

    Args:
        layout: data root.
        version: the source ranker version; None = CURRENT.
        quantize: the item tables' format, ``int8`` or ``int4``.
        user_embeddings: the format of the user embeddings published for the new version
            (``int8``, ``int4`` or ``fp32``).
        evaluate_day: evaluate the quantized model on the source's evaluation day (when its
            ranking examples are there) and store the figures as its metrics.

    Returns:
        The ``quantization.json`` record plus ``version`` (the new one) and ``promoted: False``.

    Raises:
        ExportError: a bad format, or a source that is already quantized or not a ranker.
        training.jobs.registry.RegistryError: nothing is promoted (no version given), or the version does not exist.
    """
    _check_format("--quantize", quantize, tuple(BITS))
    _check_format("--user-embeddings", user_embeddings, FORMATS)
    t0 = time.perf_counter()
    source = version or registry.current_version(layout)
    if source is None:
        raise registry.RegistryError(
            f"no ranker is promoted ({registry.current_file(layout)} does not exist); name the VERSION to export"
        )
    art = registry.load_artifact(layout, "ranker", source)
    fp32 = ranker_of(art)
    qcfg = QuantizationConfig(item_tables=quantize, user_embeddings=user_embeddings)
    model = copy.deepcopy(fp32)
    tables = quantize_item_tables(model, qcfg.bits)
    errors = max_abs_error(fp32, model)
    record: dict = {
        "source_version": source,
        "item_tables": quantize,
        "bits": qcfg.bits,
        "user_embeddings": user_embeddings,
        "tables": tables,
        "table_bytes_before": table_bytes(fp32),
        "table_bytes_after": table_bytes(model),
        "model_pt_bytes_before": (art["path"] / "model.pt").stat().st_size,
        "max_abs_error": max(errors.values()),
        "max_abs_error_per_table": errors,
        "model_pt_bytes_after": state_dict_bytes(model),  # what save_artifact writes as model.pt
    }
    metrics: dict = {}
    if evaluate_day:
        try:
            day = EvalDay(layout, art)
        except FileNotFoundError as exc:
            log.warning("export: not evaluated (%s)", exc)
            record["evaluation"] = f"skipped: {exc}"
        else:
            metrics = day.metrics(model, qcfg.user_embedding_bits)
            before = art["metrics"]
            record["eval_day"] = day.ds
            record["metrics_source"] = {k: before.get(k) for k in COMPARED}
            record["metrics"] = {k: metrics.get(k) for k in COMPARED}
            record["metrics_delta"] = {
                k: None if before.get(k) is None or metrics.get(k) is None else metrics[k] - before[k] for k in COMPARED
            }
    config = {
        **art["config"],
        "quantization": {**qcfg.to_dict(), "bits": qcfg.bits, "tables": tables, "source_version": source},
    }
    new = registry.save_artifact(
        layout,
        "ranker",
        model.state_dict(),
        config=config,
        metrics=metrics,
        data_version={**art["data_version"], "quantized_from": source},
        extra={"quantization": record},
    )
    log.info("export: ranker %s → %s (%s tables, %s user embeddings)", source, new, quantize, user_embeddings)
    return {**record, "version": new, "promoted": False, "seconds": round(time.perf_counter() - t0, 2)}
