"""One checked ``dataclasses.replace`` for every frozen run-settings dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def replace_fields(cfg: T, **kw: Any) -> T:
    """A copy of ``cfg`` with some fields changed; ValueError naming unknown fields."""
    unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise ValueError(f"unknown {type(cfg).__name__} fields {unknown}")
    return dataclasses.replace(cfg, **kw)
