"""Synthetic world: users with known latent interests, items arriving over time, ranking
requests with slates of impressions, and multi-action responses with known probabilities.

The world (all randomness from one ``numpy`` Generator seeded with ``SynthConfig.seed``, so
the same config writes the same bytes):

- **Interest clusters**: ``n_clusters`` unit vectors in R^latent_dim.
- **Items**: latent vector ``v`` (unit norm) = a cluster centre plus noise; a quality
  offset ``q`` (item popularity); ``content = W v + noise`` (CONTENT_DIM floats, informative
  but noisy); ``category`` = the nearest cluster (``"c07"``). ``n_items`` exist before
  ``start_ds`` (created during the ``item_history_days`` before it); ``new_items_per_day``
  are created at random times of each day. Item ids follow creation time (1, 2, …), so the
  items a request can show are exactly those created at or before the request time.
- **Users**: latent interest ``u`` (unit norm) mixing two clusters plus noise, drifting by
  ``drift`` (noise scale) at the end of each day; an activity level (log-normal, mean 1).
- **Requests**: each user makes Poisson(``requests_per_user_day`` x activity) requests a day,
  at uniform times in [00:00, 23:00) UTC, on a surface (home/search/related). A request
  shows ``slate_size`` distinct items, all created at or before the request time:
  ``retrieval_frac`` from a noisy affinity retrieval (top items of ``<u + noise, v>`` over a
  candidate pool, sampled), ``fresh_frac`` from items created in the last 24 hours (random
  items when there are too few), and the rest uniformly at random. Each shown item is an
  ``impression`` event at the request time with the request's ``request_id``.
- **Responses**, per impression, with affinity ``s = <u, v>``:

  - click with ``p_click = sigmoid(click_bias + click_slope * s + q + surface_bias)``;
  - save only after a click: ``P(save | click) = sigmoid(save_bias + save_slope * s + q)``,
    so the true marginal ``p_save = p_click * P(save | click)``;
  - hide only without a click: ``P(hide | no click) = sigmoid(hide_bias - hide_slope * s)``,
    so ``p_hide = (1 - p_click) * P(hide | no click)``.

  Responses carry the impression's ``request_id`` and come seconds to minutes after it
  (click: dwell_ms set; save after the click; hide). The true marginal probabilities are
  written to ``raw/truth/ds=D/part-0.parquet`` (one row per impression).
- **Organic events**: Poisson(``organic_per_user_day`` x activity) search clicks a day
  without ``request_id`` (the user picks the best of a few random items by affinity), some
  followed by a save, so sequences also hold activity outside ranked slates.

Ids: users ``1..n_users``, items ``1..N`` in creation order, ``request_id`` =
``"<ds>-r<6 digits>"`` (in time order), ``event_id`` = ``"<ds>-<7 digits>"`` assigned in
``(ts, kind, request)`` order (impression < click < save < hide at equal times).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import Layout, day_window, parse_ds
from features.contract import CONTENT_DIM, EVENT_SCHEMA, LABEL_ACTIONS, ContractError
from features.importers import PART_FILE, clear_partitions, write_events, write_items, write_parquet
from features.settings import Settings

_US = 1_000_000
_DAY_US = 86_400 * _US
_LAST_REQUEST_US = 23 * 3600 * _US  # requests start before 23:00 so responses stay inside the day
_MAX_DELAY_US = 30 * 60 * _US

SURFACE_NAMES: tuple[str, ...] = ("home", "search", "related")
# Event kinds inside a day, in tie-break order for equal timestamps.
_KINDS: tuple[str, ...] = ("impression", "click", "save", "hide")

TRUTH_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("item_id", pa.int64()),
        pa.field("p_click", pa.float64()),
        pa.field("p_save", pa.float64()),
        pa.field("p_hide", pa.float64()),
    ]
)


def truth_dir(layout: Layout) -> Path:
    """Folder of the ground-truth probabilities (``raw/truth``), partitioned by ds.

    Args:
        layout: data root.
    """
    return layout.root / "raw" / "truth"


class SynthConfig(Settings):
    """Size and behaviour of the synthetic world (defaults = the "demo" preset)."""

    n_users: int = 400
    n_items: int = 1500  # items that exist before start_ds
    new_items_per_day: int = 100
    n_days: int = 4
    start_ds: str = "2026-01-01"
    seed: int = 7
    latent_dim: int = 8
    n_clusters: int = 12
    requests_per_user_day: float = 4.0  # Poisson mean, times the user's activity level
    slate_size: int = 10
    drift: float = 0.1  # std of the daily interest noise (interests are unit vectors)
    organic_per_user_day: float = 1.5  # search clicks without a request
    item_history_days: int = 60  # initial items are created during this many days before start_ds
    retrieval_frac: float = 0.5
    fresh_frac: float = 0.2
    retrieval_pool: int = 3000  # candidate items scored per chunk of requests by the retrieval
    retrieval_noise: float = 0.5
    item_spread: float = 0.6  # item latent noise around its cluster centre
    user_spread: float = 0.5  # user latent noise around its two clusters
    quality_std: float = 0.4
    content_noise: float = 0.5
    click_bias: float = -3.0
    click_slope: float = 3.4
    save_bias: float = -2.0
    save_slope: float = 1.5
    hide_bias: float = -3.2
    hide_slope: float = 2.0
    surface_probs: tuple[float, float, float] = (0.6, 0.15, 0.25)  # home, search, related
    surface_bias: tuple[float, float, float] = (0.0, 0.3, 0.15)
    # Dirty rows planted per day in a second file of the raw partition, as real feeds have
    # them: a duplicate event_id, an unknown action, an unknown surface, a timestamp in the
    # next day. The gate must quarantine exactly these; they never change a label.
    dirty_rows_per_day: int = 8

    @classmethod
    def preset(cls, name: str) -> SynthConfig:
        """A named size: "tiny" (tests, ~1 s), "demo" (default, ~65k impressions), "large".

        Args:
            name: one of "tiny", "demo", "large".
        """
        presets = {
            "tiny": dict(
                n_users=40, n_items=150, new_items_per_day=15, n_days=3, retrieval_pool=500, dirty_rows_per_day=4
            ),
            "demo": {},
            "large": dict(n_users=20_000, n_items=50_000, new_items_per_day=2_000, n_days=7, n_clusters=32),
        }
        if name not in presets:
            raise ValueError(f"unknown synth preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        parse_ds(self.start_ds)
        if self.n_users < 1 or self.n_days < 1:
            raise ValueError(f"synth: n_users and n_days must be >= 1, got {self.n_users}, {self.n_days}")
        if self.slate_size < 1 or self.n_items < self.slate_size:
            raise ValueError(f"synth: need 1 <= slate_size <= n_items, got {self.slate_size}, {self.n_items}")
        if self.new_items_per_day < 0 or self.latent_dim < 1 or self.n_clusters < 1:
            raise ValueError("synth: new_items_per_day must be >= 0, latent_dim and n_clusters >= 1")
        if not (0 <= self.retrieval_frac and 0 <= self.fresh_frac and self.retrieval_frac + self.fresh_frac <= 1):
            raise ValueError("synth: retrieval_frac and fresh_frac must be >= 0 and sum to <= 1")
        if len(self.surface_probs) != 3 or abs(sum(self.surface_probs) - 1) > 1e-6:
            raise ValueError("synth: surface_probs must be 3 probabilities (home, search, related) summing to 1")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


DIRTY_FILE = "part-1-dirty.parquet"
DIRTY_KINDS = ("duplicate_event_id", "unknown_action", "unknown_surface", "ts_out_of_day")


def dirty_rows(events: pa.Table, n: int, rng: np.random.Generator) -> pa.Table:
    """``n`` bad copies of explicit events of one day, cycling through DIRTY_KINDS.

    Each copy of an explicit (non-impression) event is one of: the same row again (a
    duplicate event_id), the action misspelt, the surface unknown, or the timestamp moved
    into the next day (with a new event_id). None of them can change an impression's label:
    the gate quarantines them, and the valid copy of the event stays.

    Args:
        events: the day's valid events (EVENT_SCHEMA).
        n: how many bad rows.
        rng: the world's random generator (keeps the world deterministic).
    """
    explicit = np.flatnonzero(np.asarray(events.column("action").to_pylist()) != "impression")
    picks = rng.choice(explicit, size=min(n, len(explicit)), replace=False)
    rows = events.take(pa.array(np.sort(picks))).to_pylist()
    for i, row in enumerate(rows):
        kind = DIRTY_KINDS[i % len(DIRTY_KINDS)]
        if kind != "duplicate_event_id":
            row["event_id"] = f"{row['event_id']}-dirty-{kind}"
        if kind == "unknown_action":
            row["action"] = row["action"][:-1] + "x"
        elif kind == "unknown_surface":
            row["surface"] = "sidebar"
        elif kind == "ts_out_of_day":
            row["ts"] = row["ts"] + dt.timedelta(days=1)
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


@dataclass
class _World:
    centers: np.ndarray  # (K, d)
    item_v: np.ndarray  # (N, d), row i = item id i + 1
    item_q: np.ndarray  # (N,)
    item_created_us: np.ndarray  # (N,) sorted ascending
    user_u: np.ndarray  # (U, d), row i = user id i + 1
    user_activity: np.ndarray  # (U,)


def _make_world(cfg: SynthConfig, rng: np.random.Generator, start_us: int) -> _World:
    d, k = cfg.latent_dim, cfg.n_clusters
    centers = _unit(rng.standard_normal((k, d)))  # (K, d)
    n_total = cfg.n_items + cfg.new_items_per_day * cfg.n_days
    cluster = rng.integers(0, k, n_total)
    item_v = _unit(centers[cluster] + cfg.item_spread * rng.standard_normal((n_total, d)))  # (N, d)
    item_q = cfg.quality_std * rng.standard_normal(n_total)
    hist_us = cfg.item_history_days * _DAY_US
    created = [np.sort(start_us - 1 - rng.integers(0, hist_us, cfg.n_items))]
    for day in range(cfg.n_days):
        created.append(np.sort(start_us + day * _DAY_US + rng.integers(0, _DAY_US, cfg.new_items_per_day)))
    item_created = np.concatenate(created).astype(np.int64)
    c1, c2 = rng.integers(0, k, cfg.n_users), rng.integers(0, k, cfg.n_users)
    w = rng.uniform(0.5, 1.0, (cfg.n_users, 1))
    user_u = _unit(
        w * centers[c1] + (1 - w) * centers[c2] + cfg.user_spread * rng.standard_normal((cfg.n_users, d))
    )  # (U, d)
    activity = rng.lognormal(0.0, 0.5, cfg.n_users)
    activity = activity / activity.mean()
    return _World(centers, item_v, item_q, item_created, user_u, activity)


def _items_table(cfg: SynthConfig, rng: np.random.Generator, world: _World) -> pa.Table:
    w = rng.standard_normal((CONTENT_DIM, cfg.latent_dim)) / np.sqrt(cfg.latent_dim)  # (C, d)
    content = world.item_v @ w.T * 2.0 + cfg.content_noise * rng.standard_normal((len(world.item_v), CONTENT_DIM))
    content = content.astype(np.float32)  # (N, C)
    category = np.argmax(world.item_v @ world.centers.T, axis=1)  # (N,)
    n = len(world.item_v)
    return pa.table(
        {
            "item_id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
            "created_at": pa.array(world.item_created_us, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "category": pa.array([f"c{c:02d}" for c in category.tolist()], pa.string()),
            "content": pa.FixedSizeListArray.from_arrays(pa.array(content.reshape(-1)), CONTENT_DIM).cast(
                pa.list_(pa.float32())
            ),
        }
    )


def _pick_slates(
    cfg: SynthConfig,
    rng: np.random.Generator,
    world: _World,
    users: np.ndarray,
    req_us: np.ndarray,
    n_avail: np.ndarray,
    n_before_fresh: np.ndarray,
) -> np.ndarray:
    """Item indices (0-based) shown by each request, shape (R, slate_size); requests sorted by time."""
    n_req, slate = len(users), cfg.slate_size
    k_ret = min(slate, int(round(cfg.retrieval_frac * slate)))
    k_fresh = min(slate - k_ret, int(round(cfg.fresh_frac * slate)))
    out = np.empty((n_req, slate), dtype=np.int64)
    chunk = 256
    for s in range(0, n_req, chunk):
        e = min(n_req, s + chunk)
        c = e - s
        # Retrieval: score a random pool of items every request in the chunk can see.
        avail0 = int(n_avail[s])
        pool = np.sort(rng.choice(avail0, size=min(avail0, cfg.retrieval_pool), replace=False))  # (P,)
        query = world.user_u[users[s:e]] + cfg.retrieval_noise * rng.standard_normal((c, cfg.latent_dim))  # (c, d)
        scores = query @ world.item_v[pool].T  # (c, P)
        m = min(len(pool), max(4 * k_ret, k_ret))
        if k_ret:
            top = np.argpartition(-scores, m - 1, axis=1)[:, :m]  # (c, m) best m of the pool, unordered
            top = np.take_along_axis(top, np.argsort(top, axis=1), axis=1)  # canonical order
            keep = np.argsort(rng.random((c, m)), axis=1)[:, :k_ret]  # (c, k_ret) random k_ret of the m
            retrieved = pool[np.take_along_axis(top, keep, axis=1)]
        else:
            retrieved = np.empty((c, 0), dtype=np.int64)
        # Candidates for the fresh and random slots (extra draws cover collisions).
        lo, hi = n_before_fresh[s:e, None], n_avail[s:e, None]  # (c, 1)
        n_extra = 2 * slate
        fresh = lo + (rng.random((c, n_extra)) * (hi - lo)).astype(np.int64)  # (c, X); empty range -> lo == hi
        rand = (rng.random((c, n_extra)) * hi).astype(np.int64)  # (c, X)
        out[s:e] = _fill_slates(retrieved, fresh, hi > lo, rand, k_fresh, slate, hi[:, 0])
    return out


def _first_occurrence(cand: np.ndarray) -> np.ndarray:
    """Mask of the first occurrence of each value in each row, shape like ``cand`` (c, m)."""
    order = np.argsort(cand, axis=1, kind="stable")
    srt = np.take_along_axis(cand, order, axis=1)
    first_sorted = np.ones_like(srt, dtype=bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    return first


def _fill_slates(
    retrieved: np.ndarray,
    fresh: np.ndarray,
    has_fresh: np.ndarray,
    rand: np.ndarray,
    k_fresh: int,
    slate: int,
    n_avail: np.ndarray,
) -> np.ndarray:
    """Distinct slates: all retrieved items, then up to ``k_fresh`` fresh draws, then random draws.

    Args:
        retrieved: (c, k_ret) distinct item indices per row.
        fresh: (c, X) fresh-item draws; ignored in rows where ``has_fresh`` (c, 1) is False.
        has_fresh: (c, 1) whether the row has any fresh item to draw.
        rand: (c, X) uniform draws among the available items.
        k_fresh: fresh slots per slate.
        slate: slate size.
        n_avail: (c,) number of available items per row (for the rare fallback).

    Returns:
        (c, slate) item indices, distinct per row.
    """
    c, k_ret = retrieved.shape
    cand = np.concatenate([retrieved, fresh, rand], axis=1)  # (c, k_ret + 2X)
    first = _first_occurrence(cand)
    block = np.concatenate(
        [np.zeros(k_ret, np.int8), np.ones(fresh.shape[1], np.int8), np.full(rand.shape[1], 2, np.int8)]
    )[None, :]
    take = first & (block == 0)
    ok_fresh = first & (block == 1) & has_fresh
    take |= ok_fresh & (np.cumsum(ok_fresh, axis=1) <= k_fresh)
    ok_rand = first & (block == 2)  # a draw equal to an unused fresh draw is skipped: extras cover it
    need = slate - take.sum(axis=1, keepdims=True)  # (c, 1)
    take |= ok_rand & (np.cumsum(ok_rand, axis=1) <= need)
    cols = np.argsort(~take, axis=1, kind="stable")[:, :slate]  # taken columns first, in priority order
    out = np.take_along_axis(cand, cols, axis=1)
    for r in np.flatnonzero(take.sum(axis=1) < slate).tolist():  # unlucky draws: add the newest unused items
        row = list(out[r][take[r][cols[r]]])
        chosen = set(row)
        j = int(n_avail[r]) - 1
        while len(row) < slate:
            if j not in chosen:
                row.append(j)
                chosen.add(j)
            j -= 1
        out[r] = row
    return out


@dataclass
class _Requests:
    """One day's ranking requests, sorted by time (R requests of S items each)."""

    users: np.ndarray  # (R,) 0-based user index
    ts_us: np.ndarray  # (R,) request time
    surface: np.ndarray  # (R,) index into SURFACE_NAMES
    slates: np.ndarray  # (R, S) 0-based item indices shown


