"""Module routes: a library module whose code cannot reach the graph passes as one graph is given,
for that module only, an equivalent forward the passes can fuse. ``moe_fusion.compile`` checks each
on the model's first call, which runs the model once, eagerly and as written (its output is that
call's result, its side effects happen once: a KV cache is appended to once): the swapped forward
must give the original's output on the inputs the module received, or it is dropped. The compiled
calls that follow run with the kept forwards installed, and only they: between calls the user's
modules are as they were (they save, load and switch implementations as before). The report names
the route of every candidate module, fused or refused with the reason.

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

import contextlib
import os
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

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
    graph (None: it traces whole), None for a route whose forwards always trace whole;
    ``untraceable(module)``: why the module's own forward, when it is not swapped, cannot be traced
    with data-dependent counts captured (None: it can), None for a route that never knows."""

    name: str
    candidate: Callable[[torch.nn.Module], Optional[str]]
    swap: Callable[[torch.nn.Module], Callable[[], None]]
    agree: Optional[Callable[[torch.nn.Module, bool], bool]] = None
    graph_break: Optional[Callable[[torch.nn.Module], Optional[str]]] = None
    untraceable: Optional[Callable[[torch.nn.Module], Optional[str]]] = None


def _hf_grouped_experts_forward() -> Optional[Callable[..., Any]]:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return None
    return ALL_EXPERTS_FUNCTIONS.get("grouped_mm")


_HF_EXPERTS_DECORATOR_FILE = os.path.join("transformers", "integrations", "moe.py")


def _hf_experts_candidate(module: torch.nn.Module) -> Optional[str]:
    if not type(module).__module__.startswith("transformers."):
        return None
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
    # Only experts modules: their class forward is the one ``use_experts_implementation`` wraps it in
    # (attention and whole models share the config, and other decorators wrap their forwards).
    # (``functools.wraps`` gives the wrapper the wrapped forward's names: its code keeps its file.)
    code = getattr(type(module).forward, "__code__", None)
    dispatching = (code is not None and code.co_filename.endswith(_HF_EXPERTS_DECORATOR_FILE)
                   and "forward" not in vars(module))
    if implementation != "eager" or not dispatching or _hf_grouped_experts_forward() is None:
        return None
    return f"{type(module).__name__} with eager experts -> transformers' grouped_mm experts"


def _hf_experts_swap(module: torch.nn.Module) -> Callable[[], None]:
    module.forward = types.MethodType(_hf_grouped_experts_forward(), module)
    return lambda: delattr(module, "forward")


