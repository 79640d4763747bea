"""MovieLens new-item (cold-start) experiment: does the ranker's new-item handling help on real data?

``afm eval new-items --data ../shared/data/movielens-latest-small`` → :func:`run_new_items`.
Everything happens in memory (``ratings.csv`` + ``movies.csv`` are read, nothing is written):

* **Items.** An item's creation time is its first rating ("first seen"). Its content vector
  (CONTENT_DIM values) is its genres hashed into CONTENT_DIM − 2 dims
  (:func:`features.importers.genre_vector`), the release year from the title as
  ``(year − 2000) / 20`` clipped to [−3, 1], and a has-year flag.
* **Time split** on the rating timestamps: T_pre = the ``pretrain_quantile`` quantile, T_ft =
  the ``finetune_quantile`` quantile, T_end = the ``eval_quantile`` quantile (default: the last
  rating). The PinFM backbone pretrains on the ratings ≤ T_pre; the ranker fine-tunes on the
  requests in (T_pre, T_ft] and is evaluated on the requests in (T_ft, T_end]. Settings are
  chosen on a validation split that ends before the evaluation window (e.g. quantiles 0.55 /
  0.70 / 0.85), never on the evaluation window itself. **New items** are those first seen after T_pre (the backbone never saw them); those
  first seen after T_ft were not in fine-tuning either (``RankerConfig.id_cutoff_s`` = T_ft).
* **Requests.** Every rating in a window is one request of its user at its time. Its
  sequence = the user's ratings with strictly earlier timestamps (the newest
  :func:`training.model.inputs.history_len`, ``max_len − 1`` for early fusion; right-padded;
  actions ``rate_high``/``rate_mid``/``rate_low`` of :func:`features.importers.rating_action`,
  surface ``import``). Its impressions = the rated movie plus ``negatives`` sampled movies (no
  labels) that the user never rated and that were first seen at or before the request: a
  ``recent_share`` of them among the movies first seen in the last ``recent_days``, the rest
  uniformly. Without recent negatives every young candidate would be the rated one, and an
  item's youth alone would give its label away. Impressions are shuffled within each request.
  Deterministic given ``seed``.
* **Labels** (:data:`features.contract.LABEL_ACTIONS` = click, save, hide) of the rated
  movie: ``rate_high`` (≥ 4 stars) → click; ≥ ``save_rating`` (5 stars) → click + save;
  ``rate_low`` (< 3 stars) → hide; ``rate_mid`` (3, 3.5 stars) → no label (seen, neither
  liked nor disliked).
* **Comparison.** One backbone; per seed, two rankers fine-tuned from it with the same
  init and batch order: with the new-item techniques (``cfg.new_items``: candidate-ID
  randomization, age-dependent ID dropout with a MovieLens-sized age horizon, content-only
  scoring of items first seen after T_ft) and without (``NewItemConfig.off()``). Both are
  evaluated on the same requests with :func:`training.jobs.finetune.evaluate` (cutoff T_pre).
  Figure of merit: the relative lift of (AUC − 0.5) on new items and the relative change of
  the overall AUC (:func:`training.experiments.ablation.auc_lift`), click first.

Shapes in comments: N = ratings, R = requests, M = impressions, L = sequence length,
I = items, Cd = content dim.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from features.contract import ACTION_IDS, CONTENT_DIM, LABEL_ACTIONS, SURFACE_IDS
from features.importers import _movie_year, genre_list, genre_vector, rating_action, read_movielens_ratings_and_movies
from features.settings import Settings
from training.data import ContentTable, ItemCreatedAt, RankingData, SequenceArrays
from training.experiments.ablation import NEW_ITEMS_TARGET, auc_lift, relative_change
from training.jobs.finetune import FinetuneConfig, ItemFacts, evaluate, new_item_mask, predict, train_ranker
from training.jobs.pretrain import CorpusBatches, PretrainConfig
from training.metrics import roc_auc
from training.model.backbone import PinFM, PinFMConfig, resolve_device
from training.model.inputs import history_len, resolve_time_gaps
from training.model.objectives import ItemCatalog, PinFMObjective
from training.model.ranker import NewItemConfig, Ranker, RankerConfig
from training.trainer import Trainer

log = logging.getLogger(__name__)

DAY_S = 86_400
SURFACE = "import"
#: :func:`pretrain_backbone` feeds no time gaps: the rankers follow it unless ``finetune.time_gaps`` says otherwise
PRETRAINED_WITH_TIME_GAPS = False
#: metrics carried into the summary, per variant (the figure of merit is the first pair)
REPORTED: tuple[str, ...] = (
    "auc_click_new", "auc_click", "auc_click_old", "auc_save_new", "auc_save", "auc_hide_new", "auc_hide",
    "hit3_click_new", "hit3_click", "hit3_click_old", "auc_click_unseen", "auc_click_seen_in_finetuning",
    "auc_click_new_after_first_day",
)  # fmt: skip


# -------------------------------------------------------------------------- config
class NewItemsExperimentConfig(Settings):
    """Settings of the MovieLens new-item experiment.

    Attributes:
        pretrain_quantile: T_pre = this quantile of the rating timestamps (end of pretraining).
        finetune_quantile: T_ft = this quantile (end of the fine-tuning window); later = evaluation.
        eval_quantile: T_end = this quantile (end of the evaluation window; 1.0 = the last rating).
        negatives: sampled negative impressions per request.
        recent_share: share of the negatives drawn among movies first seen in the last ``recent_days``.
        recent_days: how young a "recent" negative is (days before the request).
        save_rating: a rating ≥ this is a save too (besides a click).
        model: backbone preset (:meth:`training.model.backbone.PinFMConfig.preset`; ``small`` = d 64, 2 layers).
        content_dim: size of a movie's content vector (genres hashed into ``content_dim − 2``).
        pretrain: backbone pretraining (steps, batch, lr, losses; its ``model``/``device`` are ignored).
        finetune: ranker fine-tuning (its ``new_items``, ``seed``, ``model`` and ``device`` are set per run).
        new_items: the techniques of the "with" variant ("without" = ``NewItemConfig.off()``).
        seeds: fine-tuning seeds ``seed, seed + 1, …`` (each trains both variants).
        seed: seed of the negatives, the request subsamples, the backbone and the first fine-tuning.
        max_finetune_requests: keep at most this many fine-tuning requests (random, None = all).
        max_eval_requests: keep at most this many evaluation requests (random, None = all).
        device: 'auto', 'cpu' or 'cuda'.
    """

    pretrain_quantile: float = 0.70
    finetune_quantile: float = 0.85
    eval_quantile: float = 1.0
    negatives: int = 9
    recent_share: float = 0.5
    recent_days: float = 365.0
    save_rating: float = 5.0
    model: str = "small"
    content_dim: int = CONTENT_DIM
    pretrain: PretrainConfig = Field(default_factory=lambda: PretrainConfig(steps=300, ckpt_every=0, log_every=50))
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    # chosen on the validation split 0.55/0.70/0.85 (README): MovieLens items age over years, not days,
    # and the missing-ID vector puts content-only and trained movies on one scale
    new_items: NewItemConfig = Field(
        default_factory=lambda: NewItemConfig(age_horizon_days=1095.0, age_dropout_max=1.0, missing_id_vector=True)
    )
    seeds: int = 3
    seed: int = 0
    max_finetune_requests: int | None = None
    max_eval_requests: int | None = None
    device: str = "auto"

    def check(self) -> None:
        if not 0.0 < self.pretrain_quantile < self.finetune_quantile < self.eval_quantile <= 1.0:
            raise ValueError(
                "need 0 < pretrain_quantile < finetune_quantile < eval_quantile ≤ 1, got "
                f"{self.pretrain_quantile}, {self.finetune_quantile}, {self.eval_quantile}"
            )
        if self.content_dim < 3:
            raise ValueError(f"content_dim must be ≥ 3 (genres, year, has-year), got {self.content_dim}")
        if self.negatives < 1:
            raise ValueError(f"negatives must be ≥ 1, got {self.negatives}")
        if not 0.0 <= self.recent_share <= 1.0:
            raise ValueError(f"recent_share must be in [0, 1], got {self.recent_share}")
        if self.recent_days <= 0 or self.seeds < 1:
            raise ValueError(f"recent_days must be > 0 and seeds ≥ 1, got {self.recent_days}, {self.seeds}")
        for name in ("max_finetune_requests", "max_eval_requests"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be ≥ 1 or None, got {v}")

    @classmethod
    def tiny(cls) -> NewItemsExperimentConfig:
        """Seconds-sized settings for tests: tiny backbone, a few steps, one seed."""
        return cls(
            model="tiny",
            pretrain=PretrainConfig.preset("tiny").replace(steps=8, batch_size=8, ckpt_every=0),
            finetune=FinetuneConfig(epochs=1, batch_size=64, warmup=2),
            seeds=1,
        )


# ---------------------------------------------------------------------------- data
@dataclass
class MovieLensData:
    """Ratings sorted by (user, timestamp, file row), with what is known about the items.

    Attributes:
        user_ids: (N,) int64 MovieLens user ids.
        item_ids: (N,) int64 movie ids.
        ratings: (N,) float32 stars.
        ts: (N,) int64 unix seconds.
        action_ids: (N,) contract action id of every rating (``rate_high`` / ``rate_mid`` / ``rate_low``).
        items: content vectors (from movies.csv) and first-seen times (first rating) of the movies.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    ratings: np.ndarray
    ts: np.ndarray
    action_ids: np.ndarray
    items: ItemFacts

    def __len__(self) -> int:
        return len(self.ts)


