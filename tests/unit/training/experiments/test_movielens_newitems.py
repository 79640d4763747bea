"""MovieLens new-item experiment: time split, requests and negatives, determinism, end to end (tiny data)."""

from __future__ import annotations

import csv
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from afm.cli import cli
from features.contract import ACTION_IDS, CONTENT_DIM, LABEL_ACTIONS
from features.importers import rating_action
from training.data import ItemCreatedAt
from training.experiments import movielens_newitems
from training.experiments.movielens_newitems import (
    PRETRAINED_WITH_TIME_GAPS,
    REPORTED,
    NewItemsExperimentConfig,
    TimeSplit,
    _new_item_slices,
    content_vector,
    load_movielens,
    markdown_table,
    new_items,
    pretrain_sequences,
    ranking_examples,
    run_new_items,
)
from training.model.inputs import history_len

REPO = Path(__file__).resolve().parents[4]
MOVIELENS = REPO.parent / "shared" / "data" / "movielens-latest-small"
T0 = 1_400_000_000
DAY = 86_400
GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")


def write_movielens(root: Path, n_users: int = 30, n_movies: int = 60, seed: int = 0) -> Path:
    """A small MovieLens folder: movie m is released on day 3·m, users rate released movies over 200 days.

    Users prefer one genre (high stars there, low elsewhere); a few ratings share a timestamp
    with the user's previous one (bulk rating, as in the real data). Rows are written in a
    shuffled order: nothing may depend on the file order being chronological.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    movies = []
    for m in range(1, n_movies + 1):
        genres = "|".join(rng.choice(GENRES, size=int(rng.integers(1, 3)), replace=False))
        if m == 7:
            genres = "(no genres listed)"
        title = f"Movie {m} ({1990 + m % 30})" if m % 9 else f"Movie {m}"
        movies.append((m, title, genres))
    with (root / "movies.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["movieId", "title", "genres"])
        w.writerows(movies)
    rows = []
    for u in range(1, n_users + 1):
        liked = GENRES[u % len(GENRES)]
        rated: set[int] = set()
        t = T0 + int(rng.integers(0, 20 * DAY))
        for _ in range(int(rng.integers(8, 25))):
            t += 0 if rng.random() < 0.15 else int(rng.integers(1, 12 * DAY))
            released = [m for m, *_ in movies if T0 + 3 * m * DAY <= t and m not in rated]
            if not released:
                continue
            m = int(rng.choice(released))
            rated.add(m)
            stars = float(rng.choice([4.0, 4.5, 5.0] if liked in movies[m - 1][2] else [0.5, 2.0, 3.0, 3.5]))
            rows.append((u, m, stars, t))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    with (root / "ratings.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def ml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_movielens(tmp_path_factory.mktemp("movielens"))


def _raw(ml_dir: Path) -> dict[str, np.ndarray]:
    with (ml_dir / "ratings.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {
        "user": np.array([int(r["userId"]) for r in rows]),
        "item": np.array([int(r["movieId"]) for r in rows]),
        "rating": np.array([float(r["rating"]) for r in rows]),
        "ts": np.array([int(r["timestamp"]) for r in rows]),
    }


CFG = NewItemsExperimentConfig.tiny().replace(
    pretrain_quantile=0.5, finetune_quantile=0.75, negatives=5, recent_days=30.0, device="cpu"
)


def test_split_is_by_time_and_new_items_are_those_first_seen_after_the_cutoff(ml_dir: Path) -> None:
    raw = _raw(ml_dir)
    data = load_movielens(ml_dir)
    split = TimeSplit.from_quantiles(data.ts, 0.5, 0.75)
    assert split.t_pre < split.t_ft < split.t_end == raw["ts"].max()
    assert abs(np.mean(raw["ts"] <= split.t_pre) - 0.5) < 0.05
    assert abs(np.mean(raw["ts"] <= split.t_ft) - 0.75) < 0.05

    first = {int(m): int(raw["ts"][raw["item"] == m].min()) for m in np.unique(raw["item"])}
    expected_new = sorted(m for m, t in first.items() if t > split.t_pre)
    assert 0 < len(expected_new) < len(first)
    assert new_items(data, split.t_pre).tolist() == expected_new
    np.testing.assert_array_equal(data.items.created.lookup(np.array(sorted(first))), [first[m] for m in sorted(first)])

    train = ranking_examples(data, split.t_pre, split.t_ft, CFG, 15, np.random.default_rng(0))
    test = ranking_examples(data, split.t_ft, split.t_end, CFG, 15, np.random.default_rng(0))
    assert ((train.request_ts > split.t_pre) & (train.request_ts <= split.t_ft)).all()
    assert (test.request_ts > split.t_ft).all()
    assert len(train.sequences) == int(((raw["ts"] > split.t_pre) & (raw["ts"] <= split.t_ft)).sum())
    assert len(test.sequences) == int((raw["ts"] > split.t_ft).sum())

    # a validation split ends before the last ratings: its evaluation window stops at the END quantile
    val = TimeSplit.from_quantiles(data.ts, 0.3, 0.5, 0.75)
    assert (val.t_ft, val.t_end) == (split.t_pre, split.t_ft)
    held = ranking_examples(data, val.t_ft, val.t_end, CFG, 15, np.random.default_rng(0))
    assert (held.request_ts <= split.t_ft).all() and (held.request_ts > split.t_pre).all()
    with pytest.raises(ValueError, match="eval_quantile"):
        NewItemsExperimentConfig(pretrain_quantile=0.5, finetune_quantile=0.8, eval_quantile=0.7)


def test_pretraining_segments_hold_exactly_the_ratings_before_the_cutoff(ml_dir: Path) -> None:
    raw = _raw(ml_dir)
    data = load_movielens(ml_dir)
    t_pre = TimeSplit.from_quantiles(data.ts, 0.5, 0.75).t_pre
    seqs = pretrain_sequences(data, t_pre, max_len=6)
    real = np.arange(6)[None, :] < seqs.lengths[:, None]
    assert (seqs.ts[real] <= t_pre).all() and (seqs.item_ids[~real] == 0).all()
    assert (seqs.lengths >= 2).all() and (seqs.lengths <= 6).all()
    # every pre-cutoff rating is in one segment, except a user's oldest lone remainder (no next token)
    per_user = np.bincount(raw["user"][raw["ts"] <= t_pre])
    dropped = int(((per_user % 6) == 1).sum())
    assert int(seqs.lengths.sum()) == int((raw["ts"] <= t_pre).sum()) - dropped


def _positives(data, ex) -> np.ndarray:
    """(R,) rating index of each request (from its id ``ml-<user>-<rating index>``)."""
    return np.array([int(r.rsplit("-", 1)[1]) for r in ex.request_ids])


def test_requests_hold_the_rated_movie_with_its_labels_and_valid_negatives(ml_dir: Path) -> None:
    raw = _raw(ml_dir)
    data = load_movielens(ml_dir)
    split = TimeSplit.from_quantiles(data.ts, 0.5, 0.75)
    ex = ranking_examples(data, split.t_pre, split.t_end, CFG, 15, np.random.default_rng(3))
    rated = {u: set(raw["item"][raw["user"] == u].tolist()) for u in np.unique(raw["user"])}
    first = data.items.created
    col = {a: j for j, a in enumerate(LABEL_ACTIONS)}
    n_short = 0
    for r, g in enumerate(_positives(data, ex)):
        user, item, stars, ts = data.user_ids[g], data.item_ids[g], data.ratings[g], data.ts[g]
        assert ex.request_ts[r] == ts
        rows = np.flatnonzero(ex.req_index == r)
        items, labels = ex.item_ids[rows], ex.labels[rows]
        assert (items == item).sum() == 1 and len(set(items.tolist())) == len(items)
        y = labels[items == item][0]
        assert y[col["click"]] == (stars >= 4) and y[col["save"]] == (stars >= 5) and y[col["hide"]] == (stars < 3)
        negs = items[items != item]
        assert (labels[items != item] == 0).all()
        assert not set(negs.tolist()) & rated[int(user)]  # never a movie the user rated (at any time)
        assert (first.lookup(negs) <= ts).all() and (first.lookup(negs) >= 0).all()  # already first seen
        eligible = set(first.ids[first.created <= ts].tolist()) - rated[int(user)]
        assert len(negs) == min(CFG.negatives, len(eligible))  # k, unless the pool runs out
        n_short += len(negs) < CFG.negatives
    assert n_short < 0.5 * len(ex.sequences)


def test_recent_share_draws_young_negatives(ml_dir: Path) -> None:
    data = load_movielens(ml_dir)
    split = TimeSplit.from_quantiles(data.ts, 0.5, 0.75)

    def young_share(share: float) -> float:
        cfg = CFG.replace(recent_share=share, negatives=6)
        ex = ranking_examples(data, split.t_pre, split.t_end, cfg, 15, np.random.default_rng(0))
        neg = ex.labels.sum(1) == 0
        age = ex.request_ts[ex.req_index] - data.items.created.lookup(ex.item_ids)
        return float(np.mean(age[neg] <= cfg.recent_days * 86_400))

    assert young_share(1.0) > young_share(0.0) + 0.2


def test_request_sequence_is_the_users_strictly_earlier_ratings(ml_dir: Path) -> None:
    raw = _raw(ml_dir)
    data = load_movielens(ml_dir)
    split = TimeSplit.from_quantiles(data.ts, 0.5, 0.75)
    L = 5
    ex = ranking_examples(data, split.t_pre, split.t_end, CFG, L, np.random.default_rng(0))
    seqs = ex.sequences
    same_second = 0
    for r, g in enumerate(_positives(data, ex)):
        u, ts = data.user_ids[g], data.ts[g]
        mine = (raw["user"] == u) & (raw["ts"] < ts)
        order = np.argsort(raw["ts"][mine], kind="stable")
        expect_ts = raw["ts"][mine][order][-L:]
        n = int(seqs.lengths[r])
        assert n == len(expect_ts)
        np.testing.assert_array_equal(seqs.ts[r, :n], expect_ts)  # oldest first, newest last
        assert (seqs.item_ids[r, n:] == 0).all() and (seqs.action_ids[r, n:] == 0).all()  # right padded
        assert set(seqs.item_ids[r, :n].tolist()) <= set(raw["item"][mine].tolist())
        for i, a in zip(seqs.item_ids[r, :n], seqs.action_ids[r, :n], strict=True):
            stars = raw["rating"][(raw["user"] == u) & (raw["item"] == i)][0]
            assert a == ACTION_IDS[rating_action(stars)]
        same_second += int(((raw["user"] == u) & (raw["ts"] == ts)).sum() > 1)
    assert same_second > 0  # the data has bulk ratings, and they stay out of each other's sequences


def test_examples_are_deterministic_for_a_seed(ml_dir: Path) -> None:
    data = load_movielens(ml_dir)
    split = TimeSplit.from_quantiles(data.ts, 0.5, 0.75)
    cfg = CFG.replace(max_finetune_requests=40)

    def make(seed: int):
        return ranking_examples(data, split.t_pre, split.t_end, cfg, 15, np.random.default_rng(seed), 40)

    a, b, c = make(7), make(7), make(8)
    for name in ("item_ids", "req_index", "labels", "request_ts", "request_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.sequences.item_ids, b.sequences.item_ids)
    assert len(a.sequences) == 40
    assert not np.array_equal(a.item_ids, c.item_ids)


def test_content_vector_has_genres_year_and_flag() -> None:
    v = content_vector("Action|Comedy", "Heat (1995)")
    assert v.shape == (CONTENT_DIM,)
    assert np.linalg.norm(v[:-2]) == pytest.approx(1.0, abs=1e-5)
    assert v[-2] == pytest.approx(-0.25) and v[-1] == 1.0
    assert not content_vector("(no genres listed)", "Untitled").any()  # no content at all
    assert content_vector("Drama", "Old (1901)")[-2] == pytest.approx(-3.0)  # clipped


def test_new_item_slices_split_by_window_and_leave_out_first_day_impressions() -> None:
    day = 86_400
    split = TimeSplit(t_pre=T0, t_ft=T0 + 100 * day, t_end=T0 + 200 * day)
    # items: 1 old, 2 first seen in fine-tuning, 3 first seen after T_ft
    created = ItemCreatedAt(np.array([1, 2, 3]), np.array([T0 - day, T0 + 10 * day, T0 + 150 * day]))
    request_ts = np.array([T0 + 150 * day + 3_600, T0 + 160 * day])  # (R,)
    test = types.SimpleNamespace(
        item_ids=np.array([1, 2, 3, 1, 2, 3]), req_index=np.array([0, 0, 0, 1, 1, 1]), request_ts=request_ts
    )
    new = np.array([False, True, True, False, True, True])
    got = _new_item_slices(test, types.SimpleNamespace(created=created), split, new)
    assert got["auc_click_unseen"].tolist() == [False, False, True, False, False, True]
    assert got["auc_click_seen_in_finetuning"].tolist() == [False, True, False, False, True, False]
    # item 3 is an hour old at the first request, ten days at the second
    assert got["auc_click_new_after_first_day"].tolist() == [False, True, False, False, True, True]


def test_end_to_end_on_tiny_data_returns_the_figures(ml_dir: Path) -> None:
    out = run_new_items(ml_dir, CFG)
    for variant in ("with", "without"):
        assert set(REPORTED) <= set(out[variant])
        assert out[variant]["auc_click"] is not None and 0.0 <= out[variant]["auc_click"] <= 1.0
    assert out["with"] != out["without"]  # the variants were trained differently
    assert len(out["per_seed"]) == 1 and {"with", "without", "new_items_lift", "overall_change"} <= set(
        out["per_seed"][0]
    )
    assert {"new_items_lift", "overall_change", "target_met", "lifts", "seconds", "split", "pretrain"} <= set(out)
    assert out["n_eval_new"] > 0 and out["n_eval_old"] > 0
    assert out["n_eval_new"] + out["n_eval_old"] == out["n_eval_impressions"]
    assert out["pretrain"]["steps"] == CFG.pretrain.steps
    # the "with" rankers are also scored under the other young-item rule (mixed predictions)
    alt = out["alternative_young_rule"]["with_young_mix"]
    assert alt["auc_click_new"] is not None and alt["new_items_lift"] is not None
    assert "with_young_mix_lift" in out["per_seed"][0]
    table = markdown_table(out)
    assert "| mean | with |" in table and "| mean | without |" in table and "| mean | with_young_mix |" in table


class _Captured(Exception):
    """Stops run_new_items at its first fine-tuning, once the inputs are captured."""


@pytest.mark.parametrize(
    ("sequence", "time_gaps", "want_gaps"),
    [("pinfm_early", None, PRETRAINED_WITH_TIME_GAPS), ("pinfm_late", None, PRETRAINED_WITH_TIME_GAPS),
     ("pinfm_early", True, True)],
)  # fmt: skip
def test_rankers_read_sequences_by_the_shared_rules(ml_dir: Path, monkeypatch, sequence, time_gaps, want_gaps) -> None:
    """The experiment's requests hold the ranker's history length; its time gaps follow the backbone it pretrained."""
    seen = {}

    def capture(train, test, items, fcfg, rcfg, *args, **kw):
        seen.update(train=train, test=test, rcfg=rcfg)
        raise _Captured

    monkeypatch.setattr(movielens_newitems, "pretrain_backbone", lambda *a, **k: ({}, {}))
    monkeypatch.setattr(movielens_newitems, "train_ranker", capture)
    cfg = CFG.replace(finetune=CFG.finetune.replace(sequence=sequence, time_gaps=time_gaps))
    with pytest.raises(_Captured):
        run_new_items(ml_dir, cfg)
    rcfg = seen["rcfg"]
    assert rcfg.sequence == sequence and rcfg.time_gaps is want_gaps
    hist = history_len(rcfg)
    assert hist == rcfg.backbone.max_len - (sequence == "pinfm_early")
    for data in (seen["train"], seen["test"]):  # early fusion's arrays are one event narrower than late fusion's
        assert data.sequences.item_ids.shape[1] == hist and data.sequences.lengths.max() <= hist


def test_missing_data_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        load_movielens(tmp_path / "nope")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="movies.csv"):
        load_movielens(tmp_path)
    res = CliRunner().invoke(cli, ["eval", "new-items", "--data", str(tmp_path / "nope"), "--device", "cpu"])
    assert res.exit_code != 0 and isinstance(res.exception, FileNotFoundError)
    assert "data folder not found" in str(res.exception)


@pytest.mark.skipif(not MOVIELENS.exists(), reason="../shared/data/movielens-latest-small is not present")
def test_real_movielens_split_and_a_tiny_run() -> None:
    cfg = NewItemsExperimentConfig.tiny().replace(max_finetune_requests=300, max_eval_requests=300, device="cpu")
    out = run_new_items(MOVIELENS, cfg)
    assert out["n_ratings"] == 100_836
    assert out["split"]["t_pre_utc"].startswith("2013-") and out["split"]["t_ft_utc"].startswith("2016-")
    assert out["n_items_new"] > 1000
    assert out["n_finetune_requests"] == 300 and out["n_eval_requests"] == 300
    assert out["n_eval_new"] > 0 and out["n_eval_old"] > 0
    assert out["with"]["auc_click"] is not None and out["without"]["auc_click"] is not None
