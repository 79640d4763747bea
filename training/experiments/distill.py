"""Distillation of a sequential recommender from teachers: frozen finished runs, or its
peers while they train (codistillation).

The student's next-token softmax over its sampled candidates (its positive, the in-batch
keys and the sampled negatives) is pulled towards the teacher's softmax over the same
candidates::

    loss += w · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

The teacher's logits get the student's log-Q correction and lose the same candidates
(accidental hits), so both are distributions over one set. A teacher of several models
scores by the mean of their logits, which ranks as the ensemble's sum does
(training.experiments.ensemble) and is as sharp as one model's.

Codistillation (Anil et al., 2018, "Large scale distributed neural network training
through online distillation"): N models train side by side, and each distils from the
others as they were at the start of the current epoch. A member writes its weights at
every epoch start to ``run_dir/peer-snapshots/step-<s>.pt`` and reads the others' of the
same step, waiting for them if it is ahead. A member's teacher is then a function of the
step alone, so a codistilled run is as reproducible as a plain one, and a member that
crashed resumes with the same teachers.

On Beauty neither gave one model the gain of an ensemble of two (README): students of one
model or of the ensemble ended level with training alone, and codistilled members agreed
with each other and ended below it.

Shapes: B batch, L length, D model dim, N (query, positive) pairs, C candidates.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.model.backbone import PinFM
from training.model.objectives import batch_hidden, temperature_from_log
from training.trainer import save_atomic

SNAPSHOT_DIR = "peer-snapshots"
FINAL_SNAPSHOT = "final.pt"


@dataclass
class TeacherModel:
    """One frozen scorer: logits are similarity(query, item) / temperature."""

    model: PinFM
    temperature: float
    similarity: str = "dot"


class EnsembleTeacher:
    """Frozen models scoring candidates by their mean logit (dropout off, no gradients).

    The mean ranks as the ensemble's sum does, and its softmax is as sharp as one member's.

    Args:
        members: the models, each with its logit temperature and similarity.
        sources: where the models came from (run directories), for the record.

    Example:
        >>> teacher = EnsembleTeacher([TeacherModel(model, 0.05)])
        >>> teacher.observe(batch)                       # once per step, on the step's batch
        >>> pos, cand = teacher.scores(rows, q_pos, pos_ids, cand_ids)   # (N,), (N, C)
    """

    def __init__(self, members: Sequence[TeacherModel], sources: Sequence[str] = ()) -> None:
        if not members:
            raise ValueError("a teacher needs at least one model")
        self.members = list(members)
        self.sources = [str(s) for s in sources]
        self._hidden: list[torch.Tensor] = []

    @property
    def ready(self) -> bool:
        """Whether the teacher scores now (a frozen one always does)."""
        return True

    @torch.no_grad()
    def observe(self, batch: dict) -> None:
        """Run every member on the step's batch (the student's inputs, the same padding)."""
        self._hidden = [batch_hidden(m.model.eval(), batch) for m in self.members]  # (B, L, D_m) each

    @torch.no_grad()
    def scores(
        self, rows: torch.Tensor, q_pos: torch.Tensor, pos_ids: torch.Tensor, cand_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean logits of each pair's positive (N,) and of every candidate (N, C)."""
        if len(self._hidden) != len(self.members):
            raise RuntimeError("EnsembleTeacher.scores before observe(batch)")
        pos = cand = None
        for m, hidden in zip(self.members, self._hidden, strict=True):
            q = hidden[rows, q_pos]  # (N, D_m)
            e_pos = m.model.item_embedding(pos_ids)  # (N, D_m)
            e_cand = m.model.item_embedding(cand_ids)  # (C, D_m)
            if m.similarity == "cosine":
                q, e_pos, e_cand = F.normalize(q, dim=-1), F.normalize(e_pos, dim=-1), F.normalize(e_cand, dim=-1)
            q = q / m.temperature
            p, c = (q * e_pos).sum(-1), q @ e_cand.T  # (N,), (N, C)
            pos = p if pos is None else pos + p
            cand = c if cand is None else cand + c
        n = len(self.members)
        return pos.float() / n, cand.float() / n


# ---------------------------------------------------------------- codistillation
def snapshot_path(run_dir: Path, step: int) -> Path:
    return run_dir / SNAPSHOT_DIR / f"step-{step:07d}.pt"