@dataclass
class _Impressions:
    """Every item shown by a day's requests, with its true probabilities and sampled responses (I = R x S)."""

    req: np.ndarray  # (I,) request index
    item: np.ndarray  # (I,) 0-based item index
    user: np.ndarray  # (I,) 0-based user index
    surface: np.ndarray  # (I,) the request's surface
    ts_us: np.ndarray  # (I,) the request's time
    p_click: np.ndarray  # (I,)
    p_save_c: np.ndarray  # (I,) P(save | click)
    p_hide_nc: np.ndarray  # (I,) P(hide | no click)
    click: np.ndarray  # (I,) bool
    save: np.ndarray  # (I,) bool
    hide: np.ndarray  # (I,) bool
    click_ts: np.ndarray  # (I,)
    save_ts: np.ndarray  # (I,)
    hide_ts: np.ndarray  # (I,)
    dwell: np.ndarray  # (I,) dwell ms of the click


@dataclass
class _Organic:
    """A day's search clicks outside any request (O clicks), some followed by a save."""

    user: np.ndarray  # (O,) 0-based user index
    item: np.ndarray  # (O,) 0-based item index
    ts_us: np.ndarray  # (O,) click time
    save: np.ndarray  # (O,) bool
    dwell: np.ndarray  # (O,) dwell ms of the click
    save_ts: np.ndarray  # (O,)


