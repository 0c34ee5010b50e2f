"""Building the fused ops' operands in the graph: expert weight stacks, FFN weights and biases in
the op's layout and dtypes (SPEC §5.5, §6.2). Shared by every pass that emits an FFN or a BMM op."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.fx as fx

from ..op_protos._proto import float_bias_dtype
from ._graph import cast, insert_call, is_op, val

if TYPE_CHECKING:
    from .ffn_forms import FfnMatch

aten = torch.ops.aten


def bias_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The fused ops' bias dtype for ``x_dtype`` (npu_ffn, npu_ffn_grouped and the BMM pair alike,
    ``op_protos._proto.float_bias_dtype``): fp16 for fp16, fp64 for fp64, fp32 for bf16 and fp32.
    The cast from a bf16 bias is exact."""
    return float_bias_dtype(x_dtype)


def _transposed(node: fx.Node) -> fx.Node | None:
    """``w`` when ``node`` is ``w.t()`` of a 2-D ``w`` (how ``nn.Linear`` weights reach an mm)."""
    if is_op(node, aten.permute.default) and list(node.args[1]) == [1, 0]:
        return node.args[0]
    return None


def stack_parts(graph: fx.Graph, before: fx.Node, parts: Sequence[fx.Node]) -> fx.Node:
    """``(E, ...)`` from ``E`` same-shape parts, inserted before ``before``:

    * the tensor the parts were selected from, when ``parts[e]`` is ``W[e]`` (nothing to copy);
    * ``stack(untransposed).permute(0, 2, 1)`` when every part is a transposed 2-D weight (one
      plain copy per step instead of a strided one);
    * else ``cat`` of ``unsqueeze``: post-grad graphs hold no ``aten.stack`` (a decomposed op
      inductor cannot lower there).
    """
    whole = parts[0].args[0] if is_op(parts[0], aten.select.int) else None
    if whole is not None and val(whole).size(0) == len(parts) and all(
            is_op(p, aten.select.int) and p.args[0] is whole and p.args[1] == 0 and p.args[2] == e
            for e, p in enumerate(parts)):
        return whole
    plain = [_transposed(p) for p in parts]
    if all(p is not None for p in plain):
        return insert_call(graph, before, aten.permute.default, (stack_parts(graph, before, plain), [0, 2, 1]))
    rows = [insert_call(graph, before, aten.unsqueeze.default, (p, 0)) for p in parts]
    return insert_call(graph, before, aten.cat.default, (rows,))


def ffn_operands(graph: fx.Graph, before: fx.Node, experts: Sequence[FfnMatch], *,
                 stacked: bool) -> tuple[fx.Node, fx.Node, dict[str, Any]]:
    """``(W1, W2, kwargs)`` of one npu_ffn / npu_ffn_grouped call over ``experts`` (of one form,
    ``ffn_forms.check_same_form``): weights ``(K1, N1)``/``(N1, N2)``, or ``(E, ...)`` stacks when
    ``stacked``; ``bias1``/``bias2`` in the op's bias dtype when the FFN has them; ``inner_precise``."""
    first = experts[0]

    def combined(parts: list[fx.Node]) -> fx.Node:
        return stack_parts(graph, before, parts) if stacked else parts[0]

    w1 = combined([e.weight1(graph, before) for e in experts])
    w2 = combined([e.second.weight for e in experts])
    kwargs: dict[str, Any] = {}
    biases = (("bias1", [e.bias1(graph, before) for e in experts] if first.has_bias1 else None),
              ("bias2", [e.second.bias for e in experts] if first.second.bias is not None else None))
    for name, parts in biases:
        if parts is not None:
            kwargs[name] = cast(graph, before, combined(parts), bias_dtype(first.dtype))
    # fp16 GLU runs only with inner_precise=1 on the device, which rounds h like the unfused graph;
    # everything else keeps h in high precision (SPEC §5.4, see ffn_forms' module docstring).
    kwargs["inner_precise"] = 1 if first.is_glu and first.dtype == torch.float16 else 0
    return w1, w2, kwargs
