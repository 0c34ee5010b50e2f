"""The one error type every moe_fusion operator raises for bad input.

Eager kernels and fake (Meta) kernels share the validators in ``op_protos``, so the same
``OpValidationError`` with the same message is raised in eager mode and at trace time.
"""
from __future__ import annotations

from typing import Any


class OpValidationError(ValueError):
    """A call broke a rule of the operator's contract (SPEC). The message names the op, the
    argument, the rule and the value seen."""


def fail(op: str, arg: str, rule: str, seen: Any) -> None:
    """Raise ``OpValidationError("<op>: <arg> <rule>, got <seen>")``."""
    raise OpValidationError(f"{op}: {arg} {rule}, got {seen}")
