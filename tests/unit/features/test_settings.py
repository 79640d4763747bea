"""The one settings base: checked construction, copies, saved forms, command-line overrides."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
from pydantic import Field

from features.settings import Settings, SettingsError


class Inner(Settings):
    width: int = 4
    negatives: int | Literal["full"] = 8
    hidden: tuple[int, ...] = (16, 8)
    cap: int | None = None

    retired_fields: ClassVar[dict[str, object]] = {"old_knob": 0}
    retired_if_inert: ClassVar[tuple[str, ...]] = ("old_knob_scale",)

    def check(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be ≥ 1, got {self.width}")


class Outer(Settings):
    inner: Inner = Field(default_factory=Inner)
    lr: float = 1e-3
    name: str = "run"


def test_construction_is_checked_and_names_the_problem() -> None:
    with pytest.raises(SettingsError, match="width must be ≥ 1, got 0"):
        Inner(width=0)
    with pytest.raises(SettingsError, match=r"unknown Inner fields \['depth'\]"):
        Inner(depth=3)
    with pytest.raises(SettingsError, match="inner: .*width must be ≥ 1"):
        Outer(inner={"width": -1})


def test_settings_are_frozen_and_replace_checks_the_copy() -> None:
    cfg = Outer()
    with pytest.raises(Exception, match="frozen"):
        cfg.lr = 0.1  # type: ignore[misc]
    assert cfg.replace(lr=0.5).lr == 0.5 and cfg.lr == 1e-3
    with pytest.raises(SettingsError, match="unknown Outer fields"):
        cfg.replace(learning_rate=0.5)
    with pytest.raises(SettingsError, match="width must be ≥ 1"):
        cfg.inner.replace(width=0)


def test_to_dict_round_trips_and_digest_follows_every_field() -> None:
    cfg = Outer(inner=Inner(negatives="full", hidden=(3,), cap=7), lr=2e-3)
    d = cfg.to_dict()
    assert d["inner"]["hidden"] == [3]  # JSON-ready
    assert Outer.from_dict(d) == cfg
    assert cfg.digest() == Outer.from_dict(d).digest()
    assert cfg.digest() != cfg.replace(name="other").digest()
    assert hash(cfg) == hash(Outer.from_dict(d))


def test_retired_fields_load_only_at_their_inert_value() -> None:
    assert Inner.from_dict({"width": 2, "old_knob": 0, "old_knob_scale": 9.0}) == Inner(width=2)
    with pytest.raises(SettingsError, match="saved with old_knob=1, a setting this version no longer has"):
        Inner.from_dict({"old_knob": 1})
    with pytest.raises(SettingsError, match="saved with old_knob=1"):  # nested groups too
        Outer.from_dict({"inner": {"old_knob": 1}})


def test_overrides_read_yaml_values_and_check_the_field_types() -> None:
    cfg = Outer().with_overrides(
        ["lr=1.5e-3", "inner.negatives=full", "inner.hidden=[64, 32]", "inner.cap=null", "name=second"]
    )
    assert cfg.lr == pytest.approx(1.5e-3)
    assert cfg.inner.negatives == "full" and cfg.inner.hidden == (64, 32) and cfg.inner.cap is None
    assert Outer().with_overrides(["inner.negatives=1024"]).inner.negatives == 1024
    assert isinstance(Outer().with_overrides(["inner.negatives=1024"]).inner.negatives, int)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr", "is not FIELD=VALUE"),
        ("rate=1", "'rate' is not a setting; known: \\['inner', 'lr', 'name'\\]"),
        ("lr.x=1", "'lr' is not a group of settings"),
        ("inner.width=wide", "inner: Inner: width: Input should be a valid integer"),
        ("inner.width=0", "width must be ≥ 1, got 0"),
        ("inner.negatives=some", "negatives.* Input should be 'full'"),
    ],
)
def test_bad_overrides_are_refused_naming_the_setting(override: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Outer().with_overrides([override])
