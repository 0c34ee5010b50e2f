"""The pass pipeline and its adapters: inductor (a ``CustomGraphPass`` for
``post_grad_custom_pre_pass``), ``moe_fusion.backend()`` for ``torch.compile``.

Where the passes run. Inference graphs are fused after AOT autograd, on inductor's post-grad graph.
A training graph cannot be fused there: AOT autograd has already differentiated the unfused ops,
and the forward graph returns their intermediates to the backward (a fused op does not expose
them). So when the compiled graph will be differentiated (grad mode on, an input requiring grad),
``fuse_before_autograd`` first traces dynamo's graph into a functional ATen graph with inductor's
decompositions (the forms the passes read), fuses it, and hands the fused graph to AOT autograd,
which differentiates each fused op with its formula (``moe_fusion.autograd``) and partitions the
joint graph as usual. A rewrite whose fused op has no formula, or whose backward the backend cannot
compile (``AutogradRoute.untrainable``: GE has no operator for ``npu_ffn_grouped``'s backward), is
refused there with the reason; the rest of the graph still fuses. The post-grad pass then still
runs on the forward and backward graphs (the formulas' own chains, e.g. the BMM pair's, fuse there).

Every pass is a ``find_<pattern>(graph, ctx) -> list[Match]`` of a pattern module (the protocol is
in ``context.py``); ``PIPELINE`` lists them in the order they run, the widest patterns first, so a
dispatch/FFN/combine block is fused as a whole before the FFN pass could take its expert FFNs
alone. ``apply_pass`` drives one: each match is rewritten (``replace_with``) and its dead nodes
erased (``erase``), or refused with the reason; two matches of one pass never share a node.
Passes run inside inductor's ``GraphTransformObserver`` (``pass.moe_fusion.<name>`` timings,
``TORCHINDUCTOR_DISABLED_PASSES``-style disabling through ``inductor_config.disabled_passes``) and
count into ``torch._dynamo.utils.counters["moe_fusion"]``.
"""
from __future__ import annotations

import contextvars
import copy
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._guards import detect_fake_mode
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.pattern_matcher import stable_topological_sort
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.graph_transform_observer import GraphTransformObserver

from ..targets import get_target, target as target_scope
from . import (agreement, allgather_ep, alltoall_allgather_bmm, bmm_reducescatter_alltoall, capacity_a2a, cost,
               ffn, re_routing, split_a2a)
from .autograd_collectives import functional_all_to_alls
from .lowering import lower_local_ops
from .context import (FusionEvent, FusionReport, Match, PassContext, Refusal, TrainingCheck, count_ops,
                      lowered, scoped, training)

PACKAGE = pathlib.Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FusionPass:
    """One pattern family: its report name, its ``find_<pattern>``, and whether its rewrites replace
    collectives (then every rank of their groups must make them too: ``agreement``)."""

    name: str
    find: Callable[[fx.Graph, Optional[PassContext]], Sequence[Match]]
    collective: bool = False


PIPELINE: tuple[FusionPass, ...] = (
    # Whole expert-parallel MoE blocks first: they consume their expert FFNs.
    FusionPass(allgather_ep.PATTERN, allgather_ep.find_moe_allgather_ep, collective=True),
    FusionPass(capacity_a2a.PATTERN, capacity_a2a.find_moe_capacity_a2a, collective=True),
    FusionPass(split_a2a.PATTERN, split_a2a.find_moe_split_a2a, collective=True),
    FusionPass(alltoall_allgather_bmm.PATTERN, alltoall_allgather_bmm.find_alltoall_allgather_bmm, collective=True),
    FusionPass(bmm_reducescatter_alltoall.PATTERN, bmm_reducescatter_alltoall.find_bmm_reducescatter_alltoall,
               collective=True),
    # After every pass that may consume matmul chains as a whole.
    FusionPass(ffn.PATTERN, ffn.find_ffn),
    # Independent of the others.
    FusionPass(re_routing.PATTERN, re_routing.find_re_routing),
)
PASSES: dict[str, FusionPass] = {p.name: p for p in PIPELINE}
COLLECTIVE_PASSES = frozenset(p.name for p in PIPELINE if p.collective)
# The report's pattern name for a graph whose ranks did not agree on their collective rewrites.
AGREEMENT = "rank_agreement"
# The graph ``backend()`` has inductor compile (None elsewhere): its FX graph cache key depends on it.
_compiling: contextvars.ContextVar[Optional[fx.Graph]] = contextvars.ContextVar("moe_fusion_compiling", default=None)