def _day_requests(cfg: SynthConfig, rng: np.random.Generator, world: _World, day_us: int) -> _Requests:
    """Draw the day's requests (counts, times, surfaces) and the slate each one shows."""
    n_req_u = rng.poisson(cfg.requests_per_user_day * world.user_activity)  # (U,)
    users = np.repeat(np.arange(cfg.n_users), n_req_u)
    req_us = day_us + rng.integers(0, _LAST_REQUEST_US, len(users))
    surf = rng.choice(3, size=len(users), p=np.asarray(cfg.surface_probs))
    order = np.lexsort((users, req_us))
    users, req_us, surf = users[order], req_us[order], surf[order]
    n_avail = np.searchsorted(world.item_created_us, req_us, side="right")  # items created <= request time
    n_before_fresh = np.searchsorted(world.item_created_us, req_us - _DAY_US, side="right")
    slates = _pick_slates(cfg, rng, world, users, req_us, n_avail, n_before_fresh)  # (R, S)
    return _Requests(users, req_us, surf, slates)


def _delay_us(base_s: float, scale_s: float, draws: np.ndarray) -> np.ndarray:
    """Response delays ``base_s + scale_s * draws`` seconds in microseconds, capped at _MAX_DELAY_US."""
    return np.minimum(((base_s + scale_s * draws) * _US).astype(np.int64), _MAX_DELAY_US)


