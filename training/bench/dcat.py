"""``afm bench dcat``: candidates/s of DCAT vs one full forward per candidate, same weights.

A PinFM of the given size (``max_len = seq_len + 1``, dropout 0, eval mode) scores
``requests`` users, each with a full-length random sequence of ``seq_len`` events and
``candidates`` candidates:

* **DCAT** (:func:`training.model.dcat.dcat_scores`): one context pass per request, then the
  crossing pass of all candidates at once (on CPU through the fused flash-attention
  kernel, ``crossing_attention: "fused"``; the plain-matmul reference agrees with it, see
  ``tests/unit/training/test_dcat.py``);
* **naive** (:func:`training.model.dcat.naive_candidate_hidden`): every candidate appended to its
  sequence and the full backbone run, ``naive_max`` candidates per request (the first ones;
  all of them on CUDA by default, 50 on CPU, where the full set takes minutes).

Two figures, each DCAT vs naive with the same weights: ``seq_module`` (the backbone's
candidate hidden states alone) and ``ranker`` (the whole ranker as the service runs it,
:class:`training.model.ranker.Ranker` with its default ``sequence="hybrid"``: the DCAT sequence
module, the late features of a precomputed user embedding, MaskNet → DCNv2 → per-action heads;
on CPU the head is folded per request, :class:`training.model.folded_head.FoldedHead`). The
top-level ``ratio`` is the whole ranker's DCAT ÷ naive; ``ranker_cands_per_s`` and
``seq_module_cands_per_s`` repeat the two DCAT rates, and ``ranker_vs_seq_module`` is their
quotient (1 = the whole ranker as fast as its sequence part).

Both are timed after warm-up (median of ``reps`` calls) under ``torch.inference_mode``,
with bf16 autocast and ``torch.cuda.synchronize`` on CUDA, fp32 on CPU. ``max_abs_diff``
compares the two on the naive candidates in fp32 (no autocast; for the ranker: DCAT with the
folded head against the naive path with the plain modules); ``ratio`` = DCAT candidates/s ÷
naive candidates/s.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from training.model.backbone import PinFM, PinFMConfig, device_name, resolve_device
from training.model.dcat import dcat_scores, fused_cross_attention_available, naive_candidate_hidden
from training.model.inputs import history_len
from training.model.ranker import EARLY_FUSION_MODES, NewItemConfig, Ranker, RankerConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _figures(dcat_s: float, naive_s: float, n_dcat: int, n_naive: int) -> dict:
    dcat_rate, naive_rate = n_dcat / dcat_s, n_naive / naive_s
    return {
        "dcat_cands_per_s": round(dcat_rate, 1),
        "naive_cands_per_s": round(naive_rate, 2),
        "ratio": round(dcat_rate / naive_rate, 2),
        "dcat_ms": round(dcat_s * 1e3, 3),
        "naive_ms": round(naive_s * 1e3, 3),
    }


def bench_dcat(
    seq_len: int = 256,
    candidates: int = 500,
    requests: int = 1,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    device: str = "auto",
    reps: int | None = None,
    naive_max: int | None = None,
    seed: int = 0,
    compile: bool = False,
    sequence: str = "hybrid",
) -> dict:
    """Time DCAT and the naive path on the same model and inputs; returns the benchmark line.

    Args:
        seq_len: events per user sequence (all real).
        candidates: candidates per request.
        requests: unique user sequences scored together (one row each).
        d_model, n_layers, n_heads: backbone size.
        device: 'auto', 'cpu' or 'cuda'.
        reps: timed calls per path (default 10 DCAT / 3 naive on CPU, 20 / 10 on CUDA).
        naive_max: candidates per request the naive path scores (default 50 on CPU, all on CUDA).
        seed: seed of the weights and the inputs.
        compile: also time the DCAT sequence module compiled by ``torch.compile`` (inductor;
            on CPU with ``freezing``, which folds the eval-mode weights into prepacked GEMMs;
            on CUDA in ``reduce-overhead`` mode, i.e. CUDA graphs), side by side with eager,
            in ``seq_module_compiled``.
        sequence: the ranker's early-fusion mode, ``hybrid`` (default) or ``pinfm_early``.
    """
    if sequence not in EARLY_FUSION_MODES:
        raise ValueError(f"sequence must be one of {EARLY_FUSION_MODES}, got {sequence!r}")
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    dcat_reps, naive_reps = (reps, reps) if reps else ((20, 10) if cuda else (10, 3))
    n_naive = min(candidates, naive_max if naive_max is not None else (candidates if cuda else 50))
    if n_naive < 1:
        raise ValueError(f"naive_max must be ≥ 1, got {naive_max}")
    torch.manual_seed(seed)
    cfg = PinFMConfig(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_len=seq_len + 1, hash_buckets=65536, dropout=0.0
    )
    ranker = Ranker(RankerConfig(backbone=cfg, sequence=sequence, new_items=NewItemConfig.off())).to(dev).eval()
    seq, cands = _random_requests(cfg, requests, seq_len, candidates, seed, dev)
    subset = {k: v[:, :n_naive] for k, v in cands.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    n_dcat, n_naive_total = requests * candidates, requests * n_naive

    def dcat() -> torch.Tensor:
        with autocast:
            return dcat_scores(ranker.backbone, **seq, **cands)  # (U, C, D)

    with torch.inference_mode():
        seq_module, dcat_s = _time_seq_module(
            ranker.backbone, seq, subset, dcat, autocast, dev, (dcat_reps, naive_reps), (n_dcat, n_naive_total)
        )
        out = {
            "bench": "dcat",
            "seq_len": seq_len,
            "candidates": candidates,
            "requests": requests,
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "device": device_name(dev),
            "dtype": "bf16 autocast" if cuda else "fp32",
            # crossing attention: the CPU flash-attention kernel with the log-sum-exp merge, or plain matmuls
            "crossing_attention": "fused" if fused_cross_attention_available(dev) else "plain",
            "reps": {"dcat": dcat_reps, "naive": naive_reps},
            "seq_module": seq_module,
            "ranker_sequence": sequence,
        }
        out["ranker"] = _time_ranker(
            ranker, seq, cands, subset, autocast, dev, (dcat_reps, naive_reps), (n_dcat, n_naive_total)
        )
        out["ratio"] = out["ranker"]["ratio"]  # judged by: the whole ranker, DCAT ÷ naive
        out["seq_module_cands_per_s"] = seq_module["dcat_cands_per_s"]
        out["ranker_cands_per_s"] = out["ranker"]["dcat_cands_per_s"]
        out["ranker_vs_seq_module"] = round(out["ranker_cands_per_s"] / out["seq_module_cands_per_s"], 3)
        if compile:
            out["seq_module_compiled"] = _compiled_figures(dcat, dev, dcat_s, n_dcat, dcat_reps)
    return out


def _random_requests(
    cfg: PinFMConfig, requests: int, seq_len: int, candidates: int, seed: int, dev: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random full-length user sequences (U, L) and candidates (U, C) with ids over the whole hash range."""
    g = torch.Generator().manual_seed(seed)
    U, L, C = requests, seq_len, candidates
    seq = {
        "item_ids": torch.randint(1, 10**9, (U, L), generator=g).to(dev),
        "action_ids": torch.randint(1, cfg.n_actions, (U, L), generator=g).to(dev),
        "surface_ids": torch.randint(1, cfg.n_surfaces, (U, L), generator=g).to(dev),
    }
    cands = {
        "cand_ids": torch.randint(1, 10**9, (U, C), generator=g).to(dev),
        "cand_surface_ids": torch.randint(1, cfg.n_surfaces, (U, C), generator=g).to(dev),
    }
    return seq, cands


