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
makes dynamo raise where its defaults would break the graph. A model holding a library module known
to do so (``ModuleRoute.untraceable``) compiles with dynamo's defaults from its first call;
otherwise such a call is run again with dynamo's defaults, and so are the model's later calls
(both reported as a ``dynamo_settings`` event): the model compiles as ``torch.compile`` would
compile it. The failed call may have run the compiled graphs before the failing frame once more
(their collectives are matched: every rank fails at the same frame; random draws and side effects
there happen again).

Once a graph of the model has held a collective the passes rewrite, the model recompiles at static
shapes when an input's size changes (unless ``dynamic`` was given): the expert-parallel passes
check and fuse a block at concrete sizes (a graph dynamo recompiles with dynamic sizes keeps its
unfused exchange), and under captured scalars dynamo 2.13 computes a wrong ``.item()`` of a tensor
made from a dynamic size (DeepSpeed's capacity ``ceil(S / E * factor)``: a NaN, then an index out of
bounds).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional, Sequence

import torch
from torch._dynamo.eval_frame import OptimizedModule
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from . import agreement, cost, module_routes
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
    fusing = backend(target, passes, report, compiler, cost_gate)
    exchanged: list[bool] = []       # [True] once a graph of the model held a collective the passes rewrite

    def observing(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        # (a library's autograd Function holds its collectives in a subgraph: DeepSpeed's _AllToAll)
        graphs = (m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        if not exchanged and any(agreement.passes_exchange(graph) for graph in graphs):
            exchanged.append(True)
        return fusing(gm, example_inputs)

    compiled = torch.compile(model, backend=observing, **compile_options)
    settings = torch._dynamo.config.patch(MOE_DYNAMO_CONFIG)

    def shapes() -> contextlib.AbstractContextManager:
        """Static recompiles once the model exchanged (module docstring), else dynamo's choice."""
        static = exchanged and compile_options.get("dynamic") is None
        return torch._dynamo.config.patch(automatic_dynamic_shapes=False) if static else contextlib.nullcontext()

    def scoped(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            with settings, shapes():
                return fn(*args, **kwargs)
        return call

    if not isinstance(compiled, OptimizedModule):
        return functools.wraps(model)(scoped(compiled))
    default_forward = compiled.forward
    compiled_forward, routes, defaults, compiled_calls = scoped(default_forward), [], [], []

    def use_defaults(reason: str) -> None:
        defaults.append(True)
        if report is not None:
            report.events.append(FusionEvent(SETTINGS_EVENT, False, type(model).__name__,
                                             "the model does not trace with data-dependent counts captured, "
                                             f"compiled with dynamo's defaults instead ({reason})"))

    def compiled_call(args: tuple, kwargs: dict) -> Any:
        if not defaults:
            try:
                return compiled_forward(*args, **kwargs)
            except GuardOnDataDependentSymNode as error:
                use_defaults(" ".join(str(error).split("For more information")[0].split())[:300])
        with shapes():
            return default_forward(*args, **kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not routes:      # the first call: the module routes, checked on it (module_routes.apply_checked)
            with cost.gated(cost_gate and compiler == "inductor"):
                routed = module_routes.apply_checked(model, args, kwargs, report,
                                                     compile_options.get("fullgraph", False))
            routes.append(routed)
            if routed.untraceable is not None:      # known before any attempt: no side effect runs twice
                use_defaults(routed.untraceable)
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
