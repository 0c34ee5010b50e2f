"""``moe_fusion.torchair_backend()``: torchair's NPU backend with moe_fusion's fusion passes.

torchair compiles a dynamo graph with AOT autograd (its own decompositions, which turn
``_c10d_functional.all_to_all_single`` into ``npu_define.all_to_all_single_npu``) and then, on the
forward/inference graph it is about to convert to GE, calls
``CompilerConfig.post_grad_custom_pre_pass(gm, example_inputs, config)`` (``npu_fx_compiler.
_optimize_fx``). The fusion passes run there, with torchair's collective forms recognized
(``moe_fusion.passes.torchair_collectives``), and the fused ops reach GE through the converters
``register_converters()`` installs.

Group names: the passes name groups by their c10d names. GE's communication ops need HCCL
communicator names instead, so after fusion every ``group_ep``/``group_tp`` argument naming a
c10d group with an HCCL backend becomes that group's HCCL communicator name, as torchair does for
its own collectives (``hcom_utils``). Other groups (the CPU fake process group of the tests) keep
their c10d names.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from ..groups import registered_group
from ..passes import FusionReport, MoeFusionGraphPass, run_fusion_passes
from ..passes.pipeline import AutogradRoute, fuse_before_autograd, needs_autograd
from ..passes import torchair_collectives  # noqa: F401  (adds torchair's collective forms to the recognizers)
from . import importable_torchair, register_converters

GROUP_ARGUMENTS = ("group_ep", "group_tp")
aten = torch.ops.aten
# Allocations that read only the size, dtype and device of their tensor argument, and the factory
# (with its fill value, None for uninitialized) each becomes when that size is static.
LIKE_ALLOCATIONS = {aten.empty_like.default: None, aten.new_empty.default: None,
                    aten.new_empty_strided.default: None, aten.zeros_like.default: 0, aten.ones_like.default: 1}


def detach_allocations(graph: fx.Graph) -> None:
    """Replace ``empty_like(t)`` / ``t.new_empty(...)`` / ``zeros_like(t)`` / ``ones_like(t)`` of a
    contiguous result by ``empty`` / ``full`` of its static size, dtype and device (what torchair
    converts: not ``empty_strided``).

    ``dist.all_to_all_single(torch.empty_like(x), x)`` allocates its out= buffer from ``x``, and MoE
    code sums expert outputs into ``torch.zeros_like(x)``: inductor's decompositions make those
    allocations independent of ``x``, torchair's keep them users of ``x``, which the passes would
    count as a second use of a value they replace. Only static sizes are rewritten.

    Before / after::

        buffer = empty_like(x)                      buffer = empty([E, c, h], dtype=bf16, device=cpu)
        out = all_to_all_single_npu(x, ...)         out = all_to_all_single_npu(x, ...)
    """
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in LIKE_ALLOCATIONS:
            continue
        value = node.meta.get("val")
        static = isinstance(value, torch.Tensor) and all(isinstance(d, int) for d in value.shape)
        if not static or not value.is_contiguous():
            continue
        fill = LIKE_ALLOCATIONS[node.target]
        placement = {"dtype": value.dtype, "device": value.device}
        with graph.inserting_before(node):
            if fill is None:
                factory = graph.call_function(aten.empty.memory_format, (list(value.shape),), placement)
            else:
                factory = graph.call_function(aten.full.default, (list(value.shape), fill), placement)
        factory.meta.update(node.meta)
        node.replace_all_uses_with(factory)
        graph.erase_node(node)


def hccl_group_name(group_name: str) -> str:
    """The HCCL communicator name of the c10d group ``group_name`` when it runs on HCCL, else
    ``group_name`` unchanged (unknown names included: they are not c10d groups)."""
    import torch.distributed as dist

    group = registered_group(group_name)
    if group is None:   # not a c10d group here: the name is already what the op gets
        return group_name
    if dist.get_backend(group) != "hccl":
        return group_name
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(dist.get_rank(), init_comm=True)


def use_hccl_group_names(graph: fx.Graph) -> None:
    """Rename the groups of every moe_fusion op in ``graph`` to HCCL names (``hccl_group_name``)."""
    for node in graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith("moe_fusion."):
            continue
        names = [a.name for a in node.target._schema.arguments]
        args = list(node.args)
        for i, name in enumerate(names[:len(args)]):
            if name in GROUP_ARGUMENTS and isinstance(args[i], str):
                args[i] = hccl_group_name(args[i])
        node.args = tuple(args)
        node.kwargs = {k: hccl_group_name(v) if k in GROUP_ARGUMENTS and isinstance(v, str) else v
                       for k, v in node.kwargs.items()}


def fusion_pre_pass(target: str = "A3", passes: Optional[Sequence[str]] = None,
                    report: Optional[FusionReport] = None,
                    then: Optional[Callable[..., Any]] = None) -> Callable[[fx.GraphModule, list, Any], None]:
    """The fusion passes as a torchair ``post_grad_custom_pre_pass``, ``fn(gm, example_inputs,
    config)``; ``then`` is a pre-pass of the user's to run afterwards (kept as ``pre_pass.user_pass``)."""
    def pre_pass(gm: fx.GraphModule, example_inputs: list, config: Any) -> None:
        detach_allocations(gm.graph)
        run_fusion_passes(gm.graph, target=target, passes=passes, report=report)
        use_hccl_group_names(gm.graph)
        gm.recompile()
        if then is not None:
            then(gm, example_inputs, config)

    pre_pass.user_pass = then
    return pre_pass


