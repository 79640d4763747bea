"""``afm bench full-softmax``: the exact softmax's catalog pass, fast paths against the plain one.

One training step of ``negatives="full"`` needs ``log Σ_j exp(q_i · e_j)`` of every query
against the whole catalog, and its gradients. The plain reference is autograd through
``torch.logsumexp(q @ e.T, 1)`` (it holds the (Q, I) logits and their gradient). The fast
paths are :class:`training.model.objectives.CatalogLogSumExp` in its four modes: fp32 or bf16
matmuls, with each block's softmax kept for the backward pass or scored again.

Each path runs forward + backward on the same random queries and catalog (default: the
sizes of an Amazon Beauty step, 1,435 queries × 54,543 items, d = 64), alternating paths
so that a noisy machine slows them alike. The figures are the median seconds per path,
the relative error of its query gradient against the plain one, and
``ratio`` = plain seconds ÷ seconds of the path the objective picks by default on this
device (``catalog_matmul="auto"``, softmax kept when it fits).
"""

from __future__ import annotations

import statistics
import time

import torch

from training.bench.pretrain import _sync
from training.model.backbone import device_name, resolve_device
from training.model.objectives import KEEP_SOFTMAX_BYTES, catalog_logsumexp, cpu_has_native_bf16

#: (name, bf16, keep) of the fast paths
PATHS = (
    ("fp32_rescore", False, False),
    ("fp32_keep", False, True),
    ("bf16_rescore", True, False),
    ("bf16_keep", True, True),
)


def bench_full_softmax(
    queries: int = 1435, items: int = 54543, dim: int = 64, reps: int = 3, device: str = "auto", seed: int = 0
) -> dict:
    """Seconds of forward + backward per path, their gradient errors, and the judged ratio."""
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(queries, dim, generator=gen) * 0.5).to(dev).requires_grad_()
    e = (torch.randn(items, dim, generator=gen) * 0.5).to(dev).requires_grad_()
    weights = torch.rand(queries, generator=gen).to(dev)  # a loss that weights the queries unequally

    def plain() -> torch.Tensor:
        return torch.logsumexp(q @ e.T, dim=1)

    runs = {"plain": plain} | {
        name: (lambda bf16=bf16, keep=keep: catalog_logsumexp(q, e, bf16=bf16, keep=keep)) for name, bf16, keep in PATHS
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    grads: dict[str, torch.Tensor] = {}
    for _ in range(reps + 1):  # the first round warms up and is not counted
        for name, fn in runs.items():
            _sync(dev)
            t0 = time.perf_counter()
            (grad_q,) = torch.autograd.grad((fn() * weights).sum(), (q,))
            _sync(dev)
            seconds[name].append(time.perf_counter() - t0)
            grads[name] = grad_q
    median = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    ref = grads["plain"]
    errors = {name: float((g - ref).norm() / ref.norm()) for name, g in grads.items() if name != "plain"}
    bf16_default = dev.type == "cpu" and cpu_has_native_bf16()
    keep_default = queries * items * (2 if bf16_default else 4) <= KEEP_SOFTMAX_BYTES
    default = f"{'bf16' if bf16_default else 'fp32'}_{'keep' if keep_default else 'rescore'}"
    return {
        "bench": "full-softmax",
        "queries": queries,
        "items": items,
        "dim": dim,
        **{f"{name}_s": round(s, 4) for name, s in median.items()},
        **{f"{name}_grad_rel_err": float(f"{err:.2e}") for name, err in errors.items()},
        "default_path": default,
        "ratio": round(median["plain"] / median[default], 2),  # judged by: plain seconds ÷ default path seconds
        "device": device_name(dev),
    }