def _impressions(cfg: SynthConfig, rng: np.random.Generator, world: _World, req: _Requests) -> _Impressions:
    """Expand the slates into impressions and draw each one's click, save and hide."""
    sb = np.asarray(cfg.surface_bias, dtype=np.float64)
    imp_req = np.repeat(np.arange(len(req.users)), cfg.slate_size)  # (I,)
    imp_item = req.slates.reshape(-1)  # (I,)
    imp_user = req.users[imp_req]
    imp_ts = req.ts_us[imp_req]
    aff = np.einsum("id,id->i", world.user_u[imp_user], world.item_v[imp_item])  # (I,)
    q = world.item_q[imp_item]
    p_click = _sigmoid(cfg.click_bias + cfg.click_slope * aff + q + sb[req.surface[imp_req]])
    p_save_c = _sigmoid(cfg.save_bias + cfg.save_slope * aff + q)
    p_hide_nc = _sigmoid(cfg.hide_bias - cfg.hide_slope * aff)
    draws = rng.random((len(imp_item), 3))
    click = draws[:, 0] < p_click
    save = click & (draws[:, 1] < p_save_c)
    hide = ~click & (draws[:, 2] < p_hide_nc)
    delay = rng.exponential(1.0, (len(imp_item), 3))
    click_ts = imp_ts + _delay_us(2, 20, delay[:, 0])
    save_ts = click_ts + _delay_us(3, 40, delay[:, 1])
    hide_ts = imp_ts + _delay_us(1, 8, delay[:, 2])
    dwell = np.exp(8.8 + 0.6 * aff + 0.5 * rng.standard_normal(len(imp_item))).astype(np.int64)
    return _Impressions(
        req=imp_req, item=imp_item, user=imp_user, surface=req.surface[imp_req], ts_us=imp_ts,
        p_click=p_click, p_save_c=p_save_c, p_hide_nc=p_hide_nc, click=click, save=save, hide=hide,
        click_ts=click_ts, save_ts=save_ts, hide_ts=hide_ts, dwell=dwell,
    )  # fmt: skip


