"""Inductor's lowering of the local fused ops on devices without CANN's kernels.

On an NPU a fused op is one CANN kernel. Elsewhere its reference kernel, called from inductor's
code as an extern kernel, is opaque Python: its matmuls run without inductor's fused epilogues
and every call re-validates on the host, so the fused model ran slower than the unfused one
compiled by inductor. For inductor (never for GE or ONNX, which keep the one fused node), each
local op whose computation traces is therefore expanded into the ATen ops of its own reference
kernel, which inductor then compiles like the chain the op replaced:

* inference: after the passes on the post-grad graph (``lower_local_ops``), by tracing the kernel
  on the node's fake values and inlining that graph in place of the node;
* training: the same inlining on AOT autograd's joint graph (``pipeline.LowerLocalOps``, inductor's
  ``joint_custom_pre_pass``), of the fused ops and of their formulas' backward ops; the
  partitioner's CSE then merges the formula's recomputation of the hidden activations with the
  forward's own.

The kernels are the ops' single source of truth: a lowering is the kernel minus its host-side
value checks, which become device asserts (``ffn_grouped.device_value_checks``). A call on NPU
tensors, or in a mode whose kernel does not trace (quant, antiquant), keeps its node.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_map

from ..autograd.local_ops import _ffn_grouped_backward_kernel
from ..kernels.ffn import npu_ffn as ffn_kernel
from ..kernels.ffn_grouped import grouped_ffn
from ..op_protos import PROTOS
from ..op_protos.ffn_grouped import device_value_checks
from ._graph import strip_views
from .context import LOWERED

Tensor = torch.Tensor


def _on_npu(values: Any) -> bool:
    return any(isinstance(v, Tensor) and v.device.type == "npu" for v in tree_flatten(values)[0])


def _ffn(*args: Any, **kwargs: Any) -> Any:
    """``npu_ffn``'s float modes (an ``(..., N2)`` tensor in x's dtype), else ``NotImplemented``."""
    config = PROTOS["npu_ffn"].check(*args, **kwargs)
    if config.mode != "float" or _on_npu((args, kwargs)):
        return NotImplemented
    return ffn_kernel(config, *args, **kwargs)


def _ffn_grouped(*args: Any, rows_padded: bool, **kwargs: Any) -> Any:
    """``npu_ffn_grouped``: ``(M, N2)`` in x's dtype, its count rules asserted on the device."""
    if _on_npu((args, kwargs)):
        return NotImplemented
    proto = PROTOS["npu_ffn_grouped"]
    config = proto.check(*args, **kwargs)
    bound = proto.bind(args, kwargs)
    device_value_checks(config, bound["expert_tokens"])
    return grouped_ffn(config, bound["x"], bound["weight1"], bound["weight2"], bound["expert_tokens"],
                       bound["bias1"], bound["bias2"], rows_padded)


def _ffn_grouped_backward(*args: Any, rows_padded: bool, **kwargs: Any) -> Any:
    """``moe_fusion::_ffn_grouped_backward``: the five fp32 (fp64) gradients."""
    if _on_npu((args, kwargs)):
        return NotImplemented
    return _ffn_grouped_backward_kernel(*args, **kwargs, rows_padded=rows_padded)


def _dispatched_rows(node: fx.Node) -> bool:
    """Whether the rows of the grouped FFN ``node`` (forward: ``x``, its first operand; backward:
    its second) are ``npu_moe_distribute_dispatch_v2``'s ``expand_x``, through views: a static
    worst-case row count, mostly padding past the counts, for which the activation runs on the
    counted rows only (``kernels.ffn_grouped.grouped_ffn``). Other rows (re-routed tokens) are
    all counted: inductor's pointwise code on every row is then the fastest."""
    x = node.args[0 if node.target is torch.ops.moe_fusion.npu_ffn_grouped.default else 1]
    x = strip_views(x)
    return (isinstance(x, fx.Node) and x.target is operator.getitem and isinstance(x.args[0], fx.Node)
            and x.args[0].target is torch.ops.moe_fusion.npu_moe_distribute_dispatch_v2.default)


