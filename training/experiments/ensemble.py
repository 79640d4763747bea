"""Ensembles of ``afm bench seqrec`` runs: members trained side by side, scored by their summed logits.

Each member is an ordinary seqrec run with its own seed and run directory. The ensemble
scores item i for user u by Σ_m s_m(u, i) / τ_m, the sum of the members' logits (their
similarities over their learned temperatures). Concatenating the members' temperature-scaled
user states, and their item embeddings, gives the same scores with one dot product, so an
ensemble ranks, and could serve from a vector index, like one model of Σ D_m dimensions.

Layout of an ensemble run directory::

    run_dir/ensemble.json        {"members": ["member-0", "member-1"], "seeds": [0, 1]}
    run_dir/member-0/…           an ordinary seqrec run (best.pt, checkpoint.pt, result.json, …)
    run_dir/result.json          the ensemble's benchmark line

The members train at the same time in separate processes that share the machine's
threads; each resumes from its own checkpoint after a crash.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.bench.seqrec import (
    SeqRecBatches,
    SeqRecConfig,
    SeqRecData,
    SeqRecMember,
    bench_figures,
    load_seqrec_member,
    published_comparison,
    ranks_of_vectors,
    run_seqrec_bench,
    scoring_vectors,
)
from training.model.backbone import device_name, resolve_device
from training.retrieval import DEFAULT_KS, retrieval_metrics

log = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.json"


def member_dirs(run_dir: Path | str) -> list[Path]:
    """The run directories an ensemble run consists of; a plain seqrec run is its own only member."""
    run_dir = Path(run_dir)
    manifest = run_dir / ENSEMBLE_FILE
    if not manifest.exists():
        return [run_dir]
    names = json.loads(manifest.read_text(encoding="utf-8"))["members"]
    if not names:
        raise ValueError(f"{manifest} lists no members")
    return [run_dir / name for name in names]


def load_members(run_dirs: Sequence[Path | str], device: str = "auto") -> list[SeqRecMember]:
    """Every member of the given runs (plain or ensemble run directories, in order)."""
    return [load_seqrec_member(d, device) for run_dir in run_dirs for d in member_dirs(run_dir)]


@torch.no_grad()
def ensemble_ranks(
    members: Sequence[SeqRecMember],
    data: SeqRecData,
    part: str,
    protocol: str = "full",
    users: np.ndarray | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """(U,) 0-based rank of each eval user's ``part`` target by the members' summed logits.

    Args:
        members: from :func:`load_members`; one member ranks like :func:`training.bench.seqrec.retrieval_ranks`.
        data, part, protocol, users, seed: as :func:`training.bench.seqrec.retrieval_ranks`.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    states, items = [], []
    for m in members:
        temperature = m.temperature if len(members) > 1 else 1.0  # one member: its similarities rank the same
        s, e = scoring_vectors(m.model, data, part, m.cfg.max_len, m.cfg.objective.similarity, users, temperature)
        states.append(s)  # (U, D_m)
        items.append(e)  # (I + 1, D_m)
    device = states[0].device
    q = torch.cat([s.to(device) for s in states], dim=1)  # (U, Σ D_m)
    catalog = torch.cat([e.to(device) for e in items], dim=1)  # (I + 1, Σ D_m)
    return ranks_of_vectors(q, catalog, data, part, protocol, users, seed)


