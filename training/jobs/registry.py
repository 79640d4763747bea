"""Versioned model registry on the file system (``layout.models/<kind>/<version>/``).

Each version folder holds ``model.pt`` (state dict), ``config.json``, ``metrics.json``,
``data_version.json`` and ``artifact.json`` (kind, version, created, sha256 of the
weights), plus any extra JSON records the trainer attaches (e.g. ``gate.json``).
Versions look like ``v20260123T101500123456-1a2b3c`` (UTC creation time with
microseconds, then 6 hex of the content hash), so sorting the names sorts by creation;
a folder is written under a temporary name and renamed into place, never overwritten.

The served ranker is named by ``models/ranker/CURRENT``; every promotion and rollback is
appended to ``models/ranker/HISTORY`` (one JSON object per line).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from features.config import Layout

KINDS = ("pinfm", "ranker")
_FILES = ("model.pt", "config.json", "metrics.json", "data_version.json")


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why and where."""


def _kind_dir(layout: Layout, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {list(KINDS)}")
    return layout.models / kind


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_artifact(
    layout: Layout,
    kind: str,
    state_dict: dict,
    config: dict,
    metrics: dict,
    data_version: dict,
    extra: dict[str, dict] | None = None,
    files: list[Path] | None = None,
) -> str:
    """Write a new immutable version of ``kind`` and return its version string.

    Args:
        layout: data root.
        kind: "pinfm" or "ranker".
        state_dict: model weights (moved to CPU before saving).
        config: everything needed to rebuild the model (JSON-serializable).
        metrics: evaluation numbers.
        data_version: which data trained/evaluated it.
        extra: more JSON records to store, ``{"gate": {...}}`` → ``gate.json``.
        files: existing files copied in under their own names (training curve, metrics log).
    """
    root = _kind_dir(layout, kind)
    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state_dict.items()}, buf)
    weights = buf.getvalue()
    digest = hashlib.sha256(weights + json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    now = dt.datetime.now(dt.UTC)
    existing = [v["version"] for v in _scan(root)]
    version = f"v{now:%Y%m%dT%H%M%S}{now.microsecond:06d}-{digest[:6]}"
    while existing and version <= existing[-1]:  # clock went backwards / same microsecond: stay sortable
        now += dt.timedelta(microseconds=1)
        version = f"v{now:%Y%m%dT%H%M%S}{now.microsecond:06d}-{digest[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        (tmp / "model.pt").write_bytes(weights)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "metrics.json", metrics)
        _write_json(tmp / "data_version.json", data_version)
        meta = {"kind": kind, "version": version, "created": now.isoformat(), "sha256": digest}
        _write_json(tmp / "artifact.json", meta)
        for name, record in (extra or {}).items():
            if name in ("model", "config", "metrics", "data_version", "artifact") or "/" in name:
                raise ValueError(f"extra record name {name!r} is reserved or not a plain name")
            _write_json(tmp / f"{name}.json", record)
        for f in files or []:
            if Path(f).exists():
                shutil.copyfile(f, tmp / Path(f).name)
        target = root / version
        if target.exists():
            raise RegistryError(f"{target} already exists; versions are never overwritten")
        os.rename(tmp, target)
    except BaseException:
        for p in tmp.glob("*"):
            p.unlink()
        tmp.rmdir()
        raise
    return version


def _scan(root: Path) -> list[dict]:
    if not root.exists():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.startswith("v") and (p / "model.pt").exists():
            meta = _read_json(p / "artifact.json")
            out.append({"version": p.name, "created": meta.get("created"), "path": p})
    return out


def artifact_dir(layout: Layout, kind: str, version: str) -> Path:
    """Folder of one version; RegistryError naming the path when it does not exist."""
    path = _kind_dir(layout, kind) / version
    if not (path / "model.pt").exists():
        raise RegistryError(f"no {kind} version {version!r} at {path}")
    return path


def load_artifact(layout: Layout, kind: str, version: str) -> dict:
    """Everything stored for one version.

    Returns:
        dict with version, path, state_dict, config, metrics, data_version, artifact.
    """
    path = artifact_dir(layout, kind, version)
    return {
        "version": version,
        "path": path,
        "state_dict": torch.load(path / "model.pt", map_location="cpu", weights_only=True),
        "config": _read_json(path / "config.json"),
        "metrics": _read_json(path / "metrics.json"),
        "data_version": _read_json(path / "data_version.json"),
        "artifact": _read_json(path / "artifact.json"),
    }


def latest_version(layout: Layout, kind: str) -> str | None:
    """Newest version of ``kind`` or None."""
    rows = _scan(_kind_dir(layout, kind))
    return rows[-1]["version"] if rows else None


def list_versions(layout: Layout, kind: str = "ranker") -> list[dict]:
    """All versions of ``kind``, oldest first.

    Returns:
        list of {version, created, metrics, current}; ``current`` is only ever True for rankers.
    """
    cur = current_version(layout) if kind == "ranker" else None
    return [
        {
            "version": r["version"],
            "created": r["created"],
            "metrics": _read_json(r["path"] / "metrics.json"),
            "current": r["version"] == cur,
        }
        for r in _scan(_kind_dir(layout, kind))
    ]


def current_file(layout: Layout) -> Path:
    """``models/ranker/CURRENT``: the file that names the served ranker version."""
    return layout.models / "ranker" / "CURRENT"


def _history_file(layout: Layout) -> Path:
    return layout.models / "ranker" / "HISTORY"


def current_version(layout: Layout) -> str | None:
    """The served ranker version (``models/ranker/CURRENT``), or None when nothing is promoted."""
    path = current_file(layout)
    if not path.exists():
        return None
    return path.read_text().strip() or None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _history(layout: Layout) -> list[dict]:
    path = _history_file(layout)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _promotion_stack(layout: Layout) -> list[str]:
    """Replay HISTORY: a promotion pushes a version, a rollback pops the top one."""
    stack: list[str] = []
    for ev in _history(layout):
        if ev.get("event") == "promote":
            if not stack or stack[-1] != ev["version"]:
                stack.append(ev["version"])
        elif ev.get("event") == "rollback" and len(stack) > 1:
            stack.pop()
    return stack


def _record(layout: Layout, event: dict) -> None:
    path = _history_file(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(event, sort_keys=True) + "\n")


def promote(layout: Layout, version: str, reason: str = "manual") -> dict:
    """Make ``version`` the served ranker: atomic write of CURRENT, one line appended to HISTORY.

    Args:
        layout: data root.
        version: an existing ranker version.
        reason: free text stored in HISTORY (e.g. the gate decision).

    Returns:
        {version, previous, at, reason}.
    """
    artifact_dir(layout, "ranker", version)
    previous = current_version(layout)
    at = dt.datetime.now(dt.UTC).isoformat()
    _atomic_write(current_file(layout), version + "\n")
    event = {"event": "promote", "version": version, "previous": previous, "at": at, "reason": reason}
    _record(layout, event)
    return {"version": version, "previous": previous, "at": at, "reason": reason}


def rollback(layout: Layout) -> dict:
    """Serve the previously promoted ranker again (undo the latest promotion).

    Raises:
        RegistryError: when no earlier promoted version exists.

    Returns:
        {version, previous, at}: ``version`` is now CURRENT, ``previous`` was.
    """
    stack = _promotion_stack(layout)
    current = current_version(layout)
    if current is None:
        raise RegistryError(f"nothing is promoted yet ({current_file(layout)} does not exist): nothing to roll back")
    if len(stack) < 2:
        raise RegistryError(f"no previously promoted ranker to roll back to (current: {current}; see HISTORY)")
    target = stack[-2]
    artifact_dir(layout, "ranker", target)
    at = dt.datetime.now(dt.UTC).isoformat()
    _atomic_write(current_file(layout), target + "\n")
    _record(layout, {"event": "rollback", "version": target, "previous": current, "at": at})
    return {"version": target, "previous": current, "at": at}