# op -> its lowering: the op's result, or NotImplemented to keep the node.
LOWERINGS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    torch.ops.moe_fusion.npu_ffn.default: _ffn,
    torch.ops.moe_fusion.npu_ffn_grouped.default: _ffn_grouped,
    torch.ops.moe_fusion._ffn_grouped_backward.default: _ffn_grouped_backward,
}


_ROW_AWARE = (torch.ops.moe_fusion.npu_ffn_grouped.default, torch.ops.moe_fusion._ffn_grouped_backward.default)


class _Kept(Exception):
    """The lowering returned ``NotImplemented``: the node stays."""


def lower_local_ops(graph: fx.Graph) -> int:
    """Inline the lowering of every local op node of ``graph`` (inductor's post-grad graph, or AOT's
    joint graph of a training step), then split the weight concatenations and read the expert
    weight stacks' pieces in place; returns how many ops were inlined."""
    lowered = 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in LOWERINGS]:
        lowering = LOWERINGS[node.target]
        if node.target in _ROW_AWARE:
            lowering = functools.partial(lowering, rows_padded=_dispatched_rows(node))
        if _inline(graph, node, lowering):
            lowered += 1
    if lowered:
        graph.eliminate_dead_code()
    split_concatenated_weights(graph)
    unstack_segment_weights(graph)
    return lowered


aten = torch.ops.aten
# Matmuls ``op(a, w, *rest)`` of ``a`` ``(M, K)`` and ``w`` ``(..., K, N)`` into ``(M, N)``.
_MATMULS = (aten.mm.default, torch.ops.moe_fusion._segment_mm.default)


def _bias(matmul: fx.Node) -> Optional[fx.Node]:
    """The ``(E, N)`` bias node ``_segment_mm`` adds to its product, else None."""
    if matmul.target is not torch.ops.moe_fusion._segment_mm.default:
        return None
    return matmul.args[3] if len(matmul.args) > 3 else matmul.kwargs.get("bias")


def _with_columns(graph: fx.Graph, matmul: fx.Node, start: int, end: int) -> tuple[tuple, dict]:
    """``matmul``'s arguments after ``(a, w)``, its bias (if any) cut to the columns ``start:end``."""
    rest, kwargs = list(matmul.args[2:]), dict(matmul.kwargs)
    bias = _bias(matmul)
    if bias is not None:
        piece = _call(graph, aten.slice.Tensor, (bias, 1, start, end))
        if len(matmul.args) > 3:
            rest[1] = piece
        else:
            kwargs["bias"] = piece
    return tuple(rest), kwargs


@dataclass(frozen=True)
class _ConcatenatedWeight:
    """A matmul's weight built as ``permute(cat(pieces, dim), perm)`` (or ``cat`` alone): the
    weight dim the concatenation lands on (-1: columns N, -2: the contraction K) and each piece's
    ``(start, end)`` along it."""

    pieces: tuple[fx.Node, ...]
    perm: Optional[list]
    axis: int
    bounds: tuple[tuple[int, int], ...]

    def piece_weight(self, graph: fx.Graph, index: int) -> fx.Node:
        piece = self.pieces[index]
        return piece if self.perm is None else _call(graph, aten.permute.default, (piece, self.perm))


def split_concatenated_weights(graph: fx.Graph) -> int:
    """Never build a matmul weight that is a concatenation of pieces (the FFN pass emits one when a
    model stores its GLU halves in the other order than the op's: an ``(E, 2I, H)`` copy per call):

    * concatenated along the columns and read only through column slices that each fall on one
      piece: one ``mm(a, W_i)`` per slice;
    * concatenated along the contraction: ``sum_i mm(a[:, K_i], W_i)``.

    Runs after the lowering (``lower_local_ops``), also on the joint graph of a training step,
    where the backward's use of the weight (the formula's matmuls, plain ATen ops there) and its
    gradient are visible too. Any such matmul of the graph is split, as inductor's own rewrites
    would: the contraction split sums in another order, fp32-close. Returns how many matmuls were
    split."""
    split = 0
    for matmul in [n for n in graph.nodes if n.op == "call_function" and n.target in _MATMULS]:
        weight = _concatenated_weight(matmul.args[1])
        if weight is not None and (_split_columns(graph, matmul, weight) or _split_contraction(graph, matmul, weight)):
            split += 1
    for node in [*graph.find_nodes(op="call_function", target=aten.add.Tensor),
                 *graph.find_nodes(op="call_function", target=aten.cat.default)]:
        split += _reordered_outer(graph, node)
    if split:
        graph.eliminate_dead_code()
    return split