def _time_seq_module(
    model: PinFM,
    seq: dict[str, torch.Tensor],
    subset: dict[str, torch.Tensor],
    dcat: Callable[[], torch.Tensor],
    autocast: contextlib.AbstractContextManager,
    dev: torch.device,
    reps: tuple[int, int],
    counts: tuple[int, int],
) -> tuple[dict, float]:
    """The backbone alone: DCAT over every candidate vs the naive path over ``subset``; and DCAT's seconds."""
    chunk = 256 if dev.type == "cuda" else subset["cand_ids"].shape[1]

    def naive() -> torch.Tensor:
        with autocast:
            return naive_candidate_hidden(model, **seq, **subset, chunk=chunk)  # (U, n_naive, D)

    dcat_s = _median_seconds(dcat, dev, warmup=3, reps=reps[0])
    naive_s = _median_seconds(naive, dev, warmup=1, reps=reps[1])
    # correctness on the naive candidates, fp32 without autocast
    got = dcat_scores(model, **seq, **subset)
    want = naive_candidate_hidden(model, **seq, **subset, chunk=chunk)
    figures = {
        **_figures(dcat_s, naive_s, *counts),
        "naive_candidates": counts[1],
        "max_abs_diff": float((got - want).abs().max()),
    }
    return figures, dcat_s