def content_vector(genres: str, title: str, dim: int = CONTENT_DIM) -> np.ndarray:
    """A movie's content: hashed genres (dim − 2), scaled release year, has-year flag → (dim,) float32.

    Args:
        genres: movies.csv ``genres`` ("Action|Comedy", or "(no genres listed)").
        title: movies.csv ``title`` (the year in parentheses at the end, when present).
        dim: output size.
    """
    out = np.zeros(dim, np.float32)
    g = genre_vector(genre_list(genres), dim - 2)
    if g is not None:
        out[: dim - 2] = g
    year = _movie_year(title)
    if year is not None:
        out[dim - 2] = float(np.clip((year - 2000) / 20.0, -3.0, 1.0))
        out[dim - 1] = 1.0
    return out


def load_movielens(src: Path | str, content_dim: int = CONTENT_DIM) -> MovieLensData:
    """Read ``ratings.csv`` and ``movies.csv`` of a MovieLens folder.

    Raises:
        FileNotFoundError: the folder or one of the two files is missing.
        ContractError: a file lacks a column or has a bad value (line named).
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"movielens: data folder not found: {src}")
    r, m = read_movielens_ratings_and_movies(src)
    users = np.asarray(r["userId"], np.int64)
    items = np.asarray(r["movieId"], np.int64)
    ts = np.asarray(r["timestamp"], np.int64)
    if not len(ts):
        raise ValueError(f"movielens: {src / 'ratings.csv'} has no ratings")
    if ts.min() < 0 or ts.max() >= 1 << 32:
        raise ValueError(f"movielens: {src / 'ratings.csv'} has timestamps outside [0, 2^32) unix seconds")
    order = np.lexsort((np.arange(len(ts)), ts, users))  # user, then time, then file row
    users, items, ts = users[order], items[order], ts[order]
    stars = np.asarray(r["rating"], np.float32)[order]

    ids, inv = np.unique(items, return_inverse=True)
    first = np.full(len(ids), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, inv, ts)  # (I,) first rating time
    vectors = np.stack([content_vector(g, t, content_dim) for t, g in zip(m["title"], m["genres"], strict=True)])
    content = ContentTable(np.asarray(m["movieId"], np.int64), vectors, content_dim)
    actions = np.array([ACTION_IDS[rating_action(float(x))] for x in stars], np.int64)
    return MovieLensData(users, items, stars, ts, actions, ItemFacts(content, ItemCreatedAt(ids, first)))


@dataclass(frozen=True)
class TimeSplit:
    """Unix-second boundaries: pretraining ≤ t_pre < fine-tuning ≤ t_ft < evaluation ≤ t_end."""

    t_pre: int
    t_ft: int
    t_end: int

    @classmethod
    def from_quantiles(cls, ts: np.ndarray, pretrain_q: float, finetune_q: float, eval_q: float = 1.0) -> TimeSplit:
        """Boundaries at quantiles of the rating times ``ts`` (each an actual rating time)."""
        return cls(*(int(np.quantile(ts, q, method="lower")) for q in (pretrain_q, finetune_q, eval_q)))

    def to_dict(self) -> dict:
        iso = {k: dt.datetime.fromtimestamp(v, dt.UTC).isoformat() for k, v in dataclasses.asdict(self).items()}
        return {**dataclasses.asdict(self), **{f"{k}_utc": v for k, v in iso.items()}}


def new_items(data: MovieLensData, cutoff_s: int) -> np.ndarray:
    """Sorted ids of the movies first seen after ``cutoff_s``."""
    created = data.items.created
    return np.sort(created.ids[created.created > cutoff_s])


def pretrain_sequences(data: MovieLensData, t_pre: int, max_len: int) -> SequenceArrays:
    """Every user's ratings ≤ ``t_pre`` cut into segments of ≤ ``max_len`` from the newest end (≥ 2 events).

    The same cut as the pipeline's pretraining corpus (:mod:`features.corpus`).
    """
    keep = data.ts <= t_pre
    users, items, acts, ts = data.user_ids[keep], data.item_ids[keep], data.action_ids[keep], data.ts[keep]
    bounds = np.flatnonzero(np.diff(users)) + 1
    segments: list[tuple[int, int]] = []
    for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(users)], strict=True):
        for end in range(e, s, -max_len):
            start = max(s, end - max_len)
            if end - start >= 2:
                segments.append((start, end))
    n = len(segments)
    out = SequenceArrays(*(np.zeros((n, max_len), np.int64) for _ in range(3)), np.zeros(n, np.int64))
    out.ts = np.zeros((n, max_len), np.int64)
    for row, (start, end) in enumerate(segments):
        k = end - start
        out.item_ids[row, :k] = items[start:end]
        out.action_ids[row, :k] = acts[start:end]
        out.ts[row, :k] = ts[start:end]
        out.surface_ids[row, :k] = SURFACE_IDS[SURFACE]
        out.lengths[row] = k
    return out


def rating_labels(ratings: np.ndarray, save_rating: float) -> np.ndarray:
    """(R,) stars → (R, A) float32 labels in LABEL_ACTIONS order (see the module docstring)."""
    actions = [rating_action(float(r)) for r in ratings]
    out = np.zeros((len(ratings), len(LABEL_ACTIONS)), np.float32)
    col = {a: j for j, a in enumerate(LABEL_ACTIONS)}
    out[:, col["click"]] = [a == "rate_high" for a in actions]
    out[:, col["save"]] = np.asarray(ratings) >= save_rating
    out[:, col["hide"]] = [a == "rate_low" for a in actions]
    return out


def sample_negatives(
    req_users: np.ndarray,
    req_ts: np.ndarray,
    data: MovieLensData,
    k: int,
    recent_share: float,
    recent_days: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """k negatives per request: never rated by its user, first seen at or before its time.

    ``round(k · recent_share)`` are drawn among the movies first seen in the last
    ``recent_days`` before the request, the rest (and any shortfall of the recent pool)
    uniformly among all movies first seen by then. Fewer than k only when the pool runs out.

    Args:
        req_users: (R,) user of each request.
        req_ts: (R,) request time, unix seconds.
        data: the ratings (which movies each user rated; first-seen times).
        k: negatives per request.
        recent_share: share of recent negatives.
        recent_days: age bound of a recent negative.
        rng: the generator (the only source of randomness).

    Returns:
        (row (K,) request index of each negative, item (K,) its movie id), by request.
    """
    created = data.items.created
    order = np.argsort(created.created, kind="stable")
    pool_ids, pool_first = created.ids[order], created.created[order]  # (I,) by first-seen time
    rated: dict[int, set[int]] = {}
    for u, i in zip(data.user_ids.tolist(), data.item_ids.tolist(), strict=True):
        rated.setdefault(u, set()).add(i)
    hi = np.searchsorted(pool_first, req_ts, side="right")  # (R,) pool[:hi] first seen ≤ request
    lo = np.searchsorted(pool_first, req_ts - int(recent_days * DAY_S), side="left")  # (R,) recent = [lo, hi)
    n_recent = int(round(k * recent_share))
    draws = 2 * k + 8
    u_recent, u_all = rng.random((len(req_ts), draws)), rng.random((len(req_ts), draws))  # (R, draws)
    rows: list[int] = []
    picks: list[int] = []
    for r, user in enumerate(req_users.tolist()):
        excluded = rated.get(user, set())
        chosen: list[int] = []
        taken: set[int] = set()
        for want, a, b, u in ((n_recent, lo[r], hi[r], u_recent[r]), (k, 0, hi[r], u_all[r])):
            if b <= a or len(chosen) >= want:
                continue
            for i in pool_ids[a + (u * (b - a)).astype(np.int64)].tolist():
                if i not in excluded and i not in taken:
                    chosen.append(i)
                    taken.add(i)
                    if len(chosen) >= want:
                        break
            if len(chosen) < want:  # unlucky draws or a small pool: draw exactly from what is left
                left = [i for i in pool_ids[a:b].tolist() if i not in excluded and i not in taken]
                extra = rng.choice(np.asarray(left, np.int64), size=min(want - len(chosen), len(left)), replace=False)
                chosen.extend(extra.tolist())
                taken.update(extra.tolist())
        rows.extend([r] * len(chosen))
        picks.extend(chosen)
    return np.asarray(rows, np.int64), np.asarray(picks, np.int64)


def request_sequences(data: MovieLensData, req: np.ndarray, seq_len: int) -> SequenceArrays:
    """(R,) rating indices → each request's sequence: its user's ratings with earlier timestamps.

    Returns:
        SequenceArrays (R, seq_len), right-padded, newest ``seq_len`` events, with ``ts``.
    """
    users = np.unique(data.user_ids, return_inverse=True)[1].astype(np.int64)  # (N,) dense user index
    key = (users << 32) | data.ts  # (N,) sorted: data is by (user, ts)
    first = np.searchsorted(key, key, side="left")  # (N,) first rating of the user at that time
    user_start = np.searchsorted(users, users, side="left")  # (N,)
    end = first[req]  # (R,) history = [start, end)
    start = np.maximum(user_start[req], end - seq_len)
    idx = start[:, None] + np.arange(seq_len)[None, :]  # (R, L)
    real = idx < end[:, None]  # (R, L)
    idx = np.where(real, idx, 0)
    actions = data.action_ids
    return SequenceArrays(
        item_ids=np.where(real, data.item_ids[idx], 0),
        action_ids=np.where(real, actions[idx], 0),
        surface_ids=np.where(real, SURFACE_IDS[SURFACE], 0),
        lengths=(end - start).astype(np.int64),
        ts=np.where(real, data.ts[idx], 0),
    )


def ranking_examples(
    data: MovieLensData,
    after_s: int,
    until_s: int,
    cfg: NewItemsExperimentConfig,
    seq_len: int,
    rng: np.random.Generator,
    max_requests: int | None = None,
) -> RankingData:
    """One request per rating in (after_s, until_s]: the rated movie + sampled negatives.

    Args:
        data: the ratings.
        after_s, until_s: the window (unix seconds).
        cfg: negatives, recent share/days, save rating.
        seq_len: sequence length (:func:`training.model.inputs.history_len` of the ranker).
        rng: the generator (subsample, negatives, impression order).
        max_requests: keep a random subset of this many requests (None = all).

    Returns:
        RankingData with R requests and M = R + negatives impressions, grouped by request.
    """
    req = np.flatnonzero((data.ts > after_s) & (data.ts <= until_s))  # (R,) rating indices
    if max_requests is not None and len(req) > max_requests:
        req = np.sort(rng.choice(req, size=max_requests, replace=False))
    R = len(req)
    neg_rows, neg_items = sample_negatives(
        data.user_ids[req], data.ts[req], data, cfg.negatives, cfg.recent_share, cfg.recent_days, rng
    )
    req_index = np.concatenate([np.arange(R), neg_rows])  # (M,)
    item_ids = np.concatenate([data.item_ids[req], neg_items])  # (M,)
    labels = np.concatenate(
        [rating_labels(data.ratings[req], cfg.save_rating), np.zeros((len(neg_rows), len(LABEL_ACTIONS)), np.float32)]
    )  # (M, A)
    order = np.lexsort((rng.random(len(req_index)), req_index))  # by request, shuffled within
    return RankingData(
        sequences=request_sequences(data, req, seq_len),
        request_ids=np.array([f"ml-{int(data.user_ids[g])}-{int(g)}" for g in req]),
        req_index=req_index[order],
        item_ids=item_ids[order],
        surface_ids=np.full(len(order), SURFACE_IDS[SURFACE], np.int64),
        labels=labels[order],
        days=[dt.datetime.fromtimestamp(t, dt.UTC).date().isoformat() for t in (after_s, until_s)],
        request_ts=data.ts[req].astype(np.int64),
    )


# ------------------------------------------------------------------------ training
def pretrain_backbone(
    seqs: SequenceArrays, content: ContentTable, model_cfg: PinFMConfig, cfg: PretrainConfig, device: str
) -> tuple[dict, dict]:
    """Pretrain a PinFM backbone on in-memory segments with the pipeline's objective and Trainer.

    Returns:
        (CPU state dict, {first_loss, final_loss, steps, segments, seconds}).
    """
    t0 = time.perf_counter()
    rows = np.flatnonzero(seqs.lengths >= 2)
    if not len(rows):
        raise ValueError("no user has ≥ 2 ratings before the pretraining cutoff; nothing to pretrain on")
    ids = seqs.item_ids[rows]
    torch.manual_seed(cfg.seed)  # the backbone's init
    model = PinFM(model_cfg)
    objective = PinFMObjective(cfg.objective(), ItemCatalog.from_sequences([ids[ids != 0]]))
    trainer = Trainer(
        model,
        objective,
        CorpusBatches(seqs, rows, cfg.batch_size, content, cfg.seed),
        cfg.trainer_config(device),  # no run dir: nothing is checkpointed
        run_dir=None,
    )
    losses = trainer.fit().losses
    k = max(1, len(losses) // 10)
    info = {
        "first_loss": round(float(np.mean(losses[:k])), 4),
        "final_loss": round(float(np.mean(losses[-k:])), 4),
        "steps": cfg.steps,
        "segments": len(rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, info


def _round(v: float | None) -> float | None:
    """4 decimals; None for None and NaN (a slice with one class only)."""
    return None if v is None or math.isnan(v) else round(float(v), 4)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return round(float(np.mean(vals)), 4) if vals else None


def _new_item_slices(test: RankingData, items: ItemFacts, split: TimeSplit, new: np.ndarray) -> dict[str, np.ndarray]:
    """(M,) masks of the reported slices of the new items.

    ``auc_click_unseen``: first seen after T_ft (content only with the techniques);
    ``auc_click_seen_in_finetuning``: first seen in the fine-tuning window (trained IDs in both);
    ``auc_click_new_after_first_day``: new items at least a day old at the request. An item's
    creation time is its first rating, so a rated movie of age < 1 day is often that first
    rating (6–9 % of the rated movies, < 1 % of the sampled negatives): a feature that sees
    the age could find those without knowing the movie. This slice leaves them out.
    """
    created = items.created.lookup(test.item_ids)  # (M,)
    age_s = items.created.age_at(test.item_ids, test.request_ts[test.req_index])  # (M,) -1 = unknown
    unseen = created > split.t_ft
    return {
        "auc_click_unseen": unseen,
        "auc_click_seen_in_finetuning": new & ~unseen,
        "auc_click_new_after_first_day": new & (age_s >= DAY_S),
    }


def _new_item_parts(probs: np.ndarray, test: RankingData, slices: dict[str, np.ndarray]) -> dict:
    """Click AUC on each slice (masks (M,) of :func:`_new_item_slices`) from the (M, A) predictions."""
    j = LABEL_ACTIONS.index("click")
    probs = probs[:, j]  # (M,)
    y = test.labels[:, j]  # (M,)
    return {k: roc_auc(y[m], probs[m]) if m.any() else None for k, m in slices.items()}


@dataclass
class _Windows:
    """What every fine-tuning run of the experiment shares: the data, the split and the examples."""

    data: MovieLensData
    split: TimeSplit
    base_rcfg: RankerConfig  # each variant replaces new_items
    train: RankingData  # requests in (T_pre, T_ft]
    test: RankingData  # requests in (T_ft, T_end]
    slices: dict[str, np.ndarray]  # (M,) masks of the test's new-item slices (:func:`_new_item_slices`)
    counts: dict[str, int]  # sizes reported in the summary


def _load_windows(src: Path | str, cfg: NewItemsExperimentConfig, model_cfg: PinFMConfig) -> _Windows:
    """Load the ratings, split them by time and build the fine-tuning and evaluation requests.

    Raises:
        ValueError: a window holds no impression.
    """
    data = load_movielens(src, model_cfg.content_dim)
    split = TimeSplit.from_quantiles(data.ts, cfg.pretrain_quantile, cfg.finetune_quantile, cfg.eval_quantile)
    rng = np.random.default_rng(cfg.seed)
    base_rcfg = RankerConfig(
        backbone=model_cfg,
        sequence=cfg.finetune.sequence,
        id_cutoff_s=split.t_ft,
        time_gaps=resolve_time_gaps(cfg.finetune.time_gaps, PRETRAINED_WITH_TIME_GAPS),
    )
    seq_len = history_len(base_rcfg)
    train = ranking_examples(data, split.t_pre, split.t_ft, cfg, seq_len, rng, cfg.max_finetune_requests)
    test = ranking_examples(data, split.t_ft, split.t_end, cfg, seq_len, rng, cfg.max_eval_requests)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"empty window: {len(train)} fine-tuning, {len(test)} evaluation impressions ({split})")
    new = new_item_mask(test, data.items, split.t_pre)  # (M,) True at new items
    slices = _new_item_slices(test, data.items, split, new)  # (M,) masks
    unseen = slices["auc_click_unseen"]  # (M,) not in fine-tuning either
    counts = {
        "n_ratings": len(data),
        "n_items_new": len(new_items(data, split.t_pre)),
        "n_finetune_requests": len(train.sequences),
        "n_finetune_impressions": len(train),
        "n_eval_requests": len(test.sequences),
        "n_eval_impressions": len(test),
        "n_eval_new": int(new.sum()),
        "n_eval_old": int((~new).sum()),
        "n_eval_new_unseen_in_finetuning": int(unseen.sum()),
    }
    return _Windows(data, split, base_rcfg, train, test, slices, counts)


def _other_young_rule(
    model: Ranker, nic: NewItemConfig, w: _Windows, device: torch.device
) -> tuple[str, dict[str, float | None]]:
    """Score a trained "with" ranker under the other inference rule for young trained items.

    Switches ``model.cfg`` to the other rule (``young_mix`` flipped).

    Returns:
        (``with_young_mix`` or ``with_young_scale``, the REPORTED metrics rounded).
    """
    other = nic.replace(young_mix=not nic.young_mix)
    model.cfg = model.cfg.replace(new_items=other)
    probs = predict(model, w.test, w.data.items, device)  # (M, A), once for both summaries
    alt = evaluate(model, w.test, w.data.items, device, w.split.t_pre, probs=probs)
    alt.update(_new_item_parts(probs, w.test, w.slices))
    alt_name = "with_young_mix" if other.young_mix else "with_young_scale"
    return alt_name, {k: _round(alt.get(k)) for k in REPORTED}


def _seed_row(
    cfg: NewItemsExperimentConfig,
    seed: int,
    variants: dict[str, NewItemConfig],
    w: _Windows,
    state: dict,
    device: torch.device,
) -> dict:
    """Fine-tune and evaluate every variant with one seed (same init and batch order); their lifts."""
    row: dict = {"seed": seed}
    for name, nic in variants.items():
        t1 = time.perf_counter()
        fcfg = cfg.finetune.replace(new_items=nic, seed=seed, device=cfg.device, model=cfg.model)
        rcfg = w.base_rcfg.replace(new_items=nic)
        model, metrics, _ = train_ranker(w.train, w.test, w.data.items, fcfg, rcfg, state, w.split.t_pre, device)
        metrics.update(_new_item_parts(predict(model, w.test, w.data.items, device), w.test, w.slices))
        row[name] = {k: _round(metrics.get(k)) for k in REPORTED}
        row[name]["seconds"] = round(time.perf_counter() - t1, 1)
        log.info("new-items: seed %d %s %s", seed, name, row[name])
        if name == "with" and nic.expected_keep_young:
            alt_name, alt = _other_young_rule(model, nic, w, device)
            row[alt_name] = alt
            log.info("new-items: seed %d %s %s", seed, alt_name, row[alt_name])
    row["new_items_lift"] = auc_lift(row["with"]["auc_click_new"], row["without"]["auc_click_new"])
    row["overall_change"] = relative_change(row["with"]["auc_click"], row["without"]["auc_click"])
    for alt_name in ("with_young_mix", "with_young_scale"):
        if alt_name in row:
            row[f"{alt_name}_lift"] = auc_lift(row[alt_name]["auc_click_new"], row["without"]["auc_click_new"])
    return row


def _summarize_seeds(per_seed: list[dict], variants: dict[str, NewItemConfig]) -> tuple[dict, dict, dict]:
    """Means over seeds of the per-seed rows of :func:`_seed_row`.

    Returns:
        (mean metrics per variant, the "with" rankers under the other young-item rule with
        their lifts (only when every seed has them), lifts of the means per label action).
    """
    mean = {v: {k: _mean([r[v][k] for r in per_seed]) for k in REPORTED} for v in variants}
    alternative = {}  # the "with" rankers under the other young-item rule (not the figure of merit)
    for alt_name in ("with_young_mix", "with_young_scale"):
        if all(alt_name in r for r in per_seed):
            m = {k: _mean([r[alt_name][k] for r in per_seed]) for k in REPORTED}
            alternative[alt_name] = {
                **m,
                "new_items_lift": auc_lift(m["auc_click_new"], mean["without"]["auc_click_new"]),
                "overall_change": relative_change(m["auc_click"], mean["without"]["auc_click"]),
            }
    lifts = {
        a: {
            "new_items_lift": auc_lift(mean["with"][f"auc_{a}_new"], mean["without"][f"auc_{a}_new"]),
            "overall_change": relative_change(mean["with"][f"auc_{a}"], mean["without"][f"auc_{a}"]),
        }
        for a in LABEL_ACTIONS
    }
    return mean, alternative, lifts


def run_new_items(src: Path | str, cfg: NewItemsExperimentConfig) -> dict:
    """The whole experiment: load, split, pretrain, fine-tune with vs without the techniques per seed, compare.

    Returns:
        One JSON-able dict: ``with`` / ``without`` (mean metrics over seeds), ``per_seed``
        (both variants' metrics and their lifts), ``new_items_lift`` (relative lift of click
        AUC − 0.5 on new items, from the mean AUCs) and ``overall_change`` (relative change of
        the overall click AUC), the same per action in ``lifts``, ``target_met``, eval
        impression counts, the split, the backbone's pretraining, the config and seconds.
    """
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    model_cfg = PinFMConfig.preset(cfg.model).replace(content_dim=cfg.content_dim)
    w = _load_windows(src, cfg, model_cfg)
    log.info("new-items: split %s, %s", w.split.to_dict(), w.counts)

    seqs = pretrain_sequences(w.data, w.split.t_pre, model_cfg.max_len)
    pcfg = cfg.pretrain.replace(model=cfg.model, device=cfg.device, seed=cfg.seed)
    state, pre_info = pretrain_backbone(seqs, w.data.items.content, model_cfg, pcfg, cfg.device)
    log.info("new-items: backbone pretrained %s", pre_info)

    variants = {"with": cfg.new_items, "without": NewItemConfig.off()}
    per_seed = [_seed_row(cfg, cfg.seed + s, variants, w, state, device) for s in range(cfg.seeds)]
    mean, alternative, lifts = _summarize_seeds(per_seed, variants)
    lift, overall = lifts["click"]["new_items_lift"], lifts["click"]["overall_change"]
    out = {
        "data": str(src),
        "with": mean["with"],
        "without": mean["without"],
        "new_items_lift": lift,
        "overall_change": overall,
        "lifts": lifts,
        "target": NEW_ITEMS_TARGET,
        "target_met": bool(lift is not None and overall is not None and lift >= 0.15 and overall >= -0.01),
        "alternative_young_rule": alternative,
        "per_seed": per_seed,
        **w.counts,
        "split": w.split.to_dict(),
        "pretrain": pre_info,
        "device": str(device),
        "config": cfg.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("new-items: lift %s, overall change %s (%s)", lift, overall, NEW_ITEMS_TARGET)
    return out


def markdown_table(result: dict) -> str:
    """Per-seed and mean rows of a :func:`run_new_items` result as a Markdown table (README-ready)."""
    cols = ["auc_click_new", "auc_click_old", "auc_click", "hit3_click_new", "auc_save_new", "auc_hide_new"]
    lines = ["| seed | variant | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]

    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}"

    for r in result["per_seed"]:
        for v in ("with", "without"):
            lines.append(f"| {r['seed']} | {v} | " + " | ".join(cell(r[v].get(c)) for c in cols) + " |")
    for v in ("with", "without"):
        lines.append(f"| mean | {v} | " + " | ".join(cell(result[v].get(c)) for c in cols) + " |")
    for alt, m in result.get("alternative_young_rule", {}).items():
        lines.append(f"| mean | {alt} | " + " | ".join(cell(m.get(c)) for c in cols) + " |")
    lines.append("")
    lines.append(
        f"new-item lift of click AUC − 0.5: {result['new_items_lift']}; overall click AUC change: "
        f"{result['overall_change']} (target: {result['target']}; met: {result['target_met']}); "
        f"{result['n_eval_new']} new / {result['n_eval_old']} old eval impressions"
    )
    for alt, m in result.get("alternative_young_rule", {}).items():
        lines.append(f"{alt} (same trained rankers): lift {m['new_items_lift']}, overall {m['overall_change']}")
    return "\n".join(lines)
