"""All-to-alls written as custom autograd Functions, made functional before AOT autograd.

fairscale's and DeepSpeed's ``_AllToAll`` (PyTorch PR 40762's pattern) is a
``torch.autograd.Function`` whose forward is ``dist.all_to_all_single(out, x.contiguous())`` and whose
backward applies itself to the gradient. Dynamo captures it as
``higher_order.autograd_function_apply(fwd_body, bwd_body, *operands)``, which functionalization
cannot trace ("NYI: Functionalize rule for custom_function_call"): a graph holding one trains
unfused. An all-to-all with equal splits is its own adjoint, so such a Function is exactly
``_c10d_functional_autograd.all_to_all_single`` (torch's differentiable all-to-all, whose backward is
the all-to-all with the splits swapped). ``functional_all_to_alls`` rewrites each HOP whose bodies
are exactly that into it, in dynamo's graph, before ``fuse_before_autograd`` traces it.

Both bodies must hold nothing but: grad-mode switches, ``contiguous`` copies of the one tensor
operand, ``empty_like`` of it, ``size`` reads, one ``_c10d_functional.all_to_all_single`` of it over a group with
literal split lists, its ``wait_tensor``, and the ``copy_`` of the result into the ``empty_like``
buffer the body returns; the backward's splits must be the forward's swapped, over the same group.
Anything else (another collective, a scale, a second output) is left as it is.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

c10d = torch.ops._c10d_functional
# Nodes a body may hold besides its all-to-all chain: grad-mode switches and shape reads.
_BOOKKEEPING = {torch._C._set_grad_enabled, operator.getitem}
# Dynamo's graphs call the op packets, traced ATen graphs their overloads.
_ALL_TO_ALL = (c10d.all_to_all_single, c10d.all_to_all_single.default)
_WAIT = (c10d.wait_tensor, c10d.wait_tensor.default)


def _all_to_all(body: fx.GraphModule) -> Optional[tuple[Any, Any, str]]:
    """``(output_splits, input_splits, group)`` when ``body`` is exactly ``out = empty_like(c);
    out.copy_(wait(all_to_all_single(c, ...)))`` with ``c`` its one tensor input (or a
    ``contiguous`` copy of it), returning ``out`` and no other tensor; None otherwise."""
    tensors = [n for n in body.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("example_value"),
                                                                                    torch.Tensor)]
    calls = [n for n in body.graph.nodes if n.op in ("call_function", "call_method")]
    a2as = [n for n in calls if n.target in _ALL_TO_ALL]
    if len(tensors) != 1 or len(a2as) != 1:
        return None
    a2a = a2as[0]
    source, out_splits, in_splits, group = a2a.args[:4]
    # The input itself or a contiguous copy of it (values unchanged), as often as the body asks.
    copies_of_input = {n for n in calls
                       if n.op == "call_method" and n.target == "contiguous" and n.args[0] is tensors[0]}
    if source is not tensors[0] and source not in copies_of_input:
        return None
    waits = [u for u in a2a.users if u.target in _WAIT]
    copies = [u for u in (waits[0].users if len(waits) == 1 else ()) if u.op == "call_method" and u.target == "copy_"]
    if len(waits) != 1 or len(copies) != 1:
        return None
    buffer = copies[0].args[0]
    if buffer.target is not torch.empty_like or buffer.args[0] not in copies_of_input | {tensors[0]}:
        return None
    allowed = copies_of_input | {a2a, waits[0], copies[0], buffer}
    for node in calls:
        shape_read = node.op == "call_method" and node.target == "size"
        if node not in allowed and not shape_read and node.target not in _BOOKKEEPING:
            return None
    returned = [n for n in tree_leaves(next(n for n in body.graph.nodes if n.op == "output").args[0])
                if isinstance(n, fx.Node) and isinstance(n.meta.get("example_value"), torch.Tensor)]
    if returned != [buffer]:
        return None
    if not all(isinstance(s, int) for s in (*out_splits, *in_splits)) or not isinstance(group, str):
        return None
    return list(out_splits), list(in_splits), group


def functional_all_to_alls(dynamo_gm: fx.GraphModule) -> fx.GraphModule:
    """Dynamo's graph ``dynamo_gm`` with each autograd-Function all-to-all (module docstring) as
    torch's differentiable functional all-to-all: a copy when there is one (``dynamo_gm`` itself
    stays as dynamo made it, for AOT autograd should the traced graph be given up), else itself."""
    if not any(n.target is torch.ops.higher_order.autograd_function_apply for n in dynamo_gm.graph.nodes):
        return dynamo_gm
    gm = copy.deepcopy(dynamo_gm)
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.higher_order.autograd_function_apply:
            continue
        fwd, bwd = (getattr(gm, n.target) for n in node.args[:2])
        forward, backward = _all_to_all(fwd), _all_to_all(bwd)
        if forward is None or backward is None:
            continue
        (out_splits, in_splits, group), (b_out, b_in, b_group) = forward, backward
        # The backward must be the forward's adjoint: the same group, the splits swapped.
        if b_group != group or b_out != in_splits or b_in != out_splits:
            continue
        tensors = [a for a in node.args[2:] if isinstance(a, fx.Node)
                   and isinstance(a.meta.get("example_value"), torch.Tensor)]
        results = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(tensors) != 1 or len(results) != len(node.users):
            continue
        # No .contiguous(): the functional all-to-all reads any layout (and on a data-dependent
        # size, asking whether a tensor is contiguous would guard on the size).
        with gm.graph.inserting_before(node):
            a2a = gm.graph.call_function(torch.ops._c10d_functional_autograd.all_to_all_single.default,
                                         (tensors[0], out_splits, in_splits, group))
            waited = gm.graph.call_function(c10d.wait_tensor.default, (a2a,))
        for new in (a2a, waited):
            new.meta["example_value"] = results[0].meta.get("example_value")
        for result in results:
            result.replace_all_uses_with(waited)
            gm.graph.erase_node(result)
        bodies = node.args[:2]
        gm.graph.erase_node(node)
        for body in bodies:
            if not body.users:
                gm.graph.erase_node(body)
        rewritten += 1
    if not rewritten:
        return dynamo_gm
    gm.recompile()
    return gm