def _time_ranker(
    ranker: Ranker,
    seq: dict[str, torch.Tensor],
    cands: dict[str, torch.Tensor],
    subset: dict[str, torch.Tensor],
    autocast: contextlib.AbstractContextManager,
    dev: torch.device,
    reps: tuple[int, int],
    counts: tuple[int, int],
) -> dict:
    """The whole early-fusion ranker, DCAT vs ``naive=True``, and how far their scores are apart (fp32).

    A ``hybrid`` ranker scores with a precomputed user embedding, as the service does with the
    published one (computed here once, untimed).
    """
    U, L = seq["item_ids"].shape
    rseq = {**seq, "pad_mask": torch.ones(U, L, dtype=torch.bool, device=dev)}
    late: dict = {}
    if ranker.uses_user_embedding:
        late["user_emb"] = ranker.user_embedding(rseq["item_ids"], rseq["action_ids"], rseq["surface_ids"])  # (U, D)

    def dcat_ranker() -> torch.Tensor:
        with autocast:
            return ranker(rseq, cands["cand_ids"], cands["cand_surface_ids"], **late)  # (U, C, A)

    def naive_ranker() -> torch.Tensor:
        with autocast:
            return ranker(rseq, subset["cand_ids"], subset["cand_surface_ids"], naive=True, **late)  # (U, n, A)

    dcat_r = _median_seconds(dcat_ranker, dev, warmup=2, reps=reps[0])
    naive_r = _median_seconds(naive_ranker, dev, warmup=1, reps=reps[1])
    got = ranker(rseq, subset["cand_ids"], subset["cand_surface_ids"], **late)
    # the reference: one full backbone pass per candidate, and the head's modules as they are
    want = ranker(rseq, subset["cand_ids"], subset["cand_surface_ids"], naive=True, fold=False, **late)
    return {**_figures(dcat_r, naive_r, *counts), "max_abs_diff": float((got - want).abs().max())}


def _compiled_figures(dcat: Callable[[], torch.Tensor], dev: torch.device, eager_s: float, n: int, reps: int) -> dict:
    """Candidates/s of ``dcat`` compiled by inductor, timed right after eager again (side by side)."""
    import torch._inductor.config as inductor_config

    cuda = dev.type == "cuda"
    saved = inductor_config.freezing
    inductor_config.freezing = not cuda  # eval-mode weights become constants: prepacked CPU GEMMs
    try:
        compiled = torch.compile(dcat, dynamic=False, mode="reduce-overhead" if cuda else None)
        t0 = time.perf_counter()
        got = compiled()
        _sync(dev)
        compile_s = time.perf_counter() - t0
        want = dcat()
        compiled_s = _median_seconds(compiled, dev, warmup=3, reps=reps)
        eager_again = _median_seconds(dcat, dev, warmup=1, reps=reps)
    finally:
        inductor_config.freezing = saved
    eager = min(eager_s, eager_again)
    return {
        "candidates_per_s": round(n / compiled_s, 1),
        "eager_candidates_per_s": round(n / eager, 1),
        "speedup_vs_eager": round(eager / compiled_s, 2),
        "max_abs_diff_vs_eager": float((got.float() - want.float()).abs().max()),
        "compile_seconds": round(compile_s, 1),
    }


