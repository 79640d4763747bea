"""Checked construction helpers shared by every frozen run-settings dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def reject_unknown_fields(cls: type, names: Any) -> None:
    """ValueError naming every entry of ``names`` that is not a field of dataclass ``cls``."""
    unknown = sorted(set(names) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")


def replace_fields(cfg: T, **kw: Any) -> T:
    """A copy of ``cfg`` with some fields changed; ValueError naming unknown fields."""
    reject_unknown_fields(type(cfg), kw)
    return dataclasses.replace(cfg, **kw)
