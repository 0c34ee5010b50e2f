"""The one error type every moe_fusion operator raises for bad input.

Eager kernels and fake (Meta) kernels share the validators in ``op_protos``, so the same
``OpValidationError`` with the same message is raised in eager mode and at trace time.
"""
from __future__ import annotations

import re
from typing import Any


class OpValidationError(ValueError):
    """A call broke a rule of the operator's contract (SPEC). The message names the op, the
    argument, the rule and the value seen."""


def _with_example_sizes(message: str) -> str:
    """Symbolic sizes (``s97``) replaced by the sizes of the example being traced, so a message at
    trace time with ``dynamic=True`` reads like the eager one."""
    import torch
    from torch._guards import detect_fake_mode

    if torch.compiler.is_dynamo_compiling():   # dynamo tracing Python code (not a fake kernel): nothing to replace
        return message
    shape_env = getattr(detect_fake_mode(), "shape_env", None)
    if shape_env is None:
        return message
    sizes = {str(symbol): str(size) for symbol, size in shape_env.backed_var_to_val.items()}
    return re.sub(r"\b[su]\d+\b", lambda m: sizes.get(m.group(0), m.group(0)), message)


def fail(op: str, arg: str, rule: str, seen: Any) -> None:
    """Raise ``OpValidationError("<op>: <arg> <rule>, got <seen>")``."""
    raise OpValidationError(_with_example_sizes(f"{op}: {arg} {rule}, got {seen}"))