def bench_grouping(
    requests: int = 64,
    per_request: int = 10,
    seq_len: int = 63,
    preset: str = "small",
    steps: int = 5,
    device: str = "auto",
    seed: int = 0,
) -> dict:
    """Training-step throughput of the early-fusion ranker with and without request grouping.

    Grouped: each request's sequence is one row and its ``per_request`` impressions are the
    candidates of that row (one context pass per request, DCAT crossing for the candidates),
    as :func:`training.jobs.finetune.batch_tensors` lays batches out. Ungrouped: every impression
    is its own row with its own copy of the sequence (one context pass per impression). Same
    weights, same impressions, one AdamW step of weighted BCE each; ``ratio`` = grouped
    impressions/s ÷ ungrouped impressions/s.
    """
    from training.model.interaction import default_label_weights, weighted_bce

    dev = resolve_device(device)
    torch.manual_seed(seed)
    bb = PinFMConfig.preset(preset)
    cfg = RankerConfig(backbone=bb, sequence="pinfm_early", new_items=NewItemConfig.off())
    seq_len = min(seq_len, history_len(cfg))
    ranker = Ranker(cfg).to(dev).train()
    opt = torch.optim.AdamW(ranker.parameters(), lr=1e-4)
    W = default_label_weights(cfg.actions).to(dev)
    g = torch.Generator().manual_seed(seed)
    R, C, L = requests, per_request, seq_len
    seq = {
        "item_ids": torch.randint(1, 10**9, (R, L), generator=g),
        "action_ids": torch.randint(1, bb.n_actions, (R, L), generator=g),
        "surface_ids": torch.randint(1, bb.n_surfaces, (R, L), generator=g),
        "pad_mask": torch.ones(R, L, dtype=torch.bool),
    }
    cand = torch.randint(1, 10**9, (R, C), generator=g)
    surf = torch.randint(1, bb.n_surfaces, (R, C), generator=g)
    labels = (torch.rand(R, C, len(cfg.actions), generator=g) < 0.2).float()
    grouped = ({k: v.to(dev) for k, v in seq.items()}, cand.to(dev), surf.to(dev), labels.to(dev))
    flat = (
        {k: v.repeat_interleave(C, dim=0).to(dev) for k, v in seq.items()},  # (R·C, L): one copy per impression
        cand.reshape(-1, 1).to(dev),
        surf.reshape(-1, 1).to(dev),
        labels.reshape(R * C, 1, -1).to(dev),
    )

    def step(batch: tuple) -> None:
        s, c, sf, y = batch
        loss = weighted_bce(ranker(s, c, sf), y, W)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    grouped_s = _median_seconds(lambda: step(grouped), dev, warmup=1, reps=steps)
    flat_s = _median_seconds(lambda: step(flat), dev, warmup=1, reps=steps)
    n = R * C
    return {
        "bench": "grouping",
        "requests": R,
        "per_request": C,
        "seq_len": L,
        "model": preset,
        "device": device_name(dev),
        "grouped_impressions_per_s": round(n / grouped_s, 1),
        "ungrouped_impressions_per_s": round(n / flat_s, 1),
        "grouped_step_ms": round(grouped_s * 1e3, 2),
        "ungrouped_step_ms": round(flat_s * 1e3, 2),
        "ratio": round(flat_s / grouped_s, 2),  # judged by: grouped ÷ ungrouped throughput (target ≥ 2)
    }