class PeerTeacher(EnsembleTeacher):
    """The other members of a codistilled ensemble, as they were at the start of this epoch.

    ``at_step(step)`` is called before every training step. At an epoch start it writes
    this member's weights, then loads each peer's weights of the same step (waiting for a
    peer that is behind; a peer that has finished serves its final weights). From
    ``start_epoch`` on the teacher is live; before it :attr:`ready` is False and the
    student trains on its own losses.

    Args:
        model, objective_log_temp: this member's model and its learned log-temperature.
        run_dir: this member's run directory (its snapshots go there).
        peer_dirs: the other members' run directories.
        peer_models: one model per peer, of the peers' configuration (weights are replaced).
        similarity: the members' similarity.
        per_epoch: steps per epoch.
        start_epoch: the first epoch that distils (0 = from the start, against random peers).
        timeout_s: how long to wait for a peer's snapshot before failing.
    """

    def __init__(
        self,
        model: PinFM,
        objective_log_temp: torch.Tensor,
        run_dir: Path,
        peer_dirs: Sequence[Path],
        peer_models: Sequence[PinFM],
        similarity: str,
        per_epoch: int,
        start_epoch: int = 1,
        timeout_s: float = 3600.0,
        poll_s: float = 0.5,
    ) -> None:
        if len(peer_dirs) != len(peer_models) or not peer_dirs:
            raise ValueError("PeerTeacher needs one model per peer directory, and at least one peer")
        super().__init__([TeacherModel(m, 1.0, similarity) for m in peer_models], [str(d) for d in peer_dirs])
        self.model, self.log_temp = model, objective_log_temp
        self.run_dir, self.peer_dirs = Path(run_dir), [Path(d) for d in peer_dirs]
        self.per_epoch, self.start_epoch = per_epoch, start_epoch
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.loaded_step: int | None = None

    @property
    def ready(self) -> bool:
        return self.loaded_step is not None

    def _own_state(self, step: int) -> dict:
        return {
            "step": step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "log_temp": self.log_temp.detach().cpu().clone(),
        }

    def _wait_for(self, peer_dir: Path, step: int) -> dict:
        path, final = snapshot_path(peer_dir, step), peer_dir / SNAPSHOT_DIR / FINAL_SNAPSHOT
        deadline = time.monotonic() + self.timeout_s
        while True:
            if path.exists():
                return torch.load(path, map_location="cpu", weights_only=False)
            if final.exists():
                state = torch.load(final, map_location="cpu", weights_only=False)
                if state["step"] <= step:  # the peer stopped before this step: its last weights
                    return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"codistillation: peer {peer_dir} wrote no snapshot for step {step} in {self.timeout_s:.0f} s; "
                    "is its process still running? (members must train at the same time: afm bench seqrec --members)"
                )
            time.sleep(self.poll_s)

    def at_step(self, step: int) -> None:
        """Exchange weights at an epoch start; load the teachers a resumed run needs."""
        epoch, boundary = divmod(step, self.per_epoch)
        if boundary == 0 and epoch >= self.start_epoch:
            save_atomic(self._own_state(step), snapshot_path(self.run_dir, step))
        if epoch < self.start_epoch:
            return
        wanted = epoch * self.per_epoch
        if self.loaded_step == wanted:
            return
        for teacher, peer_dir in zip(self.members, self.peer_dirs, strict=True):
            state = self._wait_for(peer_dir, wanted)
            teacher.model.load_state_dict(state["model"])
            teacher.temperature = float(temperature_from_log(state["log_temp"]))
        self.loaded_step = wanted
        # every peer has passed step `wanted`, so none still needs this member's previous snapshot
        old = snapshot_path(self.run_dir, wanted - self.per_epoch)
        old.unlink(missing_ok=True)

    def finish(self, step: int) -> None:
        """Leave this member's last weights for peers that are still training."""
        save_atomic(self._own_state(step), self.run_dir / SNAPSHOT_DIR / FINAL_SNAPSHOT)


def remove_snapshots(run_dir: Path) -> None:
    """Delete a member's weight snapshots: after every member has finished, and before a fresh start."""
    snap_dir = Path(run_dir) / SNAPSHOT_DIR
    if snap_dir.exists():
        for p in snap_dir.glob("*.pt"):
            p.unlink(missing_ok=True)
        snap_dir.rmdir()