def apply_pass(graph: fx.Graph, ctx: PassContext, fusion_pass: FusionPass) -> int:
    """Find and rewrite every match of ``fusion_pass`` in ``graph``; returns how many fused."""
    consumed: set[fx.Node] = set()
    fused = 0
    for match in fusion_pass.find(graph, ctx):
        if any(lowered(node) for node in match.nodes):
            continue        # a fused op's own lowering (context.lowered)
        if match.nodes <= consumed:
            continue        # part of a larger match fused already (an expert of a fused group)
        if match.nodes & consumed:
            ctx.refuse(fusion_pass.name, match.anchor, "it shares nodes with a match fused already (chained "
                                                      "patterns fuse the first one only)")
            continue
        try:
            node = match.replace_with(graph)
        except Refusal as refusal:
            ctx.refuse(fusion_pass.name, match.anchor, str(refusal))
            continue
        match.erase()
        consumed |= match.nodes
        fused += 1
        ctx.record_fused(fusion_pass.name, node, match.describe())
    if fused:
        stable_topological_sort(graph)   # an operand built for the fused op may sit after one of its users
    return fused


def run_fusion_passes(graph: fx.Graph, *, target: str = "portable", passes: Optional[Sequence[str]] = None,
                      report: Optional[FusionReport] = None) -> FusionReport:
    """Run the named passes (default: all, in pipeline order) on ``graph`` in place. In a multi-rank
    process, rewrites of collectives stand only if every rank of the job made the same
    (``agreement``); otherwise they are all undone, on every rank, and the report says why."""
    names = [p.name for p in PIPELINE] if passes is None else list(passes)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"moe_fusion: unknown passes {unknown}; known: {list(PASSES)}")
    report = report if report is not None else FusionReport()
    report.ops_before.update(count_ops(graph))
    outcome = FusionReport()
    if holds_round(graph, names):
        saved, before = agreement.snapshot(graph), agreement.collective_calls(graph)
        _run_passes(graph, target, names, outcome)
        verdict = agreement.agree(before, agreement.collective_calls(graph))
        if not verdict.fuse:
            outcome = _undo_collective_rewrites(graph, saved, target, names, outcome, verdict.reason)
    else:
        _run_passes(graph, target, names, outcome)
    for event in outcome.events:
        counters["moe_fusion"][f"{'fused' if event.fused else 'refused'}_{event.pattern}"] += 1
    report.events += outcome.events
    graph.lint()
    report.ops_after.update(count_ops(graph))
    return report


def _undo_collective_rewrites(graph: fx.Graph, saved: fx.Graph, target: str, names: Sequence[str],
                              first: FusionReport, reason: str) -> FusionReport:
    """``graph`` restored from ``saved`` and fused by the local passes only; the report of that, the
    first run's collective refusals, its collective fusions as undone, and the agreement's ``reason``."""
    agreement.restore(graph, saved)
    outcome = FusionReport()
    _run_passes(graph, target, [n for n in names if n not in COLLECTIVE_PASSES], outcome)
    for event in first.events:
        if event.pattern in COLLECTIVE_PASSES:
            outcome.events.append(event if not event.fused else FusionEvent(
                event.pattern, False, event.where,
                f"undone by the rank agreement: {reason} (this rank had fused: {event.detail})"))
    outcome.events.append(FusionEvent(AGREEMENT, False, "graph", reason))
    return outcome


def holds_round(graph: Optional[fx.Graph], names: Optional[Sequence[str]]) -> bool:
    """The passes ``names`` (None: all) run on ``graph`` (None: not known) end with a rank agreement
    round (``agreement``)."""
    return not COLLECTIVE_PASSES.isdisjoint(PASSES if names is None else names) and agreement.passes_exchange(graph)


def _run_passes(graph: fx.Graph, target: str, names: Sequence[str], report: FusionReport) -> None:
    ctx = PassContext(target, report)
    with target_scope(target):   # fused ops validate against the compile target's limits
        for fusion_pass in (p for p in PIPELINE if p.name in names):
            if graph.owning_module is not None:
                GraphTransformObserver(graph.owning_module, fusion_pass.name, subsystem="moe_fusion").apply_graph_pass(
                    lambda g: apply_pass(g, ctx, fusion_pass))
            else:
                apply_pass(graph, ctx, fusion_pass)


