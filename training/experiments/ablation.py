"""Ranker ablations on the same data: which sequence module, and whether the new-item techniques help.

``afm eval ranker-ablation`` → :func:`run_ablation`: fine-tunes one ranker per variant from the
same backbone on the same days (nothing is registered), evaluates each on the same held-out
day and returns one row per variant plus the new-item comparison:

* ``sequence``: none / transact / transact with TransAct V2's lifelong selection /
  pinfm_late / pinfm_early (all with the new-item techniques);
* ``new_items``: pinfm_early with vs without candidate-ID randomization + age-dependent ID
  dropout; the figure of merit is the relative change of click AUC − 0.5 on new items (items
  created after the backbone's pretraining data) and the relative change of overall click AUC.
"""

from __future__ import annotations

import logging

from features.config import Layout
from training.jobs.finetune import FinetuneConfig, finetune
from training.model.ranker import SEQUENCE_MODES, NewItemConfig

log = logging.getLogger(__name__)

#: TransAct V2 row: the 8 most recent + this many most content-similar actions per candidate
LIFELONG_TOP_K = 16

REPORTED = ("auc_click", "auc_save", "auc_hide", "hit3_click", "hit3_save", "auc_click_new", "auc_click_old")


def _row(name: str, result: dict) -> dict:
    m = result["metrics"]
    return {"variant": name, **{k: m.get(k) for k in REPORTED}, "n_eval_new": m.get("n_eval_new"),
            "seconds": result["seconds"]}  # fmt: skip


#: the new-item target of the ranker issue, judged by :func:`auc_lift` and :func:`relative_change`
NEW_ITEMS_TARGET = "new_items_lift ≥ +0.15 with overall_change ≥ −0.01"


def relative_change(new: float | None, base: float | None) -> float | None:
    """new ÷ base − 1, rounded to 4 decimals (None when either is missing or base is 0)."""
    return None if new is None or base is None or base == 0 else round(new / base - 1.0, 4)


def auc_lift(new: float | None, base: float | None) -> float | None:
    """Relative change of (AUC − 0.5): how much more than chance the variant ranks."""
    if new is None or base is None or base == 0.5:
        return None
    return round((new - 0.5) / (base - 0.5) - 1.0, 4)


def run_ablation(
    layout: Layout,
    cfg: FinetuneConfig,
    ds: str | None = None,
    backbone: str = "latest",
    modes: tuple[str, ...] = SEQUENCE_MODES,
) -> dict:
    """One fine-tuning per variant (nothing registered); returns ``{"rows": [...], "new_items": {...}}``."""
    rows = []
    by_mode = {}
    for mode in modes:
        res = finetune(layout, cfg.replace(sequence=mode), ds=ds, backbone=backbone, register=False)
        rows.append(_row(mode, res))
        by_mode[mode] = res["metrics"]
    if "transact" in modes:  # TransAct V2: each candidate reads its own selection from the history
        res = finetune(
            layout, cfg.replace(sequence="transact", lifelong_top_k=LIFELONG_TOP_K), ds=ds, backbone=backbone,
            register=False,
        )  # fmt: skip
        rows.insert(modes.index("transact") + 1, _row(f"transact + lifelong selection (top {LIFELONG_TOP_K})", res))
    base_mode = "pinfm_early"
    with_tech = by_mode.get(base_mode)
    if with_tech is None:
        with_tech = finetune(layout, cfg.replace(sequence=base_mode), ds=ds, backbone=backbone, register=False)
        with_tech = with_tech["metrics"]
    without = finetune(
        layout, cfg.replace(sequence=base_mode, new_items=NewItemConfig.off()), ds=ds, backbone=backbone,
        register=False,
    )  # fmt: skip
    rows.append(_row(f"{base_mode} without new-item techniques", without))
    m0 = without["metrics"]
    new_items = {
        "auc_click_new": {"with": with_tech.get("auc_click_new"), "without": m0.get("auc_click_new")},
        "auc_click": {"with": with_tech.get("auc_click"), "without": m0.get("auc_click")},
        "new_items_lift": auc_lift(with_tech.get("auc_click_new"), m0.get("auc_click_new")),
        "overall_change": relative_change(with_tech.get("auc_click"), m0.get("auc_click")),
        "target": NEW_ITEMS_TARGET,
    }
    log.info("ablation: %d variants; new items %s", len(rows), new_items)
    return {"rows": rows, "new_items": new_items}


def markdown_table(rows: list[dict]) -> str:
    """The ablation rows as a Markdown table (README-ready)."""
    cols = ["variant", *REPORTED, "n_eval_new", "seconds"]
    fmt = [
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [r["variant"]] + [
            "" if r.get(c) is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])) for c in cols[1:]
        ]
        fmt.append("| " + " | ".join(cells) + " |")
    return "\n".join(fmt)
