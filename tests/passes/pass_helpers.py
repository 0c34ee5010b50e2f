"""Shared by the pass tests: post-grad-like graphs from ``make_fx`` (inductor's decompositions, fake
tensors, so every node has ``meta["val"]``), running passes on them, counting ops."""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from moe_fusion.passes import FusionReport, run_fusion_passes


def trace(fn: Callable[..., Any], *args: Any) -> fx.GraphModule:
    """The graph inductor's post-grad passes would see for ``fn(*args)`` (static shapes; dead
    nodes of decompositions removed, as in AOT graphs)."""
    gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def fuse(fn: Callable[..., Any], *args: Any, passes: list[str],
         target: str = "portable") -> tuple[fx.GraphModule, FusionReport]:
    gm = trace(fn, *args)
    report = run_fusion_passes(gm.graph, target=target, passes=passes)
    gm.recompile()
    return gm, report


def calls(gm: fx.GraphModule, *targets: Any) -> list[fx.Node]:
    """Nodes calling any of ``targets`` (OpOverloadPackets or OpOverloads)."""
    def hit(node: fx.Node) -> bool:
        return node.op == "call_function" and any(
            node.target is t or getattr(node.target, "overloadpacket", None) is t for t in targets)
    return [n for n in gm.graph.nodes if hit(n)]


def refusals(report: FusionReport, pattern: str) -> list[str]:
    return [e.detail for e in report.refused(pattern)]