def compile_context() -> tuple:
    """What a fused graph bakes in besides its input graph: this process's rank in every process
    group (a rewrite writes ``ep_rank_id``) and each group's members. Two processes whose graphs
    may differ must not share an FX graph cache entry."""
    if not dist.is_available() or not dist.is_initialized():
        return ()
    from torch.distributed.distributed_c10d import _world

    # A rank outside a group created with ``new_group`` holds it as ``GroupMember.NON_GROUP_MEMBER``
    # (an int, not a group): not one of this process's groups.
    groups = sorted((group.group_name, tuple(sorted(ranks))) for group, ranks in _world.pg_group_ranks.items()
                    if isinstance(group, dist.ProcessGroup))
    return dist.get_rank(), dist.get_world_size(), tuple(groups)


def source_hash() -> str:
    """Hash of every module a fused graph depends on: the passes, the op protos (their limits
    decide refusals), the targets, and the kernels and formulas the lowering inlines."""
    files = sorted(str(p) for p in (*PACKAGE.glob("passes/*.py"), *PACKAGE.glob("op_protos/*.py"),
                                    *PACKAGE.glob("kernels/*.py"), *PACKAGE.glob("autograd/*.py"),
                                    PACKAGE / "targets.py"))
    return get_hash_for_files(tuple(files)).hex()


class MoeFusionGraphPass(CustomGraphPass):
    """The pipeline as an inductor ``post_grad_custom_pre_pass``::

        torch._inductor.config.post_grad_custom_pre_pass = MoeFusionGraphPass(target="A3")

    With ``lower`` (the default) the fused local ops off an NPU are then expanded into their
    kernels' ATen ops for inductor to compile (``lowering``); the report still counts them fused.
    With ``cost_gate`` (the default) rewrites known to run slower here than the unfused code are
    refused (``cost``): GE, which compiles the fused ops to CANN's kernels, passes False.
    """

    def __init__(self, target: Optional[str] = None, passes: Optional[Sequence[str]] = None,
                 report: Optional[FusionReport] = None, lower: bool = True, cost_gate: bool = True) -> None:
        self.target = target or get_target()
        self.passes = None if passes is None else tuple(passes)
        self.report = report
        self.lower = lower
        self.cost_gate = cost_gate

    def __call__(self, graph: fx.Graph) -> None:
        with cost.gated(self.cost_gate):
            run_fusion_passes(graph, target=self.target, passes=self.passes, report=self.report)
        if self.lower:
            lower_local_ops(graph)

    def uuid(self) -> Optional[Any]:
        """The FX graph cache key: sources, target, passes, this process's groups and ranks, lowering,
        and the cost gate's view of this machine."""
        # A report must see every graph, so a run that collects one bypasses the FX graph cache; so
        # does a graph with collectives in a multi-rank process (or one not known): a rank served
        # from the cache would skip the agreement round its peers wait in.
        if self.report is not None or holds_round(_compiling.get(), self.passes):
            return None
        gate = cost.cache_key() if self.cost_gate else None
        return source_hash(), self.target, self.passes, compile_context(), self.lower, gate


class LowerLocalOps(CustomGraphPass):
    """``lowering.lower_local_ops`` as inductor's ``joint_custom_pre_pass``: a training graph's fused
    local ops and their formulas' backward ops become their kernels' ATen ops on the joint graph,
    before the partitioner's CSE merges the backward's recomputation of the hidden activations with
    the forward's."""

    def __call__(self, graph: fx.Graph) -> None:
        lower_local_ops(graph)

    def uuid(self) -> Optional[Any]:
        return source_hash()


