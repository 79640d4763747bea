"""One base for every run-settings class: typed, frozen, checked, and round-tripping through JSON.

A settings class declares its fields with type hints and defaults, and says what makes a
combination invalid in :meth:`Settings.check`. The base gives every class the same
``replace`` / ``to_dict`` / ``from_dict`` / ``digest`` and the ``FIELD=VALUE`` overrides of
the command line (:meth:`Settings.with_overrides`), so no class writes its own.

Example:
    >>> class Size(Settings):
    ...     width: int = 4
    ...     def check(self) -> None:
    ...         if self.width < 1:
    ...             raise ValueError(f"width must be ≥ 1, got {self.width}")
    >>> Size().replace(width=8).to_dict()
    {'width': 8}
    >>> Size.from_dict({"width": 2}).with_overrides(["width=3"]).width
    3
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


def json_digest(value: Any) -> str:
    """Ten hex digits of a JSON-able value (keys sorted): names run directories."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


class SettingsError(ValueError):
    """A settings value, name or combination that cannot be used; the message names it."""


class Settings(BaseModel):
    """Base of the run settings: frozen, unknown names refused, checked when built.

    Class attributes a subclass may set:

    * ``retired_fields``: {name: value at which it did nothing}. Settings saved with such a
      field still load when it holds that value; any other value is refused, naming it (the
      run cannot be rebuilt by this version).
    * ``retired_if_inert``: names dropped silently when loading (they only acted through a
      retired field).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    retired_fields: ClassVar[dict[str, Any]] = {}
    retired_if_inert: ClassVar[tuple[str, ...]] = ()

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SettingsError(_one_line(type(self), exc)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kw: Any) -> Self:  # type: ignore[override]
        """pydantic's, with a one-line SettingsError that names each bad field."""
        try:
            return super().model_validate(obj, **kw)
        except ValidationError as exc:
            raise SettingsError(_one_line(cls, exc)) from None

    # ------------------------------------------------------------------ checking
    @model_validator(mode="before")
    @classmethod
    def _known_names_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, inert in cls.retired_fields.items():
            if name in data and (value := data.pop(name)) != inert:
                raise SettingsError(
                    f"{cls.__name__} was saved with {name}={value!r}, a setting this version no longer has "
                    f"(only {name}={inert!r}, which changed nothing, still loads); use the version that wrote it"
                )
        for name in cls.retired_if_inert:
            data.pop(name, None)
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise SettingsError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(cls.model_fields)}")
        return data

    def model_post_init(self, context: Any, /) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent setting (subclasses override)."""

    # ------------------------------------------------------------------ copies
    def replace(self, **changes: Any) -> Self:
        """A checked copy with some fields changed; SettingsError naming unknown fields."""
        current = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**current, **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values of every field (tuples become lists; :meth:`from_dict` reads them back)."""
        return self.model_dump(mode="json")

    @classmethod
    def upgrade_saved(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Settings saved by an earlier version, made current (subclasses fill fields it lacked)."""
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Settings as :meth:`to_dict` wrote them, also by earlier versions (:meth:`upgrade_saved`)."""
        return cls.model_validate(cls.upgrade_saved(dict(d)))

    def digest(self) -> str:
        """Ten hex digits that change when any setting does (names run directories)."""
        return json_digest(self.to_dict())

    # ------------------------------------------------------------------ command line
    def with_overrides(self, overrides: Iterable[str]) -> Self:
        """A copy with ``FIELD=VALUE`` overrides applied (``GROUP.FIELD=VALUE`` inside a nested group).

        Values are read as YAML scalars or lists (``3``, ``1.5e-3``, ``true``, ``null``,
        ``[128, 64]``, ``full``) and then checked against the field's type.

        Raises:
            SettingsError: an override is not ``FIELD=VALUE``, names no field, or its value
                does not fit the field; the message names it.
        """
        d = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise SettingsError(f"{item!r} is not FIELD=VALUE")
            *groups, leaf = key.split(".")
            target = d
            for group in groups:
                if not isinstance(target.get(group), dict):
                    raise SettingsError(f"{key!r}: {group!r} is not a group of settings")
                target = target[group]
            if leaf not in target:
                raise SettingsError(f"{key!r} is not a setting; known: {sorted(target)}")
            try:
                target[leaf] = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError:
                target[leaf] = raw
        return type(self).model_validate(d)


def _one_line(cls: type, exc: ValidationError) -> str:
    """'Class: field: message; …' for every error of a pydantic ValidationError."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    text = "; ".join(parts)
    return text if text.startswith(f"{cls.__name__}:") else f"{cls.__name__}: {text}"
