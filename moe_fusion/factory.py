"""``module:function`` model factories, as the CLI's ``explain`` and ``export`` take them."""
from __future__ import annotations

import importlib
from typing import Any


class UsageError(ValueError):
    """A command-line argument the command cannot use: the CLI prints the message as one line and
    exits with status 2, as argparse does for the arguments it checks itself."""


def _names_module(error: ModuleNotFoundError, module_name: str) -> bool:
    """True when ``error`` is about ``module_name`` or one of its parent packages, not about an
    import inside the module."""
    parts = module_name.split(".")
    return error.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def load_factory(spec: str) -> tuple[Any, tuple]:
    """Call the factory named ``module:function`` and return its ``(model, inputs)``.

    Raises ``UsageError`` when ``spec`` names no importable module, no callable in it, or a
    callable that does not return a ``(model, inputs)`` pair; an exception raised inside the
    module or the factory propagates unchanged.
    """
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise UsageError(f"give the factory as module:function (returning (model, inputs)), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if not _names_module(error, module_name):
            raise
        raise UsageError(f"no module named {error.name!r} for factory {spec!r} "
                         "(is its directory on PYTHONPATH?)") from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"module {module_name!r} has no function {factory_name!r} "
                         f"(factory {spec!r})")
    made = factory()
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise UsageError(f"factory {spec!r} must return (model, inputs), "
                         f"returned {type(made).__name__}")
    model, inputs = made
    return model, tuple(inputs)
