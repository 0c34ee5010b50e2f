"""Module routes: a library module whose code cannot reach the graph passes as one graph is given,
for that module only, an equivalent forward the passes can fuse. ``moe_fusion.compile`` applies
them before the model is traced, and checks each on the model's first call: the swapped forward
must give the original's output on that call's own inputs, or it is undone. The report names the
route of every candidate module, fused or refused with the reason.

The graph route is preferred wherever dynamo captures a block whole; a route here exists only for
code it cannot capture:

* ``hf_experts``: HF transformers experts modules (``@use_experts_implementation``) running the
  ``eager`` implementation (a Python loop over the experts hit, which breaks the graph at
  ``nonzero``) are switched to transformers' own ``grouped_mm`` implementation: the same math
  (tokens sorted by expert, one grouped matmul per projection), which the FFN pass fuses into
  ``npu_ffn_grouped``. The model's config is not touched (other modules keep their implementation).
* ``megatron_moe`` (``megatron_route``): megatron-core's ``MoELayer`` with the all-to-all token
  dispatcher (whose split sizes go through the host) or the all-gather one, and ``SequentialMLP``
  or ``GroupedMLP`` experts, gets a forward of the fused ops themselves:
  its own router, then ``npu_moe_distribute_dispatch_v2`` -> ``npu_ffn_grouped`` ->
  ``npu_moe_distribute_combine_v2`` over its EP group.

A route that recognizes a module but cannot express it exactly raises ``Refusal`` from its
``candidate``: the module keeps its forward and the report gives the reason. A route whose swapped
forward communicates (``agree``) settles both its candidacy (before any swapped forward runs: a
refusal can depend on the machine, e.g. its native matmul units) and its first-call verdict with
the other ranks of the module's group, so that a rank that swapped never meets one that did not.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_flatten, tree_map

from . import megatron_route
from .context import FusionEvent, FusionReport, Refusal

PATTERN = "module_route"
# (rtol, atol) of a swapped forward's agreement with the original on the first call: sums in
# another order, a few roundings of the output's dtype apart.
TOLERANCES = {torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 1e-2)}
FP32_TOLERANCE = (1e-4, 1e-5)


@dataclass(frozen=True)
class ModuleRoute:
    """``candidate(module)``: what the route would swap, for the report (None: not a candidate;
    raises ``Refusal`` for a module it recognizes but cannot express);
    ``swap(module)``: installs the swapped forward and returns what undoes it;
    ``agree(module, ok)``: the verdict of every process sharing the module (called on each of them,
    in the same module order), None for a route whose forward is local to the process;
    ``graph_break(module)``: why the swapped forward of a candidate leaves part of it outside the
    graph (None: it traces whole), None for a route whose forwards always trace whole."""

    name: str
    candidate: Callable[[torch.nn.Module], Optional[str]]
    swap: Callable[[torch.nn.Module], Callable[[], None]]
    agree: Optional[Callable[[torch.nn.Module, bool], bool]] = None
    graph_break: Optional[Callable[[torch.nn.Module], Optional[str]]] = None


def _hf_grouped_experts_forward() -> Optional[Callable[..., Any]]:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return None
    return ALL_EXPERTS_FUNCTIONS.get("grouped_mm")


def _hf_experts_candidate(module: torch.nn.Module) -> Optional[str]:
    if not type(module).__module__.startswith("transformers."):
        return None
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
    # Only modules whose class forward dispatches on the implementation (the decorator wraps it).
    dispatching = hasattr(type(module).forward, "__wrapped__") and "forward" not in vars(module)
    if implementation != "eager" or not dispatching or _hf_grouped_experts_forward() is None:
        return None
    return f"{type(module).__name__} with eager experts -> transformers' grouped_mm experts"


def _hf_experts_swap(module: torch.nn.Module) -> Callable[[], None]:
    module.forward = types.MethodType(_hf_grouped_experts_forward(), module)
    return lambda: delattr(module, "forward")


ROUTES: tuple[ModuleRoute, ...] = (
    ModuleRoute("hf_experts", _hf_experts_candidate, _hf_experts_swap),
    ModuleRoute("megatron_moe", megatron_route.candidate, megatron_route.swap, megatron_route.agree,
                megatron_route.graph_break),
)


def candidates(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, ModuleRoute, str]]:
    """``(path, module, route, what)`` of every module of ``model`` a route applies to."""
    return _scan(model)[0]


def _scan(model: torch.nn.Module, settle: bool = False) -> tuple[list[tuple[str, torch.nn.Module, ModuleRoute, str]],
                                                                 list[tuple[str, ModuleRoute, str]]]:
    """The candidates of ``model`` and the ``(path, route, reason)`` of the modules a route refused.

    With ``settle``, a route whose forward communicates (``agree``) settles each module it recognizes
    with the other processes sharing it, in module order: a candidate that another process refused
    (its CPU's native matmul units differ, say) is refused here too, so that a process checking a
    swapped forward never waits in its collectives for one that kept the original."""
    found, refused = [], []
    for path, module in model.named_modules():
        for route in ROUTES:
            try:
                what, why = route.candidate(module), None
            except Refusal as refusal:
                what, why = None, str(refusal)
            if what is None and why is None:
                continue
            where = path or type(model).__name__
            if settle and route.agree is not None and not route.agree(module, why is None) and why is None:
                why = f"{what}: refused on another process sharing the module (its report says why)"
            if why is None:
                found.append((where, module, route, what))
            else:
                refused.append((where, route, why))
            break
    return found, refused


def apply_checked(model: torch.nn.Module, args: tuple, kwargs: dict, report: Optional[FusionReport],
                  fullgraph: bool = False) -> None:
    """Swap every candidate module of ``model`` whose swapped forward equals its original forward on
    the inputs it receives in ``model(*args, **kwargs)`` (run once eagerly, without gradients).

    The check leaves the random number generators as it found them (the model's own run draws
    what it would have drawn), and replays each module's call from the CPU generator state it
    started with, so a module drawing random numbers is compared on the same draws.

    Raises ``ValueError`` with ``fullgraph`` when a candidate's swapped forward would leave part of
    the module outside the graph (on every process sharing it: the candidates are settled first)."""
    found, refused = _scan(model, settle=True)
    for path, route, why in refused:
        _record(report, False, path, f"{route.name}: not routed: {why}")
    if fullgraph:
        _refuse_graph_breaks(found)
    if not found:
        return
    with torch.random.fork_rng():
        _check_swaps(model, args, kwargs, report, found)


def _refuse_graph_breaks(found: list[tuple[str, torch.nn.Module, ModuleRoute, str]]) -> None:
    """Raise when a candidate's swapped forward breaks the graph ``fullgraph=True`` asks for. Not a
    refusal: the module's original forward does not trace whole either (that is why it has a route),
    and it would fail inside the library's code, on some ranks only where its graph breaks differ."""
    for path, module, route, what in found:
        reason = route.graph_break(module) if route.graph_break is not None else None
        if reason is not None:
            raise ValueError(f"moe_fusion.compile: fullgraph=True asks for one graph, but the {route.name} route of "
                             f"{path} {reason}; compile with fullgraph=False to fuse the rest")


def _check_swaps(model: torch.nn.Module, args: tuple, kwargs: dict, report: Optional[FusionReport],
                 found: list[tuple[str, torch.nn.Module, ModuleRoute, str]]) -> None:
    calls: dict[str, tuple] = {}
    states: dict[str, torch.Tensor] = {}
    hooks = [hook for path, module, _, _ in found for hook in (
        module.register_forward_pre_hook(_rng_recorder(states, path)),
        module.register_forward_hook(_recorder(calls, path), with_kwargs=True))]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    for path, module, route, what in found:
        if path not in calls:
            _record(report, False, path, f"{route.name}: {what}: not called on the first call, not swapped")
            continue
        module_args, module_kwargs, want = calls[path]
        undo = route.swap(module)
        torch.set_rng_state(states[path])
        try:
            with torch.no_grad():
                got = module(*module_args, **module_kwargs)
            difference = _difference(got, want)
        except Exception as error:      # noqa: BLE001  (reported, and the swap undone)
            difference = f"raised {type(error).__name__}: {error}"
        if route.agree is not None and not route.agree(module, difference is None) and difference is None:
            difference = "equal here, but not on another process sharing the module"
        if difference is None:
            _record(report, True, path, f"{route.name}: {what} (module route, equal on the first call)")
        else:
            undo()
            _record(report, False, path, f"{route.name}: {what}: the swapped forward differs from the original on "
                                         f"the first call ({difference}); undone")


def _rng_recorder(states: dict, path: str) -> Callable[..., None]:
    def record(module: torch.nn.Module, args: tuple) -> None:
        states.setdefault(path, torch.get_rng_state())   # the CPU generator as the first call began
    return record


def _recorder(calls: dict, path: str) -> Callable[..., None]:
    def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if path not in calls:   # the first call of the module (a module may run more than once)
            clone = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t   # noqa: E731
            calls[path] = (tree_map(clone, args), tree_map(clone, kwargs), tree_map(clone, output))
    return record


def _difference(got: Any, want: Any) -> Optional[str]:
    """Why ``got`` is not ``want`` (structure, shapes, values beyond the dtype's tolerances relative to
    the output's scale), or None."""
    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(want)
    if got_spec != want_spec:
        return f"outputs of another structure: {got_spec} vs {want_spec}"
    for g, w in zip(got_leaves, want_leaves):
        if not isinstance(w, torch.Tensor):
            continue
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"output {tuple(g.shape)} {g.dtype} vs {tuple(w.shape)} {w.dtype}"
        rtol, atol = TOLERANCES.get(w.dtype, FP32_TOLERANCE)
        scale = w.abs().max().item() if w.numel() else 0.0
        error = (g.float() - w.float()).abs().max().item() if w.numel() else 0.0
        if not error <= atol + rtol * scale:
            return f"max difference {error:.3g} at output scale {scale:.3g}"
    return None


def _record(report: Optional[FusionReport], fused: bool, where: str, detail: str) -> None:
    counters["moe_fusion"][f"{'fused' if fused else 'refused'}_{PATTERN}"] += 1
    if report is not None:
        report.events.append(FusionEvent(PATTERN, fused, where, detail))