def needs_autograd(example_inputs: Sequence[Any]) -> bool:
    """The compiled graph will be differentiated: grad mode is on and an input requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


@dataclass(frozen=True)
class AutogradRoute:
    """How a backend has its training graphs fused before AOT autograd (``fuse_before_autograd``).

    Attributes:
        decompositions: applied while tracing dynamo's graph (None: inductor's, the forms the
            inductor backend's graphs hold; torchair passes ATen's composites only, since GE
            converts ``_softmax`` whole and has no ``amax``).
        prepare: run on the traced graph before the passes, as the backend prepares its post-AOT
            graphs (torchair: ``detach_allocations``).
        untrainable: fused op -> why this backend cannot compile its backward (None: it can);
            such a rewrite is refused, the rest of the graph still fuses.
    """

    decompositions: Optional[dict] = None
    prepare: Optional[Callable[[fx.Graph], None]] = None
    untrainable: Optional[TrainingCheck] = None


INDUCTOR_ROUTE = AutogradRoute()


def fuse_before_autograd(gm: fx.GraphModule, example_inputs: Sequence[Any], graph_pass: MoeFusionGraphPass,
                         route: AutogradRoute = INDUCTOR_ROUTE) -> fx.GraphModule:
    """Dynamo's graph ``gm`` as a functional ATen graph, fused by ``graph_pass``: what AOT autograd
    should differentiate (see the module docstring). Traced on the fake values dynamo used for
    ``example_inputs``, as ``route`` says. A rewrite inserting an op without an autograd formula,
    or one whose backward the backend cannot compile, is refused with the reason. Returns ``gm``
    itself when nothing fused, and (saying why in the report) when the graph cannot be traced this
    way (functionalization does not handle every graph: custom autograd Functions, some in-place
    ops): those graphs train unfused, never wrongly."""
    report = graph_pass.report
    trial = FusionReport()
    rounds = agreement.rounds_held()

    def untrainable(op: Any) -> Optional[str]:
        if not isinstance(op, torch._ops.OpOverload) or op.namespace != "moe_fusion":
            return None
        if not _differentiable(op):
            return f"{op.name()} has no autograd formula"
        return None if route.untrainable is None else route.untrainable(op)

    try:
        # All-to-all autograd Functions: functionalization cannot trace them.
        decompositions = select_decomp_table() if route.decompositions is None else route.decompositions
        traced = _functional_aten_graph(functional_all_to_alls(gm), example_inputs, decompositions)
        if route.prepare is not None:
            route.prepare(traced.graph)
        with training(untrainable):
            MoeFusionGraphPass(graph_pass.target, graph_pass.passes, trial, lower=False,
                               cost_gate=graph_pass.cost_gate)(traced.graph)
    except Exception as error:  # noqa: BLE001 - any failure to trace means: leave the graph to AOT as it is
        reason = " ".join(str(error).split())[:300]
        _record(report, f"fused nothing before autograd: the graph does not trace as a functional ATen graph "
                        f"({type(error).__name__}: {reason})")
        if agreement.rounds_held() == rounds and holds_round(gm.graph, graph_pass.passes):
            # The peers that traced this graph wait in its round: abort it with them, and keep
            # this rank's later rounds in step with theirs.
            agreement.agree(agreement.collective_calls(gm.graph), agreement.UNFUSABLE)
        return gm
    if report is not None:
        report.events.extend(trial.events)
        report.ops_before.update(trial.ops_before)
        report.ops_after.update(trial.ops_after)
    if not trial.fused():
        return gm       # AOT autograd differentiates dynamo's graph as it would without moe_fusion
    _restore_differentiable_casts(traced.graph)
    traced.recompile()
    return traced


def _functional_aten_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], decompositions: dict) -> fx.GraphModule:
    """``gm`` traced into a functional ATen graph on ``example_inputs``' fakes. DTensor inputs used
    only through ``.to_local()`` (torchtitan's expert-parallel weights) are traced as their local
    tensors and the traced graph takes them back as DTensors through that same ``.to_local()``:
    functionalization does not trace tensor subclasses, and AOT autograd then sees the DTensor
    inputs dynamo gave it."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:   # called outside torch.compile: trace on fresh fakes
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode()
    local_gm, local_inputs = _to_local_inputs(gm, example_inputs)
    fakes = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in local_inputs]
    with fake_mode, torch.no_grad():
        traced = make_fx(torch.func.functionalize(local_gm, remove="mutations"),
                         decomposition_table=decompositions)(*fakes)
    traced.graph.eliminate_dead_code()   # decompositions leave unused casts, which would read as other uses
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for i in (i for i, t in enumerate(example_inputs) if t is not local_inputs[i]):
        with traced.graph.inserting_after(placeholders[i]):
            local = traced.graph.call_method("to_local", (placeholders[i],))
        local.meta["val"] = placeholders[i].meta.get("val")
        placeholders[i].replace_all_uses_with(local, delete_user_cb=lambda user, local=local: user is not local)
    traced.recompile()
    return traced