ROUTES: tuple[ModuleRoute, ...] = (
    ModuleRoute("hf_experts", _hf_experts_candidate, _hf_experts_swap),
    ModuleRoute("megatron_moe", megatron_route.candidate, megatron_route.swap, megatron_route.agree,
                megatron_route.graph_break, megatron_route.untraceable),
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


@dataclass
class Routed:
    """What a model's first call settled: ``forwards``, the checked ``(module, swapped forward, the
    module's instance forward it replaces or _MISSING)`` its compiled calls run with (``installed``);
    ``output``, that call's result when it ran the model (``ran``: a route applied);
    ``untraceable``, why a module left with its own forward cannot be traced with data-dependent
    counts captured (``ModuleRoute.untraceable``), or None."""

    forwards: list[tuple[torch.nn.Module, Callable[..., Any], Any]]
    ran: bool = False
    output: Any = None
    untraceable: Optional[str] = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The swapped forwards in place of the modules' own, for one compiled call; not where the
        module's forward is no longer the one the swap was checked against (the user set another)."""
        swaps = [(module, forward, original) for module, forward, original in self.forwards
                 if vars(module).get("forward", _MISSING) is original]
        for module, forward, _ in swaps:
            module.forward = forward
        try:
            yield
        finally:
            for module, _, original in swaps:
                if original is _MISSING:
                    del module.forward
                else:
                    module.forward = original


_MISSING = object()


def apply_checked(model: torch.nn.Module, args: tuple, kwargs: dict, report: Optional[FusionReport],
                  fullgraph: bool = False) -> Routed:
    """The first call ``model(*args, **kwargs)``: when a route applies, run it eagerly (with the
    caller's grad mode and random draws) and keep every candidate's swapped forward that equals the
    module's own on the inputs the module received there (checked without gradients, replaying the
    module's call from the CPU generator state it started with, so a module drawing random numbers
    is compared on the same draws; the generators are left as the model's run left them).

    Raises ``ValueError`` with ``fullgraph`` when a candidate's swapped forward would leave part of
    the module outside the graph (on every process sharing it: the candidates are settled first)."""
    found, refused = _scan(model, settle=True)
    for path, route, why in refused:
        _record(report, False, path, f"{route.name}: not routed: {why}")
    if fullgraph:
        _refuse_graph_breaks(found)
    if not found:
        return Routed([], untraceable=_untraceable(model, []))
    calls: dict[str, _Call] = {}
    hooks = [hook for path, module, _, _ in found for hook in (
        module.register_forward_pre_hook(_input_recorder(calls, path), with_kwargs=True),
        module.register_forward_hook(_output_recorder(calls, path)))]
    try:
        output = model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.random.fork_rng():
        forwards = _check_swaps(report, found, calls)
    return Routed(forwards, True, output, _untraceable(model, forwards))


def _untraceable(model: torch.nn.Module, forwards: list[tuple[torch.nn.Module, Callable[..., Any], Any]]
                 ) -> Optional[str]:
    """The first reason a module of ``model`` left with its own forward gives for not tracing with
    data-dependent counts captured (``ModuleRoute.untraceable``), or None."""
    swapped = {id(module) for module, _, _ in forwards}
    for path, module in model.named_modules():
        for route in ROUTES:
            why = None if id(module) in swapped or route.untraceable is None else route.untraceable(module)
            if why is not None:
                return f"{path or type(model).__name__}: {why}"
    return None


def _refuse_graph_breaks(found: list[tuple[str, torch.nn.Module, ModuleRoute, str]]) -> None:
    """Raise when a candidate's swapped forward breaks the graph ``fullgraph=True`` asks for. Not a
    refusal: the module's original forward does not trace whole either (that is why it has a route),
    and it would fail inside the library's code, on some ranks only where its graph breaks differ."""
    for path, module, route, what in found:
        reason = route.graph_break(module) if route.graph_break is not None else None
        if reason is not None:
            raise ValueError(f"moe_fusion.compile: fullgraph=True asks for one graph, but the {route.name} route of "
                             f"{path} {reason}; compile with fullgraph=False to fuse the rest")


def _check_swaps(report: Optional[FusionReport], found: list[tuple[str, torch.nn.Module, ModuleRoute, str]],
                 calls: dict[str, _Call]) -> list[tuple[torch.nn.Module, Callable[..., Any], Any]]:
    """``Routed.forwards`` of each candidate whose swapped forward gives the module's recorded
    first-call output on its recorded inputs; each module is left with its own forward."""
    kept = []
    for path, module, route, what in found:
        call = calls.get(path)
        if call is None:
            _record(report, False, path, f"{route.name}: {what}: not called on the first call, not swapped")
            continue
        original = vars(module).get("forward", _MISSING)
        undo = route.swap(module)
        forward = vars(module)["forward"]
        torch.set_rng_state(call.rng_state)
        try:
            with torch.no_grad():
                got = module(*call.args, **call.kwargs)
            difference = _difference(got, call.output)
        except Exception as error:      # noqa: BLE001  (reported, and the swap dropped)
            difference = f"raised {type(error).__name__}: {error}"
        finally:
            undo()
        if route.agree is not None and not route.agree(module, difference is None) and difference is None:
            difference = "equal here, but not on another process sharing the module"
        if difference is None:
            kept.append((module, forward, original))
            _record(report, True, path, f"{route.name}: {what} (module route, equal on the first call)")
        else:
            _record(report, False, path, f"{route.name}: {what}: the swapped forward differs from the original on "
                                         f"the first call ({difference}); not swapped")
    return kept


@dataclass
class _Call:
    """A module's first call: its inputs before it ran (it may change them in place), the CPU
    generator's state as it began, and its output."""

    args: tuple
    kwargs: dict
    rng_state: torch.Tensor
    output: Any = None


def _clone(value: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


def _input_recorder(calls: dict[str, _Call], path: str) -> Callable[..., None]:
    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if path not in calls:   # the first call of the module (a module may run more than once)
            calls[path] = _Call(_clone(args), _clone(kwargs), torch.get_rng_state())
    return record


def _output_recorder(calls: dict[str, _Call], path: str) -> Callable[..., None]:
    def record(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if calls[path].output is None:
            calls[path].output = _clone(output)
    return record


def _difference(got: Any, want: Any) -> Optional[str]:
    """Why ``got`` is not ``want`` (structure, shapes, values beyond the dtype's tolerances relative to
    the output's finite scale; NaN and infinities must stand where they stand in ``want``), or None."""
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
        g, w = g.float(), w.float()
        finite = w.isfinite()
        # A NaN in the input (a warm-up batch of torch.empty, say) is the original's output too.
        if not torch.equal(g.isnan(), w.isnan()) or not torch.equal(g[w.isinf()], w[w.isinf()]):
            return "NaN or infinities in other elements"
        g, w = g[finite], w[finite]
        scale = w.abs().max().item() if w.numel() else 0.0
        error = (g - w).abs().max().item() if w.numel() else 0.0
        if not error <= atol + rtol * scale:
            return f"max difference {error:.3g} at output scale {scale:.3g}"
    return None


def _record(report: Optional[FusionReport], fused: bool, where: str, detail: str) -> None:
    counters["moe_fusion"][f"{'fused' if fused else 'refused'}_{PATTERN}"] += 1
    if report is not None:
        report.events.append(FusionEvent(PATTERN, fused, where, detail))