def _reordered_outer(graph: fx.Graph, node: fx.Node) -> bool:
    """The gradient of the stored weight when the concatenation swapped its pieces: autograd puts
    the column blocks of ``G = segment_outer(a, b)`` back in the weight's order, either into zeros
    at swapped places, ``slice_scatter(0, G[:, j1], ...) + slice_scatter(0, G[:, j0], ...)``, or as
    ``cat([G[:, j1], G[:, j0]])`` (a copy of the weight's size, or two). That is ``segment_outer``
    of ``a`` with its column blocks reordered: ``_segment_outer_list`` of the blocks, which reads
    them in place (dim 2, the blocks of ``b``: a concatenation of them, which inductor fuses into
    the code producing ``b``)."""
    found = _outer_blocks(node)
    if found is None:
        return False
    outer, dim, blocks = found
    operands = list(outer.args)
    side = dim - 1          # dim 1: a's columns, dim 2: b's columns
    with graph.inserting_before(node):
        pieces = [_call(graph, aten.slice.Tensor, (operands[side], 1, *block)) for block in blocks]
        if side == 0:
            reordered = _call(graph, torch.ops.moe_fusion._segment_outer_list.default, (pieces, *operands[1:]))
        else:
            operands[side] = _call(graph, aten.cat.default, (pieces, 1))
            reordered = _call(graph, outer.target, tuple(operands), outer.kwargs)
    node.replace_all_uses_with(reordered)
    return True


def _outer_blocks(node: fx.Node) -> "tuple[fx.Node, int, list[tuple[int, int]]] | None":
    """``(G, dim, blocks)`` when ``node`` (an ``add`` of ``slice_scatter``s into zeros, or a
    ``cat``) is blocks of a ``_segment_outer`` ``G`` along ``dim`` (1 or 2) laid side by side:
    ``blocks`` are G's ranges along ``dim`` in the order ``node`` holds them, G read by nothing
    else; else None."""
    if node.target is aten.add.Tensor:
        scatters = [_scatter_of_block(arg) for arg in node.args]
        if None in scatters:
            return None
        placed = sorted((target, block) for _, _, target, block in scatters)        # by destination
        sources = {(dim, source) for dim, source, _, _ in scatters}
    elif node.target is aten.cat.default and len(node.args[0]) > 1:
        slices = [_block_of(arg) for arg in node.args[0]]
        cat_dim = (node.args[1] if len(node.args) > 1 else 0) % node.meta["val"].dim()
        if None in slices or any(dim != cat_dim for dim, _, _ in slices):
            return None     # (blocks cut along one dim, joined along another)
        sources = {(dim, source) for dim, source, _ in slices}
        placed, first = [], 0
        for _, _, block in slices:                      # a cat places its blocks one after another
            placed.append(((first, first + block[1] - block[0]), block))
            first += block[1] - block[0]
    else:
        return None
    if len(sources) != 1:
        return None
    dim, outer = next(iter(sources))
    if outer.target is not torch.ops.moe_fusion._segment_outer.default or dim not in (1, 2):
        return None
    if len(outer.users) != len(placed) or tuple(node.meta["val"].shape) != tuple(outer.meta["val"].shape):
        return None         # G is read elsewhere too, or the blocks land in a larger tensor
    size, first = outer.meta["val"].shape[dim], 0
    for target, block in placed:
        if target != (first, first + block[1] - block[0]):
            return None     # the blocks do not tile the result
        first = target[1]
    return (outer, dim, [block for _, block in placed]) if first == size else None