def _to_local_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list]:
    """``(gm', inputs')``: ``gm`` taking the local tensor of each DTensor input whose only uses are
    ``.to_local()``, and those inputs replaced by their local tensors (``gm`` itself when none is)."""
    from torch.distributed.tensor import DTensor

    graph = copy.deepcopy(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = list(example_inputs)
    for i, (t, p) in enumerate(zip(example_inputs, placeholders)):
        if isinstance(t, DTensor) and p.users and all(u.op == "call_method" and u.target == "to_local"
                                                      and len(u.args) == 1 and not u.kwargs for u in p.users):
            for use in list(p.users):
                use.replace_all_uses_with(p)
                graph.erase_node(use)
            inputs[i] = t._local_tensor     # the fake dynamo made for it: its sizes keep their sources
    if all(a is b for a, b in zip(inputs, example_inputs)):
        return gm, inputs
    return fx.GraphModule(gm, graph), inputs


def _restore_differentiable_casts(graph: fx.Graph) -> None:
    """Ops without an autograd formula that functionalization and inductor's decompositions leave,
    as the differentiable ops AOT autograd would have seen: ``prims.convert_element_type`` (the
    decomposition of ``_to_copy``) as ``aten._to_copy``; a same-shape ``aten.copy(dst, src)`` (an
    in-place ``dst.copy_(src)``, e.g. an out= collective's result handed over) as ``src`` cast to
    ``dst``'s dtype, whose gradient is ``copy_``'s."""
    for node in graph.find_nodes(op="call_function", target=torch.ops.prims.convert_element_type.default):
        node.target = torch.ops.aten._to_copy.default
        node.args, node.kwargs = node.args[:1], {"dtype": node.args[1]}
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.copy.default):
        dst, src = node.args[:2]
        if dst.meta["val"].shape == src.meta["val"].shape:
            node.target = torch.ops.aten._to_copy.default
            node.args, node.kwargs = (src,), {"dtype": dst.meta["val"].dtype}


def _record(report: Optional[FusionReport], detail: str) -> None:
    if report is not None:
        report.events.append(FusionEvent("training", False, "graph", detail))


def _differentiable(op: Any) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd")


def backend(target: Optional[str] = None, passes: Optional[Sequence[str]] = None,
            report: Optional[FusionReport] = None, compiler: str = "inductor",
            cost_gate: bool = True) -> Callable[..., Any]:
    """A ``torch.compile`` backend that runs the fusion passes: on the post-grad graph, and before
    AOT autograd when the graph will be differentiated (module docstring).

    Args:
        target: ``"portable"``, ``"A2"`` or ``"A3"``: whose limits a rewrite must respect
            (default: the target in force).
        passes: names of the passes to run (default: all, see ``moe_fusion.passes.PASSES``).
        report: a ``FusionReport`` to fill (see ``moe_fusion.explain``).
        compiler: ``"inductor"`` (code generation) or ``"eager"`` (run the fused ATen graph as
            is; compiles in a fraction of the time, for tests and reports).
        cost_gate: under inductor, refuse the rewrites known to run slower here than the
            unfused code (``passes.cost``); the ``eager`` compiler, which shows what fuses, never does.
    """
    graph_pass = MoeFusionGraphPass(target, passes, report, cost_gate=cost_gate and compiler == "inductor")
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Any:
            # A training graph's fused local ops (and their backward ops) are lowered on the joint graph.
            return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": graph_pass,
                                                                  "joint_custom_pre_pass": LowerLocalOps()})
    elif compiler == "eager":
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func

        def run_passes(gm: fx.GraphModule, example_inputs: list) -> Any:
            graph_pass(gm.graph)
            gm.recompile()
            return make_boxed_func(gm.forward)

        compile_graph = aot_autograd(fw_compiler=run_passes, decompositions=select_decomp_table())
    else:
        raise ValueError(f"moe_fusion.backend: compiler must be 'inductor' or 'eager', got {compiler!r}")

    def compile_fused(gm: fx.GraphModule, example_inputs: list) -> Any:
        if needs_autograd(example_inputs):
            gm = fuse_before_autograd(gm, example_inputs, graph_pass)
        with scoped(_compiling, gm.graph):
            return compile_graph(gm, example_inputs)

    return compile_fused
