"""``moe_fusion.compile``: one call that compiles a model with the fusion passes and the dynamo
settings MoE code needs.

MoE layers compute counts from the data (tokens per expert, capacities) and read them with
``.item()`` / ``.tolist()`` or build tensors whose sizes depend on them (``nonzero``,
``masked_select``). Under dynamo's defaults each of those is a graph break, which cuts a
dispatch/FFN/combine chain into pieces no pass can see whole. ``compile`` turns on
``capture_scalar_outputs`` and ``capture_dynamic_output_shape_ops`` for the compiled model only
(while it runs and recompiles), never for the rest of the program.

A library module whose code dynamo cannot capture whole gets an equivalent forward the passes can
fuse (``module_routes``), checked against the original on the model's first call, which then runs
eagerly (once: its side effects, a KV cache appended to, happen once); the compiled calls begin
with the second call and run with the checked forwards installed.

Some code cannot be traced under those settings at all: a count read from the data and then used
where Python needs its value (``x[i] for i in counts.tolist()``, Megatron's ``sort_chunks_by_idxs``)
makes dynamo raise where its defaults would break the graph. Such a call is run again with dynamo's
defaults, and so are the model's later calls (reported as a ``dynamo_settings`` event): the model
compiles as ``torch.compile`` would compile it. The failed call may have run the compiled graphs
before the failing frame once more (their collectives are matched: every rank fails at the same
frame; random draws there are drawn again).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch
from torch._dynamo.eval_frame import OptimizedModule
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from . import cost, module_routes
from .context import FusionEvent, FusionReport
from .pipeline import backend

# Dynamo settings in force while a model compiled by ``compile`` runs (and is traced).
MOE_DYNAMO_CONFIG = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}
SETTINGS_EVENT = "dynamo_settings"


def compile(model: Callable[..., Any], *, target: Optional[str] = None, report: Optional[FusionReport] = None,
            passes: Optional[Sequence[str]] = None, compiler: str = "inductor", cost_gate: bool = True,
            **compile_options: Any) -> Any:
    """``torch.compile(model, backend=moe_fusion.backend(...))`` with ``MOE_DYNAMO_CONFIG`` scoped to
    ``model``'s calls, and for a module the checked module routes (``module_routes``; when a route
    applies, the first call runs ``model`` eagerly, as written, and the compiled calls begin with
    the second).

    Args:
        model: an ``nn.Module`` or a function.
        target, report, passes, compiler, cost_gate: as ``moe_fusion.backend`` (the gate applies to the
            module routes too).
        compile_options: passed to ``torch.compile`` (``fullgraph``, ``dynamic``, ``mode``...).

    Returns:
        What ``torch.compile`` returns (an ``OptimizedModule`` for a module) with its calls run
        under ``MOE_DYNAMO_CONFIG``.
    """
    compiled = torch.compile(model, backend=backend(target, passes, report, compiler, cost_gate), **compile_options)
    scoped = torch._dynamo.config.patch(MOE_DYNAMO_CONFIG)
    if not isinstance(compiled, OptimizedModule):
        return functools.wraps(model)(scoped(compiled))
    default_forward = compiled.forward
    compiled_forward, routes, defaults, compiled_calls = scoped(default_forward), [], [], []

    def compiled_call(args: tuple, kwargs: dict) -> Any:
        if defaults:
            return default_forward(*args, **kwargs)
        try:
            return compiled_forward(*args, **kwargs)
        except GuardOnDataDependentSymNode as error:
            defaults.append(True)
            if report is not None:
                reason = " ".join(str(error).split("For more information")[0].split())[:300]
                report.events.append(FusionEvent(SETTINGS_EVENT, False, type(model).__name__,
                                                 "the model does not trace with data-dependent counts captured, "
                                                 f"compiled with dynamo's defaults instead ({reason})"))
            return default_forward(*args, **kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not routes:      # the first call: the module routes, checked on it (module_routes.apply_checked)
            with cost.gated(cost_gate and compiler == "inductor"):
                routed = module_routes.apply_checked(model, args, kwargs, report,
                                                     compile_options.get("fullgraph", False))
            routes.append(routed)
            if routed.ran:
                return routed.output
        # Activation checkpointing replays the first call inside the backward (the only forward that
        # runs there before a compiled one): it must run as that call ran, eagerly, or the tensors it
        # saves are not the first run's (torch.utils.checkpoint checks them).
        if routes[0].ran and not compiled_calls and torch._C._current_autograd_node() is not None:
            return model(*args, **kwargs)
        compiled_calls[:] = [True]
        with routes[0].installed():
            return compiled_call(args, kwargs)

    compiled.forward = forward
    return compiled