def _organic_clicks(cfg: SynthConfig, rng: np.random.Generator, world: _World, day_us: int) -> _Organic:
    """Draw the day's search clicks: each user picks the best of 20 random items by affinity."""
    n_org_u = rng.poisson(cfg.organic_per_user_day * world.user_activity)
    org_user = np.repeat(np.arange(cfg.n_users), n_org_u)
    org_ts = day_us + rng.integers(0, _LAST_REQUEST_US, len(org_user))
    org_avail = np.searchsorted(world.item_created_us, org_ts, side="right")
    n_cand = 20
    cand = (rng.random((len(org_user), n_cand)) * org_avail[:, None]).astype(np.int64)  # (O, 20)
    cand_aff = np.einsum("od,ocd->oc", world.user_u[org_user], world.item_v[cand])  # (O, 20)
    gumbel = -np.log(-np.log(rng.random(cand_aff.shape)))
    org_item = cand[np.arange(len(org_user)), np.argmax(4.0 * cand_aff + gumbel, axis=1)]
    org_save = rng.random(len(org_user)) < 0.2
    org_dwell = np.exp(9.0 + 0.5 * rng.standard_normal(len(org_user))).astype(np.int64)
    org_save_ts = org_ts + _delay_us(3, 40, rng.exponential(1.0, len(org_user)))
    return _Organic(org_user, org_item, org_ts, org_save, org_dwell, org_save_ts)