# Backward ops of the fused ops' formulas that GE has no operator for.
_BACKWARD_WITHOUT_GE = {
    "moe_fusion::npu_ffn_grouped": "its backward runs moe_fusion::_ffn_grouped_backward, which has no GE operator",
}


def _untrainable_on_ge(op: Any) -> Optional[str]:
    reason = _BACKWARD_WITHOUT_GE.get(op.name())
    return None if reason is None else f"{op.name()}: {reason}"


# Training graphs for GE: no decompositions beyond ATen's composites (inductor's would split ops GE
# converts whole, _softmax into amax...; torchair's own turn collectives into npu_define ops, which
# have no autograd formula, so its AOT applies them afterwards, to the fused graph).
GE_AUTOGRAD_ROUTE = AutogradRoute(decompositions={}, prepare=detach_allocations, untrainable=_untrainable_on_ge)


def torchair_backend(config: Any = None, target: str = "A3", *, passes: Optional[Sequence[str]] = None,
                     report: Optional[FusionReport] = None) -> Callable[..., Any]:
    """A ``torch.compile`` backend: ``torchair.get_npu_backend(compiler_config=config)`` with the
    fusion passes installed as ``config.post_grad_custom_pre_pass`` (and run before torchair's AOT
    autograd on a graph it will differentiate) and the GE converters of the moe_fusion ops registered.

    Args:
        config: a ``torchair.CompilerConfig`` (default: a new one). Its pre-pass is set in place;
            a pre-pass already set there runs after the fusion passes.
        target: ``"A3"`` (default), ``"A2"`` or ``"portable"``: whose limits a rewrite must respect.
        passes: names of the passes to run (default: all, see ``moe_fusion.passes.PASSES``).
        report: a ``FusionReport`` to fill with what was fused or refused, and why.

    Raises:
        RuntimeError: torchair is not importable (it comes with torch_npu; without CANN see
            ``moe_fusion.ge_plugin.torchair_env.import_torchair``).
    """
    torchair = importable_torchair()
    if torchair is None or not register_converters():
        raise RuntimeError("moe_fusion.torchair_backend needs torchair: install torch_npu (on a machine without "
                           "CANN, moe_fusion.ge_plugin.torchair_env.import_torchair() provides its Python layer)")
    config = config if config is not None else torchair.CompilerConfig()
    current = config.post_grad_custom_pre_pass.value
    user_pass = getattr(current, "user_pass", current)   # a config passed here before keeps one fusion pre-pass
    config.post_grad_custom_pre_pass = fusion_pre_pass(target, passes, report, then=user_pass)
    npu_backend = torchair.get_npu_backend(compiler_config=config)
    # GE keeps the fused nodes and compiles them to CANN's kernels: no cost gate.
    graph_pass = MoeFusionGraphPass(target, passes, report, lower=False, cost_gate=False)

    def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Any:
        # A graph torchair's AOT will differentiate is fused first, as moe_fusion.backend() does.
        if needs_autograd(example_inputs):
            gm = fuse_before_autograd(gm, example_inputs, graph_pass, GE_AUTOGRAD_ROUTE)
        return npu_backend(gm, example_inputs)

    return compile_graph