def _scatter_of_block(node: Any) -> "tuple[int, fx.Node, tuple[int, int], tuple[int, int]] | None":
    """``(dim, G, destination range, source range)`` of ``slice_scatter(zeros, G[.., s0:s1 on dim], dim,
    d0, d1)``, else None."""
    if not isinstance(node, fx.Node) or node.target is not aten.slice_scatter.default:
        return None
    base, block, dim, start, end = (*node.args, *(None,) * (5 - len(node.args)))[:5]
    if not (isinstance(base, fx.Node) and base.target is aten.full.default and base.args[1] == 0):
        return None
    sliced = _block_of(block)
    if sliced is None or not all(isinstance(v, int) for v in (dim, start, end)):
        return None
    if dim % block.meta["val"].dim() != sliced[0]:
        return None         # scattered along another dim than the block was cut
    source_dim, source, (first, last) = sliced
    size = source.meta["val"].shape[source_dim]     # (an open end is traced as sys.maxsize)
    return (source_dim, source, (start, min(end, size)), (first, last)) if start >= 0 else None


def _block_of(node: Any) -> "tuple[int, fx.Node, tuple[int, int]] | None":
    """``(dim, G, (s0, s1))`` of ``slice(G, dim, s0, s1)`` with static bounds (an open end cut to the
    size), else None."""
    if not (isinstance(node, fx.Node) and node.target is aten.slice.Tensor and len(node.args) == 4):
        return None
    source, dim, first, last = node.args
    if not (isinstance(source, fx.Node) and all(isinstance(v, int) for v in (dim, first, last))):
        return None
    rank = source.meta["val"].dim()
    size = source.meta["val"].shape[dim % rank]
    if not isinstance(size, int) or first < 0:
        return None
    return dim % rank, source, (first, min(last, size))


def _concatenated_weight(weight: Any) -> Optional[_ConcatenatedWeight]:
    perm = None
    while isinstance(weight, fx.Node) and weight.target is aten.permute.default:   # compose: out[i] = in[p[i]]
        inner = list(weight.args[1])
        weight, perm = weight.args[0], inner if perm is None else [inner[i] for i in perm]
    if not isinstance(weight, fx.Node) or weight.target is not aten.cat.default:
        return None
    pieces, cat_dim = weight.args[0], weight.args[1] if len(weight.args) > 1 else 0
    rank = weight.meta["val"].dim()
    landed = (perm.index(cat_dim % rank) if perm is not None else cat_dim % rank) - rank
    bounds, start = [], 0
    for piece in pieces:
        size = piece.meta["val"].shape[cat_dim]
        if not isinstance(size, int):
            return None     # symbolic piece sizes: the bounds are not known here
        bounds.append((start, start + size))
        start += size
    return _ConcatenatedWeight(tuple(pieces), perm, landed, tuple(bounds))


def _split_columns(graph: fx.Graph, matmul: fx.Node, weight: _ConcatenatedWeight) -> bool:
    if weight.axis != -1:
        return False
    columns = weight.bounds[-1][1]
    readers = {user: _column_slice(user, columns) for user in matmul.users}
    if not readers or any(bounds not in weight.bounds for bounds in readers.values()):
        return False        # a user reads across pieces, or the whole product
    for user, bounds in readers.items():
        with graph.inserting_before(user):
            piece = weight.piece_weight(graph, weight.bounds.index(bounds))
            rest, kwargs = _with_columns(graph, matmul, *bounds)
            replacement = _call(graph, matmul.target, (matmul.args[0], piece, *rest), kwargs)
        user.replace_all_uses_with(replacement)
        graph.erase_node(user)
    graph.erase_node(matmul)
    return True


def _split_contraction(graph: fx.Graph, matmul: fx.Node, weight: _ConcatenatedWeight) -> bool:
    if weight.axis != -2 or _bias(matmul) is not None:
        return False        # (a bias would be added once per part)
    a = matmul.args[0]
    with graph.inserting_before(matmul):
        total = None
        for index, (start, end) in enumerate(weight.bounds):
            rows = _call(graph, aten.slice.Tensor, (a, 1, start, end))
            part = _call(graph, matmul.target, (rows, weight.piece_weight(graph, index), *matmul.args[2:]),
                         matmul.kwargs)
            total = part if total is None else _call(graph, aten.add.Tensor, (total, part))
    matmul.replace_all_uses_with(total)
    graph.erase_node(matmul)
    return True


