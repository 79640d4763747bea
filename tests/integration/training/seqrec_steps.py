"""``afm bench seqrec`` with a metrics line at every step, for launching under torchrun.

Usage: ``torchrun --standalone --nproc_per_node N tests/integration/training/seqrec_steps.py DATA RUN_DIR [FIELD=VALUE ...]``.
Runs :func:`training.bench.seqrec.run_seqrec_bench` on the ``tiny`` preset (the pinfm recipe at test
scale: sparse item gradients, in-batch + popularity-sampled negatives, next- and multi-token
losses) with ``--set``-style overrides, logging the loss of every step to ``RUN_DIR/metrics.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from training.bench import seqrec  # noqa: E402


def main(data: str, run_dir: str, *overrides: str) -> None:
    plain = seqrec._trainer_config
    seqrec._trainer_config = lambda *a, **kw: plain(*a, **kw).replace(log_every=1)  # a loss line per step
    cfg = seqrec.SeqRecConfig.preset("tiny").replace(device="cpu").with_overrides(overrides)
    seqrec.run_seqrec_bench(data, cfg, run_dir=Path(run_dir), resume=False, progress_bar=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