def _init_member_process(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _train_member(data_path: str, cfg: SeqRecConfig, protocol: str, run_dir: Path, resume: bool, desc: str) -> dict:
    # the parent shows one bar for all members; each member's log lines carry its name
    return run_seqrec_bench(
        data_path, cfg, protocol=protocol, run_dir=run_dir, resume=resume, desc=desc, progress_bar=False
    )


def _stop_members(pool: ProcessPoolExecutor) -> None:
    """End the members still training (their checkpoints let a rerun resume them)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # the executor has no public kill
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.terminate()


def _steps_logged(run_dir: Path) -> int:
    """The last step a member wrote to its metrics log (0 before the first line)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (ValueError, KeyError):  # a line being written
        return 0


def _wait_with_progress(futures: list[Future], dirs: list[Path], steps: int, poll_s: float = 5.0) -> None:
    """One progress bar over all members (their logged steps), until every member has ended."""
    with tqdm(
        total=steps * len(dirs), desc=f"seqrec {len(dirs)} members", unit="step", disable=None
    ) as bar:  # a terminal only, as the Trainer's
        while True:
            done, _ = wait(futures, timeout=poll_s, return_when=FIRST_EXCEPTION)
            logged = [_steps_logged(d) for d in dirs]
            bar.update(sum(logged) - bar.n)
            bar.set_postfix_str(" ".join(f"m{i}={n}" for i, n in enumerate(logged)))
            if len(done) == len(futures) or any(f.exception() is not None for f in done):
                return


def _threads_per_member(threads: int | None, members: int) -> int:
    """Equal share (≥ 1) of ``threads`` (default: this process's) for each member; warns when they share cores."""
    total = threads or torch.get_num_threads()
    if total < members:
        log.warning("%d members on %d threads: the members share cores", members, total)
    return max(1, total // members)


def _train_members(
    data_path: Path | str,
    cfg: SeqRecConfig,
    protocol: str,
    resume: bool,
    run_dir: Path,
    seeds: dict[str, int],
    per_member: int,
    steps: int,
) -> list[dict]:
    """Train the members side by side, each a seqrec run in its own process and in ``run_dir / name``.

    Args:
        data_path, cfg, protocol, resume: as :func:`run_seqrec_ensemble_bench` (``cfg.seed`` replaced per member).
        run_dir: the ensemble's directory.
        seeds: each member's seed by its name (the name of its subdirectory).
        per_member: torch threads of each member's process.
        steps: training steps of one member (for the progress bar).

    Returns:
        Each member's benchmark line, in the order of ``seeds``.

    Raises:
        RuntimeError: a member failed (the first failure named; the others are stopped).
    """
    names = list(seeds)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch thread pools
    with ProcessPoolExecutor(
        len(names), mp_context=ctx, initializer=_init_member_process, initargs=(per_member,)
    ) as pool:
        futures = [
            pool.submit(
                _train_member, str(data_path), cfg.replace(seed=s), protocol, run_dir / n, resume, f"seqrec {n}"
            )
            for n, s in seeds.items()
        ]
        _wait_with_progress(futures, [run_dir / n for n in names], steps)
        failed = [(n, f.exception()) for n, f in zip(names, futures, strict=True) if f.done() and f.exception()]
        if failed:
            _stop_members(pool)  # fail now, not after the other members' training
            n, e = failed[0]
            raise RuntimeError(f"ensemble member {n} ({run_dir / n}) failed: {e}") from e
        return [f.result() for f in futures]


def _member_summary(run_dir: Path, seeds: dict[str, int], lines: list[dict]) -> dict:
    """The members' mean test NDCG@10 and HR@10, and each member's own figures under ``members``."""
    keys = ("hr@10", "ndcg@10", "best_valid_ndcg@10", "train_seconds")
    return {
        "member_mean_ndcg@10": round(float(np.mean([m["ndcg@10"] for m in lines])), 5),
        "member_mean_hr@10": round(float(np.mean([m["hr@10"] for m in lines])), 5),
        "members": [
            {"run_dir": str(run_dir / n), "seed": s, **{k: m[k] for k in keys}}
            for (n, s), m in zip(seeds.items(), lines, strict=True)
        ],
    }


def _score_ensemble(run_dir: Path, data: SeqRecData, protocol: str, device: str) -> tuple[dict, dict]:
    """Test metrics (HR/NDCG@DEFAULT_KS, MRR) and validation NDCG@10 of the trained members' ensemble."""
    loaded = load_members([run_dir], device)
    test = retrieval_metrics(ensemble_ranks(loaded, data, "test", protocol), DEFAULT_KS)
    valid = retrieval_metrics(ensemble_ranks(loaded, data, "valid", protocol), (10,))
    return test, valid


def run_seqrec_ensemble_bench(
    data_path: Path | str,
    cfg: SeqRecConfig,
    members: int,
    run_dir: Path,
    protocol: str = "full",
    resume: bool = True,
    threads: int | None = None,
) -> dict:
    """Train ``members`` seqrec runs (seeds ``cfg.seed``, ``cfg.seed + 1``, …) at once; score their ensemble.

    Args:
        data_path: the ``user item`` file.
        cfg: settings of every member (only the seed differs).
        members: how many (≥ 2).
        run_dir: the ensemble's directory (members in ``member-<i>/``).
        protocol: as :func:`training.bench.seqrec.run_seqrec_bench`.
        resume: members continue from their checkpoints.
        threads: CPU threads in all (default: this process's); each member gets an equal share (≥ 1).

    Returns:
        The benchmark line of the ensemble (test metrics, validation NDCG@10, the published
        ratio), with each member's own line under ``members``.
    """
    if members < 2:
        raise ValueError(f"an ensemble needs members ≥ 2, got {members}; run 'afm bench seqrec' without --members")
    t0 = time.perf_counter()
    data = SeqRecData.load(data_path)
    batches_per_epoch = SeqRecBatches(data.train_sequences(), cfg.batch_size, cfg.max_len, cfg.seed).per_epoch
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seeds = {f"member-{i}": cfg.seed + i for i in range(members)}
    manifest = {"members": list(seeds), "seeds": list(seeds.values())}
    (run_dir / ENSEMBLE_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    per_member = _threads_per_member(threads, members)
    log.info(
        "seqrec ensemble: %d members (seeds %s), %d thread(s) each, in %s",
        members, list(seeds.values()), per_member, run_dir,
    )  # fmt: skip
    lines = _train_members(data_path, cfg, protocol, resume, run_dir, seeds, per_member, cfg.epochs * batches_per_epoch)
    train_seconds = time.perf_counter() - t0

    test, valid = _score_ensemble(run_dir, data, protocol, cfg.device)
    out = {
        "bench": "seqrec-ensemble",
        **bench_figures(data_path, data, protocol, cfg.max_len, test),
        "valid_ndcg@10": round(valid["ndcg@10"], 5),
        "n_members": members,
        **_member_summary(run_dir, seeds, lines),
        "threads_per_member": per_member,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "device": device_name(resolve_device(cfg.device)),  # the threads in all; threads_per_member each
    }
    out.update(published_comparison(data_path, protocol, cfg.max_len, test))
    out["config"] = cfg.to_dict()
    (run_dir / "result.json").write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    log.info(
        "seqrec ensemble of %d: test hr@10=%.4f ndcg@10=%.4f (members' mean ndcg@10 %.4f) in %.0f s",
        members, out["hr@10"], out["ndcg@10"], out["member_mean_ndcg@10"], out["seconds"],
    )  # fmt: skip
    return out