def unstack_segment_weights(graph: fx.Graph) -> int:
    """Never build an ``(E, K, N)`` stack of expert weights for a ``_segment_mm``: the FFN pass stacks
    per-expert ``nn.Linear`` weights (``emit.stack_parts``: ``permute(cat([unsqueeze(W_e, 0), ...]),
    perm)``), and the Megatron route ``torch.stack``s them (``view(cat([W_0, ...]), (E, ...))``, cut
    in GLU halves by ``split``), a copy of every expert's weight per step. Each ``_segment_mm`` of
    such a stack becomes ``_segment_mm_list`` of the experts' own weights (views; the same products
    bit for bit), and a stack no other node reads is dropped. Returns how many matmuls were
    rewritten."""
    rewritten = 0
    for matmul in graph.find_nodes(op="call_function", target=torch.ops.moe_fusion._segment_mm.default):
        pieces = _expert_pieces(matmul.args[1])
        if pieces is None:
            continue
        with graph.inserting_before(matmul):
            weights = [piece.weight(graph) for piece in pieces]
            listed = _call(graph, torch.ops.moe_fusion._segment_mm_list.default,
                           (matmul.args[0], weights, *matmul.args[2:]), matmul.kwargs)
        matmul.replace_all_uses_with(listed)
        graph.erase_node(matmul)
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
    return rewritten


@dataclass(frozen=True)
class _ExpertPiece:
    """Expert ``e``'s ``(K, N)`` weight within a stack: ``W_e``, cut to ``start:end`` along its dim
    ``cut_dim`` (None: whole), then permuted by ``order``."""

    source: fx.Node
    cut: Optional[tuple[int, int, int]]
    order: list[int]

    def weight(self, graph: fx.Graph) -> fx.Node:
        node = self.source
        if self.cut is not None:
            node = _call(graph, aten.slice.Tensor, (node, *self.cut))
        return node if self.order == [0, 1] else _call(graph, aten.permute.default, (node, self.order))


def _expert_pieces(weight: Any) -> "list[_ExpertPiece] | None":
    """Expert ``e``'s piece of ``weight`` ``(E, K, N)`` for every ``e``, when ``weight`` is
    ``permute(stack, perm)`` (or the stack alone), optionally cut along a non-expert dim of the
    stack by ``slice`` or a ``split`` item, with the experts' dim first, the stack being
    ``cat([unsqueeze(W_e, 0), ...])`` or ``view(cat([W_e, ...]), (E, ...))``. Else None."""
    perm = [0, 1, 2]
    while isinstance(weight, fx.Node) and weight.target is aten.permute.default:    # out[i] = in[p[i]]
        inner = list(weight.args[1])
        weight, perm = weight.args[0], [inner[i] % 3 for i in perm]
    if perm[0] != 0:
        return None
    weight, cut = _cut_of(weight)
    sources = _stacked(weight)
    if sources is None:
        return None
    return [_ExpertPiece(source, cut, [perm[1] - 1, perm[2] - 1]) for source in sources]


def _cut_of(node: Any) -> "tuple[Any, Optional[tuple[int, int, int]]]":
    """``(stack, (dim - 1, start, end))`` when ``node`` is ``stack[:, start:end]`` (dim 1) or
    ``stack[:, :, start:end]`` (dim 2) by ``slice`` or a ``split`` item, else ``(node, None)``."""
    if not isinstance(node, fx.Node):
        return node, None
    block = _block_of(node)
    if block is not None and block[0] in (1, 2):
        dim, source, (start, end) = block
        return source, (dim - 1, start, end)
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and \
            node.args[0].target is aten.split.Tensor:
        source, size, dim = (*node.args[0].args, 0)[:3]
        if isinstance(dim, int) and dim % 3 in (1, 2) and isinstance(size, int):
            total, index = source.meta["val"].shape[dim], node.args[1]
            return source, (dim % 3 - 1, index * size, min((index + 1) * size, total))
    return node, None


