"""Compile/validation targets.

``portable`` (the default) checks only the rules needed for an operator's semantics to be
defined. ``A2`` and ``A3`` add the hardware limits of that Ascend product (SPEC), so a program
validated for a target does not fail on that device. Fusion passes read the target too.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

TARGETS = ("portable", "A2", "A3")

_current: contextvars.ContextVar[str] = contextvars.ContextVar("moe_fusion_target", default="portable")


def _checked(name: str) -> str:
    if name not in TARGETS:
        raise ValueError(f"moe_fusion target must be one of {TARGETS}, got {name!r}")
    return name


def get_target() -> str:
    """The target in force: ``"portable"``, ``"A2"`` or ``"A3"``."""
    return _current.get()


def set_target(name: str) -> None:
    """Set the target for the rest of this context (thread / task)."""
    _current.set(_checked(name))


@contextlib.contextmanager
def target(name: str) -> Iterator[str]:
    """``with moe_fusion.target("A3"): ...`` validates with A3's limits inside the block."""
    token = _current.set(_checked(name))
    try:
        yield name
    finally:
        _current.reset(token)


def is_device_target() -> bool:
    """True when an Ascend product's hardware limits apply."""
    return _current.get() != "portable"