# One block of events: (user, item, kind = index into _KINDS, surface, ts, request index or -1, dwell or -1).
_EventPart = tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _impression_part(imp: _Impressions, mask: np.ndarray, kind: int, ts: np.ndarray, dwell: np.ndarray) -> _EventPart:
    """Events of ``kind`` at the impressions where ``mask`` (I,) holds; ``ts`` and ``dwell`` are (I,)."""
    return imp.user[mask], imp.item[mask], kind, imp.surface[mask], ts[mask], imp.req[mask], dwell[mask]


def _organic_part(org: _Organic, mask: np.ndarray, kind: int, ts: np.ndarray, dwell: np.ndarray) -> _EventPart:
    """Events of ``kind`` at the organic clicks where ``mask`` (O,) holds: search surface, no request."""
    n = int(mask.sum())
    return org.user[mask], org.item[mask], kind, np.full(n, 1), ts[mask], np.full(n, -1), dwell[mask]


def _event_columns(imp: _Impressions, org: _Organic) -> tuple[np.ndarray, ...]:
    """All events of a day as parallel (E,) arrays in event-id order.

    Returns:
        (user, item, kind, surface, ts, request index or -1, dwell or -1), sorted by
        (ts, kind, request, user, item).
    """
    n_imp, n_org = len(imp.item), len(org.user)
    no_dwell = np.full(n_imp, -1)
    parts = [
        _impression_part(imp, np.ones(n_imp, bool), 0, imp.ts_us, no_dwell),
        _impression_part(imp, imp.click, 1, imp.click_ts, imp.dwell),
        _impression_part(imp, imp.save, 2, imp.save_ts, no_dwell),
        _impression_part(imp, imp.hide, 3, imp.hide_ts, no_dwell),
        _organic_part(org, np.ones(n_org, bool), 1, org.ts_us, org.dwell),
        _organic_part(org, org.save, 2, org.save_ts, np.full(n_org, -1)),
    ]
    cols = [np.concatenate([np.full(len(p[0]), p[2]) if j == 2 else p[j] for p in parts]) for j in range(len(parts[0]))]
    ev_user, ev_item, ev_kind, _, ev_ts, ev_req, _ = cols
    order = np.lexsort((ev_item, ev_user, ev_req, ev_kind, ev_ts))
    return tuple(a[order] for a in cols)


