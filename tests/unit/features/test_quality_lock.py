"""The GX project of a data root is used by one process at a time (parallel DAG runs share it)."""

from __future__ import annotations

import fcntl
import multiprocessing
from pathlib import Path

from features.config import Layout
from features.quality import project_lock


def _try_lock(root: str, out: multiprocessing.Queue) -> None:
    with open(Path(root) / "gx" / ".afm-project.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out.put("acquired")
        except BlockingIOError:
            out.put("blocked")


def _probe(root: Path) -> str:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_try_lock, args=(str(root), out))
    proc.start()
    proc.join(60)
    return out.get(timeout=5)


def test_a_second_process_waits_while_one_holds_the_project(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    with project_lock(layout):
        assert _probe(tmp_path) == "blocked"
    assert _probe(tmp_path) == "acquired"
