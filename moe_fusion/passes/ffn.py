"""FFN fusion (pass ``ffn``): ``linear -> activation -> linear`` in a post-grad graph =>
``moe_fusion.npu_ffn`` (SPEC §5).

Single FFNs (plain and GLU) are read by ``ffn_forms`` (its docstring lists the forms, the
refusals and the low-precision argument). This pass adds the per-expert form:
``cat([ffn_e(x[s_e:s_{e+1}]) for e], 0)`` over adjacent static row segments, each FFN with its own
weights => one ``npu_ffn`` with ``expert_tokens`` and stacked weights. Refused: segments that
overlap or leave gaps, experts that differ in form, expert outputs used outside the concatenation.
A group refused at rewrite time leaves its members to be fused one by one.

Not seen: products that broadcast, chunks along rows, and 1-row matmuls with N, K <= 16, which
inductor decomposes into ``mul`` + ``sum`` on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx

from ._graph import erase_unused, fused_ops_or_refusal, insert_call, is_op, val
from .context import PassContext, Refusal, attempt
from .cost import refuse_slower_ffn
from .emit import ffn_operands
from .ffn_forms import FfnMatch, check_same_form, find_ffn_forms

aten = torch.ops.aten
PATTERN = "ffn"


@dataclass
class ExpertFfnMatch:
    """``cat([ffn_e(x[s_e:s_{e+1}]) for e], 0)``: per-expert FFNs over adjacent static row segments
    of one 2-D ``source`` ``(rows, K1)``; ``bounds`` are ``s_0 < ... <= s_E``."""

    experts: list[FfnMatch]
    source: fx.Node
    bounds: tuple[int, ...]
    cat: fx.Node

    @property
    def anchor(self) -> fx.Node:
        return self.cat

    @property
    def nodes(self) -> frozenset[fx.Node]:
        return frozenset().union(*(e.nodes | {e.x} for e in self.experts)) | {self.cat}

    @property
    def counts(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds, self.bounds[1:])]

    def replace_with(self, graph: fx.Graph) -> fx.Node:
        """One ``npu_ffn`` over every expert's rows.

        Before (2 experts over rows ``[0, 3)`` and ``[3, 8)`` of ``x`` ``(8, K1)``)::

            slice:   "f32[3, K1]" = aten.slice.Tensor(x, 0, 0, 3)
            mm, ...  = <FFN of expert 0 on slice>      -> mm_1: "f32[3, N2]"
            slice_1: "f32[5, K1]" = aten.slice.Tensor(x, 0, 3, 8)
            mm_2, ...= <FFN of expert 1 on slice_1>    -> mm_3: "f32[5, N2]"
            cat:     "f32[8, N2]" = aten.cat([mm_1, mm_3])

        After::

            <W1/W2 (and bias) stacks: ``W`` itself when the experts' weights are ``W[e]``, else
             cat of unsqueezed weights>
            npu_ffn: "f32[8, N2]" = moe_fusion.npu_ffn(x, stack, stack_1, act, expert_tokens=[3, 5],
                                                       inner_precise=0)
        """
        x = self.source
        refuse_slower_ffn(self.experts[0].dtype, val(x).device)
        with fused_ops_or_refusal(graph, "npu_ffn"):
            if self.bounds[0] != 0 or self.bounds[-1] != val(x).size(0):
                x = insert_call(graph, self.cat, aten.slice.Tensor, (x, 0, self.bounds[0], self.bounds[-1]))
            w1, w2, kwargs = ffn_operands(graph, self.cat, self.experts, stacked=True)
            fused = insert_call(graph, self.cat, torch.ops.moe_fusion.npu_ffn.default,
                                (x, w1, w2, self.experts[0].activation), {"expert_tokens": self.counts, **kwargs})
        self.cat.replace_all_uses_with(fused)
        return fused

    def erase(self) -> None:
        erase_unused(self.nodes)

    def describe(self) -> str:
        return f"npu_ffn over {len(self.experts)} experts, expert_tokens={self.counts}: {self.experts[0].describe()}"


Match = Union[FfnMatch, ExpertFfnMatch]


def _row_slice(node: fx.Node) -> Optional[tuple[fx.Node, int, int]]:
    """``(source, start, stop)`` when ``node`` is ``source[start:stop]`` with static bounds, clamped."""
    if not is_op(node, aten.slice.Tensor):
        return None
    source, dim, start, stop, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    rows = val(source).size(0) if len(val(source).shape) == 2 else None
    start, stop = 0 if start is None else start, rows if stop is None else stop
    if dim != 0 or step != 1 or not all(isinstance(v, int) for v in (rows, start, stop)):
        return None
    return source, *(min(max(v + rows if v < 0 else v, 0), rows) for v in (start, stop))


def _match_experts(cat: fx.Node, by_out: dict[fx.Node, FfnMatch]) -> Optional[ExpertFfnMatch]:
    """Per-expert FFNs concatenated along rows; raises Refusal for look-alikes."""
    tensors, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if len(tensors) < 2 or any(t not in by_out for t in tensors) or dim % 2 != 0:
        return None
    experts = [by_out[t] for t in tensors]
    slices = [_row_slice(e.x) for e in experts]
    if any(s is None for s in slices) or len({s[0] for s in slices}) != 1:
        raise Refusal("the expert FFNs do not read static row slices of one 2-D tensor")
    # npu_ffn's expert_tokens partition x into adjacent segments in expert order.
    for (_, _, stop), (_, start, _) in zip(slices, slices[1:]):
        if start != stop:
            raise Refusal(f"the expert row segments {[(a, b) for _, a, b in slices]} "
                          f"{'overlap' if start < stop else 'leave a gap'}; npu_ffn needs adjacent segments in order")
    check_same_form(experts)
    for e in experts:
        if len(e.out.users) != 1:
            raise Refusal(f"the output of expert FFN {e.out.name} is also used outside the concatenation")
    bounds = tuple(s[1] for s in slices) + (slices[-1][2],)
    return ExpertFfnMatch(experts, slices[0][0], bounds, cat)


def find_ffn(graph: fx.Graph, ctx: Optional[PassContext] = None) -> list[Match]:
    """Every FFN candidate, per-expert groups first, then each single FFN (group members
    included, for when their group is refused at rewrite time). Refusals go to ``ctx``."""
    singles = find_ffn_forms(graph, ctx, PATTERN)
    by_out = {m.out: m for m in singles}
    groups: list[Match] = []
    for node in graph.find_nodes(op="call_function", target=aten.cat.default):
        group = attempt(ctx, PATTERN, node, lambda: _match_experts(node, by_out))
        if group is not None:
            groups.append(group)
    return groups + singles