def _events_table(ds: str, cols: tuple[np.ndarray, ...], req_ids: np.ndarray) -> pa.Table:
    """EVENT_SCHEMA table of the sorted event columns of :func:`_event_columns` (ids 1-based)."""
    ev_user, ev_item, ev_kind, ev_surf, ev_ts, ev_req, ev_dwell = cols
    return pa.table(
        {
            "event_id": pa.array([f"{ds}-{i:07d}" for i in range(len(ev_user))], pa.string()),
            "user_id": pa.array(ev_user.astype(np.int64) + 1),
            "item_id": pa.array(ev_item.astype(np.int64) + 1),
            "action": pa.array(np.array(_KINDS, dtype=object)[ev_kind], pa.string()),
            "surface": pa.array(np.array(SURFACE_NAMES, dtype=object)[ev_surf], pa.string()),
            "ts": pa.array(ev_ts.astype(np.int64), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "request_id": pa.array(
                np.where(ev_req >= 0, req_ids[np.maximum(ev_req, 0)] if len(req_ids) else None, None), pa.string()
            ),
            "dwell_ms": pa.array(np.where(ev_dwell >= 0, ev_dwell, None), pa.int64()),
        },
        schema=EVENT_SCHEMA,
    )


def _truth_table(imp: _Impressions, req_ids: np.ndarray) -> pa.Table:
    """TRUTH_SCHEMA table: the true marginal probabilities of every impression."""
    return pa.table(
        {
            "request_id": pa.array(req_ids[imp.req] if len(req_ids) else [], pa.string()),
            "item_id": pa.array(imp.item.astype(np.int64) + 1),
            "p_click": pa.array(imp.p_click),
            "p_save": pa.array(imp.p_click * imp.p_save_c),
            "p_hide": pa.array((1 - imp.p_click) * imp.p_hide_nc),
        },
        schema=TRUTH_SCHEMA,
    )


def _day_stats(n_req: int, imp: _Impressions, org: _Organic, n_ev: int) -> dict:
    """Counts and label rates of one day."""
    n_imp = len(imp.item)
    return {
        "n_requests": int(n_req),
        "n_impressions": int(n_imp),
        "n_events": int(n_ev),
        "n_organic": int(len(org.user) + org.save.sum()),
        "click_rate": float(imp.click.mean()) if n_imp else 0.0,
        "save_rate": float(imp.save.mean()) if n_imp else 0.0,
        "hide_rate": float(imp.hide.mean()) if n_imp else 0.0,
        "mean_p_click": float(imp.p_click.mean()) if n_imp else 0.0,
    }


def _simulate_day(
    cfg: SynthConfig, rng: np.random.Generator, world: _World, ds: str
) -> tuple[pa.Table, pa.Table, dict]:
    """Events and truth of one day (the world's user interests are those of this day).

    Draws from ``rng`` in a fixed order (requests and slates, responses, organic clicks), so
    the same world and generator state give the same day.
    """
    day_us = int(day_window(ds)[0].timestamp()) * _US
    req = _day_requests(cfg, rng, world, day_us)
    imp = _impressions(cfg, rng, world, req)
    org = _organic_clicks(cfg, rng, world, day_us)
    n_req = len(req.users)
    req_ids = np.array([f"{ds}-r{i:06d}" for i in range(n_req)], dtype=object)
    cols = _event_columns(imp, org)
    events = _events_table(ds, cols, req_ids)
    return events, _truth_table(imp, req_ids), _day_stats(n_req, imp, org, len(cols[0]))


def generate_world(layout: Layout, cfg: SynthConfig) -> dict:
    """Generate the synthetic world and write raw events, items and ground truth under ``layout``.

    Writes ``raw/items/items.parquet``, ``raw/events/ds=D/part-0.parquet`` and
    ``raw/truth/ds=D/part-0.parquet`` for each of the ``cfg.n_days`` days from
    ``cfg.start_ds``; existing raw event and truth partitions are replaced. Deterministic:
    the same config writes byte-identical files.

    Args:
        layout: data root.
        cfg: world size and behaviour.

    Returns:
        Summary: days, users, items, events and label rates per day and overall, files written.
    """
    rng = np.random.default_rng(cfg.seed)
    start = parse_ds(cfg.start_ds)
    start_us = int(day_window(cfg.start_ds)[0].timestamp()) * _US
    world = _make_world(cfg, rng, start_us)
    items = _items_table(cfg, rng, world)

    days = [(start + dt.timedelta(days=i)).isoformat() for i in range(cfg.n_days)]
    items_path = write_items(layout, items, source="synth")
    clear_partitions(layout.raw_events)
    clear_partitions(truth_dir(layout))
    files = [str(items_path)]
    per_day: dict[str, dict] = {}
    for ds in days:  # one day in memory at a time
        events, truth, stats = _simulate_day(cfg, rng, world, ds)
        written = write_events(layout, events, source=f"synth ds={ds}", replace_all=False)
        if list(written) != [ds]:
            raise ContractError(f"synth: events of ds={ds} fell on other days: {sorted(written)}")
        if cfg.dirty_rows_per_day:
            dirty = dirty_rows(events, cfg.dirty_rows_per_day, rng)
            write_parquet(dirty, Layout.partition(layout.raw_events, ds) / DIRTY_FILE)
            stats["n_dirty"] = dirty.num_rows
            files.append(str(Layout.partition(layout.raw_events, ds) / DIRTY_FILE))
        path = Layout.partition(truth_dir(layout), ds) / PART_FILE
        write_parquet(truth, path)
        files += [str(Layout.partition(layout.raw_events, ds) / PART_FILE), str(path)]
        per_day[ds] = stats
        # Interests drift overnight.
        world.user_u = _unit(world.user_u + cfg.drift * rng.standard_normal(world.user_u.shape))

    n_imp = sum(s["n_impressions"] for s in per_day.values())

    def _rate(key: str) -> float:
        return round(sum(s[key] * s["n_impressions"] for s in per_day.values()) / max(n_imp, 1), 4)

    return {
        "days": days,
        "n_users": cfg.n_users,
        "n_items": int(items.num_rows),
        "n_items_initial": cfg.n_items,
        "n_events": {ds: s["n_events"] for ds, s in per_day.items()},
        "n_events_total": int(sum(st["n_events"] for st in per_day.values())),
        "n_impressions": int(n_imp),
        "n_requests": int(sum(s["n_requests"] for s in per_day.values())),
        "rates": {a: _rate(f"{a}_rate") for a in LABEL_ACTIONS},
        "per_day": per_day,
        "config": cfg.to_dict(),
        "files": files,
    }


def best_auc(layout: Layout, ds: str) -> dict[str, float]:
    """AUC per label action of scoring day ``ds``'s impressions with their TRUE probabilities.

    The label of an impression for an action is 1 when the raw events of ``ds`` hold that
    action for the same ``request_id`` and ``item_id``. No model can beat these numbers in
    expectation; they are the ceiling a trained ranker is compared to.

    Args:
        layout: data root of a synthetic world.
        ds: the day, ``YYYY-MM-DD``.

    Returns:
        ``{action: auc}`` for each of LABEL_ACTIONS (NaN when an action has no positive),
        plus ``n_impressions``.

    Raises:
        FileNotFoundError: the day has no truth or raw events (not a synthetic world?).
    """
    truth_path = Layout.partition(truth_dir(layout), ds) / PART_FILE
    events_path = Layout.partition(layout.raw_events, ds)
    if not truth_path.is_file():
        raise FileNotFoundError(f"best_auc: no ground truth for ds={ds} at {truth_path} (generate a synthetic world)")
    if not events_path.is_dir():
        raise FileNotFoundError(f"best_auc: no raw events for ds={ds} at {events_path}")
    from sklearn.metrics import roc_auc_score

    truth = pq.read_table(truth_path).to_pandas()
    events = pq.read_table(events_path, columns=["request_id", "item_id", "action"]).to_pandas()
    events = events[events["request_id"].notna()]
    out: dict[str, float] = {}
    for action in LABEL_ACTIONS:
        pos = events.loc[events["action"] == action, ["request_id", "item_id"]].drop_duplicates()
        pos["label"] = 1
        merged = truth.merge(pos, on=["request_id", "item_id"], how="left")
        labels = merged["label"].fillna(0).to_numpy(dtype=np.int64)
        both_classes = 0 < labels.sum() < len(labels)
        out[action] = float(roc_auc_score(labels, merged[f"p_{action}"].to_numpy())) if both_classes else float("nan")
    out["n_impressions"] = int(len(truth))
    return out
