"""``module:function`` model factories, as the CLI's ``explain`` and ``export`` take them."""
from __future__ import annotations

import importlib
from typing import Any


def load_factory(spec: str, command: str) -> tuple[Any, tuple]:
    """Call the factory named ``module:function`` and return its ``(model, inputs)``."""
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise SystemExit(f"{command}: give the factory as module:function (returning (model, inputs)), got {spec!r}")
    model, inputs = getattr(importlib.import_module(module_name), factory_name)()
    return model, tuple(inputs)