def _stacked(node: Any) -> "list[fx.Node] | None":
    """``[W_0, ...]`` when ``node`` ``(E, K, N)`` is ``cat([unsqueeze(W_e, 0), ...])`` or
    ``view(cat([W_0, ...]), (E, K, N))`` of ``(K, N)`` pieces, else None."""
    if isinstance(node, fx.Node) and node.target in (aten.view.default, aten.reshape.default):
        flat, shape = node.args[0], list(node.args[1])
        if not (isinstance(flat, fx.Node) and flat.target is aten.cat.default and (*flat.args, 0)[1] == 0):
            return None
        sources = list(flat.args[0])
        if len(sources) != shape[0] or not all(
                isinstance(s, fx.Node) and list(s.meta["val"].shape) == shape[1:] for s in sources):
            return None
        return sources
    if not (isinstance(node, fx.Node) and node.target is aten.cat.default and (*node.args, 0)[1] == 0):
        return None
    sources = []
    for row in node.args[0]:
        if not (isinstance(row, fx.Node) and row.target is aten.unsqueeze.default and row.args[1] == 0):
            return None
        sources.append(row.args[0])
    return sources


def _inline(graph: fx.Graph, node: fx.Node, lowering: Callable[..., Any]) -> bool:
    """Replace ``node`` by the functional ATen graph of ``lowering`` traced on its fake values."""
    operands: list[fx.Node] = []

    def slot(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            operands.append(arg)
            return _Operand(len(operands) - 1)
        return arg

    template = tree_map(slot, (node.args, node.kwargs))
    values = [operand.meta.get("val") for operand in operands]
    if not all(isinstance(v, Tensor) for v in values):
        return False    # a symbolic scalar operand: keep the node (its lowering would bake a value in)

    def call(*tensors: Tensor) -> Any:
        args, kwargs = tree_map(lambda a: tensors[a.index] if isinstance(a, _Operand) else a, template)
        result = lowering(*args, **kwargs)
        if result is NotImplemented:
            raise _Kept
        return result

    fake_mode = detect_fake_mode(values)
    try:
        with fake_mode:
            traced = make_fx(torch.func.functionalize(call, remove="mutations"),
                             decomposition_table=select_decomp_table())(*values)
    except _Kept:
        return False
    placeholders = traced.graph.find_nodes(op="placeholder")
    copies = dict(zip(placeholders, operands))       # graph_copy adds every copied node's copy
    with graph.inserting_before(node):
        result = graph.graph_copy(traced.graph, copies)
    for traced_node, inserted in copies.items():
        if traced_node.op != "placeholder":
            inserted.meta[LOWERED] = True
    _replace_uses(node, result)
    graph.erase_node(node)
    return True


class _Operand:
    """Position of a node operand in the traced function's arguments."""

    def __init__(self, index: int) -> None:
        self.index = index


def _replace_uses(node: fx.Node, result: Any) -> None:
    """Point ``node``'s users at ``result``: a node, or a tuple of nodes its ``getitem`` users pick from."""
    if isinstance(result, fx.Node):
        node.replace_all_uses_with(result)
        return
    flat, _ = tree_flatten(result)
    for user in list(node.users):
        if user.target is not operator.getitem:
            raise AssertionError(f"moe_fusion: {node.name} is used whole by {user.name}; expected getitem users")
        user.replace_all_uses_with(flat[user.args[1]])
        user.graph.erase_node(user)


def _column_slice(node: fx.Node, columns: int) -> "tuple[int, int] | None":
    """``(start, end)`` of ``node`` when it is a step-1 slice of the columns of a 2-D ``(M, columns)``
    product, else None."""
    if node.target is not aten.slice.Tensor or node.kwargs:
        return None
    _, dim, first, end, step = (*node.args, *(None,) * (5 - len(node.args)))
    first, end = 0 if first is None else first, columns if end is None else end
    if dim not in (1, -1) or step not in (None, 1) or not (isinstance(first, int) and isinstance(end, int)):
        return None
    return first, min(end, columns)


def _call(graph: fx.Graph, target: Any, args: tuple, kwargs: "dict | None" = None) -> fx.Node:
    """A new ``target`` node with its fake value in ``meta["val"]``, as post-grad nodes carry."""
    node = graph.call_function(target, args, kwargs or {})
    node.meta[LOWERED] = True
    values = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, (args, kwargs or {}))
    with detect_fake_mode(tree_flatten(values)[0]):
        node.meta["val"] = target(*values[0], **values[1])
    return node
