"""``afm bench pretrain``: training throughput of the reference backbone and its FLOP utilisation.

Reference size: d=256, 4 layers, 8 heads, length 256, hashed item embedding (2 × 65,536),
the ``pinfm`` recipe's scores and negatives (dot products, popularity-sampled, log-Q) on the
next-token loss alone, with 4,096 sampled negatives, the recipe's in-batch cap and at most
4,096 pairs per step. Steps are timed after 3 warm-up steps, with bf16 autocast on CUDA.

Model FLOPs per step (the usual 6 × parameters × tokens count, plus attention and loss):

* backbone: ``6 · N · tokens`` with N the parameters of the transformer blocks and final norm;
* causal attention: ``6 · layers · L · d · tokens`` (QKᵀ and AV, half of the square);
* loss: ``6 · pairs · (keys + negatives) · d`` (in-batch keys, at most the in-batch cap, and
  sampled logits).

The same run times a large matmul (bf16 on CUDA, fp32 on CPU) to measure what this device
actually reaches; ``ratio`` = model FLOP/s ÷ that matmul FLOP/s. On CUDA ``mfu`` is model
FLOP/s ÷ the nominal peak (``--peak-tflops``, 800 for an H100's bf16 here).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from training.model.backbone import PinFM, PinFMConfig, device_name, resolve_device
from training.model.objectives import ItemCatalog, PinFMObjective
from training.model.recipes import PINFM
from training.trainer import param_groups

REFERENCE = PinFMConfig(d_model=256, n_layers=4, n_heads=8, max_len=256, hash_buckets=65536, dropout=0.0)
REFERENCE_OBJECTIVE = PINFM.objective_config(multi_token=0.0, negatives=4096, max_pairs=4096)
CATALOG_SIZE = 1_000_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int | None = None, reps: int = 10) -> float:
    """Measured TFLOP/s of an n × n × n matmul (bf16 on CUDA, fp32 on CPU)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def model_flops_per_step(
    model: PinFM, batch_size: int, seq_len: int, pairs: int, negatives: int, keys: int | None = None
) -> float:
    """Training FLOPs of one step (forward + backward), see the module docstring (``keys``: in-batch keys, default ``pairs``)."""
    cfg = model.cfg
    n_params = sum(p.numel() for p in [*model.blocks.parameters(), *model.ln_f.parameters()])  # no lookups
    tokens = batch_size * seq_len
    backbone = 6 * n_params * tokens
    attention = 6 * cfg.n_layers * seq_len * cfg.d_model * tokens
    loss = 6 * pairs * ((pairs if keys is None else keys) + negatives) * cfg.d_model
    return float(backbone + attention + loss)


def bench_pretrain(
    device: str = "auto",
    steps: int | None = None,
    batch_size: int | None = None,
    peak_tflops: float = 800.0,
    seq_len: int = 256,
) -> dict:
    """Time training steps of the reference backbone; returns the benchmark line."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    steps = steps or (50 if cuda else 10)
    batch_size = batch_size or (64 if cuda else 8)
    torch.manual_seed(0)
    cfg = REFERENCE if seq_len == REFERENCE.max_len else PinFMConfig(**{**REFERENCE.to_dict(), "max_len": seq_len})
    model = PinFM(cfg).to(dev)
    catalog = ItemCatalog(np.arange(1, CATALOG_SIZE + 1), np.ones(CATALOG_SIZE))
    objective = PinFMObjective(REFERENCE_OBJECTIVE, catalog).to(dev)
    params = torch.nn.ModuleList([model, objective])
    opt = torch.optim.AdamW(param_groups(params, 0.01), lr=1e-4, fused=True)
    items = torch.randint(1, CATALOG_SIZE + 1, (batch_size, seq_len), device=dev)
    ones = torch.ones_like(items)
    batch = {
        "item_ids": items,
        "action_ids": ones * 2,
        "surface_ids": ones,
        "pad_mask": ones.bool(),
        "positive": ones.bool(),
    }
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> float:
        with autocast:
            loss, _ = objective(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(3):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    _sync(dev)
    seconds = time.perf_counter() - t0
    pairs = min(batch_size * (seq_len - 1), REFERENCE_OBJECTIVE.max_pairs or batch_size * seq_len)
    cap = REFERENCE_OBJECTIVE.in_batch_max
    keys = pairs if cap is None or not REFERENCE_OBJECTIVE.in_batch_negatives else min(pairs, cap)
    flops = model_flops_per_step(model, batch_size, seq_len, pairs, int(REFERENCE_OBJECTIVE.negatives), keys)
    achieved = flops * steps / seconds / 1e12
    measured_peak = matmul_tflops(dev)
    return {
        "bench": "pretrain",
        "device": device_name(dev),
        "precision": "bf16 autocast" if cuda else "fp32",
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps": steps,
        "tokens_per_s": round(batch_size * seq_len * steps / seconds, 1),
        "step_ms": round(1000 * seconds / steps, 2),
        "model_tflop_per_step": round(flops / 1e12, 4),
        "achieved_tflops": round(achieved, 4),
        "matmul_tflops_measured": round(measured_peak, 3),
        "ratio": round(achieved / measured_peak, 4),  # judged by: model FLOP/s ÷ this device's matmul FLOP/s
        "mfu": round(achieved / peak_tflops, 4) if cuda else None,
        "peak_tflops_nominal": peak_tflops if cuda else None,
        "final_loss": round(last, 4),
    }
