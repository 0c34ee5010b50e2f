"""The pass pipeline and its adapters: inductor (a ``CustomGraphPass`` for
``post_grad_custom_pre_pass``), ``moe_fusion.backend()`` for ``torch.compile``.

Passes run in a fixed order: the widest patterns first, so a dispatch/FFN/combine block is fused
as a whole before the FFN pass could take its expert FFNs alone.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Optional, Sequence

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..targets import get_target, target as target_scope
from .context import FusionReport, PassContext, count_ops

PassFn = Callable[[fx.Graph, PassContext], None]

# name -> pass, in pipeline order. Pattern modules are listed in passes/__init__.py.
PASSES: dict[str, PassFn] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def add(fn: PassFn) -> PassFn:
        PASSES[name] = fn
        return fn

    return add


def run_fusion_passes(graph: fx.Graph, *, target: str = "portable", passes: Optional[Sequence[str]] = None,
                      report: Optional[FusionReport] = None) -> FusionReport:
    """Run the named passes (default: all, in pipeline order) on ``graph`` in place."""
    names = list(PASSES) if passes is None else list(passes)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"moe_fusion: unknown passes {unknown}; known: {list(PASSES)}")
    report = report if report is not None else FusionReport()
    ctx = PassContext(target, report)
    report.ops_before.update(count_ops(graph))
    with target_scope(target):   # fused ops validate against the compile target's limits
        for name in (n for n in PASSES if n in names):
            PASSES[name](graph, ctx)
    graph.lint()
    report.ops_after.update(count_ops(graph))
    return report


class MoeFusionGraphPass(CustomGraphPass):
    """The pipeline as an inductor ``post_grad_custom_pre_pass``::

        torch._inductor.config.post_grad_custom_pre_pass = MoeFusionGraphPass(target="A3")
    """

    def __init__(self, target: Optional[str] = None, passes: Optional[Sequence[str]] = None,
                 report: Optional[FusionReport] = None) -> None:
        self.target = target or get_target()
        self.passes = None if passes is None else tuple(passes)
        self.report = report

    def __call__(self, graph: fx.Graph) -> None:
        run_fusion_passes(graph, target=self.target, passes=self.passes, report=self.report)

    def uuid(self) -> Optional[Any]:
        # A report must see every graph, so a run that collects one bypasses the FX graph cache.
        if self.report is not None:
            return None
        sources = sorted(str(p) for p in pathlib.Path(__file__).parent.glob("*.py"))
        return (get_hash_for_files(tuple(sources)).hex(), self.target, self.passes)


def backend(target: Optional[str] = None, passes: Optional[Sequence[str]] = None,
            report: Optional[FusionReport] = None, compiler: str = "inductor") -> Callable[..., Any]:
    """A ``torch.compile`` backend that runs the fusion passes on the post-grad graph.

    Args:
        target: ``"portable"``, ``"A2"`` or ``"A3"``: whose limits a rewrite must respect
            (default: the target in force).
        passes: names of the passes to run (default: all, see ``moe_fusion.passes.PASSES``).
        report: a ``FusionReport`` to fill (see ``moe_fusion.explain``).
        compiler: ``"inductor"`` (code generation) or ``"eager"`` (run the fused ATen graph as
            is; compiles in a fraction of the time, for tests and reports).
    """
    graph_pass = MoeFusionGraphPass(target, passes, report)
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def compile_inductor(gm: fx.GraphModule, example_inputs: list) -> Any:
            return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": graph_pass})

        return compile_inductor
    if compiler == "eager":
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func
        from torch._inductor.decomposition import select_decomp_table

        def run_passes(gm: fx.GraphModule, example_inputs: list) -> Any:
            graph_pass(gm.graph)
            gm.recompile()
            return make_boxed_func(gm.forward)

        return aot_autograd(fw_compiler=run_passes, decompositions=select_decomp_table())
    raise ValueError(f"moe_fusion.backend: compiler must be 'inductor' or 'eager', got {compiler!r}")
