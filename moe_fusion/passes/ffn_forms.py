"""Reading FFNs in post-grad graphs: ``linear -> activation -> linear`` as ``FfnMatch`` records
(SPEC §5), and the single-FFN rewrite into ``moe_fusion.npu_ffn``.

Shared by the FFN pass (``ffn.py``) and the expert-parallel MoE passes, which read their expert
FFNs with it. Forms read (``x`` ``(M, K1)``; 3-D inputs appear as views around the mms):
* plain: ``act(x @ W1 + b1) @ W2 + b2`` with ``act`` in relu, tanh-GELU, silu, fastgelu
  (``x * sigmoid(1.702 x)``); each linear as ``mm``, ``addmm`` or ``mm`` + 1-D bias ``add`` (a
  second bias added after a view back to 3-D stays a separate ``add``).
* grouped: both linears grouped matmuls over the same row segments (``torch._grouped_mm`` or HF
  transformers' ``grouped_mm_fallback`` with one ``offs``, the segments' int32 cumulative ends),
  weights ``(E, K, N)``, no bias (HF adds a per-row bias gathered by expert: it stays unfused) =>
  ``npu_ffn_grouped`` with ``expert_tokens=offs`` and ``tokens_index_flag=True``.
* gathered (HF ``batched_mm`` experts): both linears ``bmm(W[ids], x.unsqueeze(-1)).squeeze(-1)``
  (``W`` stored ``(E, N, K)``; or ``bmm(x.unsqueeze(1), W[ids]).squeeze(1)``, ``W`` ``(E, K, N)``),
  each row ``s`` times expert ``ids[s]``'s weights, the same ``ids`` for both, no bias => the rows
  sorted by ``ids``, the grouped form's ``npu_ffn_grouped`` over them with the cumulative
  expert counts as ``expert_tokens``, and the rows put back in their order. Exact for ids in
  ``[0, E)``: accepted only when the ids are the indices of a ``topk`` over at most ``E`` experts
  (the router's choices); refused otherwise (e.g. ids passed in as a graph input).
* GLU: ``left * f(right)`` where ``left`` and ``right`` are column blocks of matmuls of the same
  ``x``: halves of one matmul (``a, b = h.chunk(2, -1)``) or two matmuls (separate gate/up
  projections). ``f`` in relu/tanh-GELU/silu gives reglu/geglu/swiglu. npu_ffn computes
  ``h[:, :N1/2] * f(h[:, N1/2:])`` (SPEC §9 #14), so W1 is ``cat([W_left, W_right], -1)``: the
  *non-activated* factor goes first, whichever chunk it is (a product commutes; only which
  factor is activated matters). W1 is passed unchanged when it already has that layout. A linear
  half written ``x_linear + 0`` (Megatron-core's ``glu_linear_offset`` default) is ``x_linear``.

Refused, with a reason in the fusion report: erf GELU (npu_ffn's "gelu" is the tanh form, SPEC
§9 #15), fastgelu GLU (no such npu_ffn activation), GLU look-alikes (both factors activated,
factors from matmuls of different inputs, one biased projection, a non-zero offset on the linear
half), and intermediates used outside the pattern; ``FfnMatch.replace_with`` refuses anything the
compile target's npu_ffn rejects (``PROTOS["npu_ffn"].check`` on the fake values, e.g. fp32 or
``N2 != K1`` on A2/A3), and, under inductor, bf16/fp16 FFNs the fused kernel would multiply in fp32
on a device with native low-precision matmuls (``cost``). Not seen: products that broadcast, chunks
along rows, and 1-row matmuls with N, K <= 16, which inductor decomposes into ``mul`` + ``sum`` on
CPU.

Low precision (fp16/bf16). The unfused graph rounds ``h = x @ W1 + b1`` to the storage dtype, runs
the activation in fp32 (inductor upcasts) and rounds after it. ``npu_ffn`` with
``inner_precise=0`` keeps ``h`` in fp32 and rounds after the activation only (SPEC §5.4): it drops
one rounding of an intermediate, as inductor itself does inside every fused kernel
(``emulate_precision_casts=False``). The rewrite is accepted as semantics-preserving: every
remaining rounding is one the unfused graph does too. Tolerance, tested against an fp64
reference: the fused mean error is no larger than the unfused graph's (10 % slack) and its max
error at most one output ulp larger. fp16 GLU uses ``inner_precise=1`` (the device kernel's only
GLU mode), which rounds ``h`` to fp16 like the unfused graph and multiplies ``left * f(right)``
before one rounding. bf16 biases are passed as fp32 (exact; npu_ffn's bias dtype for bf16).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._graph import cast, erase_unused, fused_ops_or_refusal, insert_call, insert_getitem, is_op, same_size, val
from .activations import ActivationMatch, match_activation
from .context import PassContext, Refusal, attempt
from .cost import refuse_decode_gathered, refuse_slower_ffn
from .emit import ffn_operands
from .vocabulary import GROUPED_MM_NAMES, VIEW_OPS

aten, prims = torch.ops.aten, torch.ops.prims
F32 = torch.float32

# activations.py kind -> npu_ffn activation, for the plain and the GLU form.
PLAIN_ACTIVATIONS = {"relu": "relu", "gelu_tanh": "gelu", "silu": "silu", "fastgelu": "fastgelu"}
GLU_ACTIVATIONS = {"relu": "reglu", "gelu_tanh": "geglu", "silu": "swiglu"}
_ACTIVATION_REFUSALS = {
    "gelu_erf": "the GELU is the exact erf form (F.gelu default) and npu_ffn's 'gelu' is the tanh "
                "approximation (SPEC §9 #15); pass approximate='tanh' to F.gelu to fuse",
}


# ---------------------------------------------------------------------------------------------
# Graph reading helpers
# ---------------------------------------------------------------------------------------------

def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = val(a).shape, val(b).shape
    return len(sa) == len(sb) and all(same_size(x, y) for x, y in zip(sa, sb))


def _same_value(a: fx.Node, b: fx.Node) -> bool:
    """``a`` and ``b`` hold the same values: the same node, or equal views or equal dtype casts of the
    same value (``x.bfloat16()`` written once per projection, as torchtitan's experts do)."""
    if a is b:
        return True
    if _cast(a) is not None and _cast(a) == _cast(b):
        return _same_value(a.args[0], b.args[0])
    return is_op(a, *VIEW_OPS) and is_op(b, *VIEW_OPS) and _same_shape(a, b) and _same_value(a.args[0], b.args[0])


def _cast(node: fx.Node) -> Optional[tuple[torch.dtype, torch.dtype]]:
    """``(from, to)`` dtypes when ``node`` is a dtype conversion."""
    if is_op(node, prims.convert_element_type) and isinstance(node.args[0], fx.Node):
        return val(node.args[0]).dtype, node.args[1]
    return None


def _strip_up(node: fx.Node, casts: frozenset = frozenset()) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """Walk up from ``node`` through views and the allowed ``(from, to)`` dtype casts; return the
    first other node and the nodes walked (``node`` first)."""
    walked: list[fx.Node] = []
    while is_op(node, *VIEW_OPS) or _cast(node) in casts:
        walked.append(node)
        node = node.args[0]
    return node, tuple(walked)


@dataclass(frozen=True)
class Linear:
    """``out = x @ weight (+ bias)``: ``x`` ``(M, K)``, ``weight`` ``(K, N)``, ``bias`` ``(N,)`` or
    None. ``out`` is ``(M, N)``, or a view of it when the bias add follows a view (3-D ``x@w+b``).
    ``nodes`` run from the mm to ``out``. A grouped matmul has ``offs`` (int32 segment ends
    ``(E,)``) and ``weight`` ``(E, K, N)``, row segment ``e`` times ``weight[e]``. A gathered matmul
    (HF ``batched_mm``) has ``ids`` (integer ``(M,)``): row ``s`` times ``weight[ids[s]]``, with
    ``weight`` the ``(E, K, N)`` stack, or its ``(E, N, K)`` storage when ``stored_nk``."""

    x: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    out: fx.Node
    nodes: tuple[fx.Node, ...]
    offs: Optional[fx.Node] = None
    ids: Optional[fx.Node] = None
    stored_nk: bool = False

    @property
    def n(self):
        return val(self.weight).size(-2 if self.stored_nk else -1)


def _grouped_mm(node: fx.Node) -> Optional[Linear]:
    """A grouped matmul of 2-D ``x`` and 3-D weights with segment ends and nothing else (no bias,
    no output dtype)."""
    if node.op != "call_function" or str(node.target) not in GROUPED_MM_NAMES:
        return None
    names = [a.name for a in node.target._schema.arguments]
    args = dict(zip(names, node.args)) | node.kwargs
    x, w, offs = (args.get(n) for n in names[:3])
    extra = [n for n in names[3:] if args.get(n) is not None]
    if extra or not isinstance(offs, fx.Node) or len(val(x).shape) != 2 or len(val(w).shape) != 3:
        return None
    return Linear(x, w, None, node, (node,), offs)


def _gathered_mm(node: fx.Node) -> Optional[Linear]:
    """HF ``batched_mm``'s per-row matmul of 2-D ``x`` ``(S, K)`` with weights gathered by integer
    ``ids`` ``(S,)`` from a 3-D stack: ``bmm(W[ids], x.unsqueeze(-1)).squeeze(-1)`` with ``W`` stored
    ``(E, N, K)``, or ``bmm(x.unsqueeze(1), W[ids]).squeeze(1)`` with ``W`` ``(E, K, N)``; ``node``
    is the squeeze, ``(S, N)``. Says nothing about the ids' values (``_check_gathered`` does)."""
    if not is_op(node, aten.squeeze.dim) or not is_op(node.args[0], aten.bmm):
        return None
    bmm, dim = node.args[0], node.args[1] % 3
    stored_nk = dim == 2
    gather, vector = bmm.args[:2] if stored_nk else bmm.args[1::-1]
    if not is_op(vector, aten.unsqueeze.default) or vector.args[1] % 3 != dim or not is_op(gather, aten.index.Tensor):
        return None
    stack, indices = gather.args[:2]
    ids = indices[0] if len(indices) == 1 else None
    if (not isinstance(ids, fx.Node) or val(ids).dim() != 1 or val(ids).dtype not in (torch.int32, torch.int64)
            or val(stack).dim() != 3 or val(vector.args[0]).dim() != 2):
        return None
    return Linear(vector.args[0], stack, None, node, (gather, vector, bmm, node), ids=ids, stored_nk=stored_nk)


def _mm(node: fx.Node) -> Optional[Linear]:
    """``mm(x, w)`` or ``addmm(b, x, w)`` with a 1-D bias and unit alpha/beta, or a grouped or
    gathered matmul."""
    grouped = _grouped_mm(node) or _gathered_mm(node)
    if grouped is not None:
        return grouped
    if is_op(node, aten.mm):
        return Linear(node.args[0], node.args[1], None, node, (node,))
    if is_op(node, aten.addmm) and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        bias, x, w = node.args[:3]
        # A 2-D "bias" is a residual, not a per-column bias.
        if len(val(bias).shape) == 1 and same_size(val(bias).size(0), val(w).size(-1)):
            return Linear(x, w, bias, node, (node,))
    return None


def _linear_ending_at(node: fx.Node, through_views: bool = True) -> Optional[Linear]:
    """The linear whose result is ``node``: an mm/addmm, or ``mm (-> views) + bias``."""
    found = _mm(node)
    if found is not None or not is_op(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1:
        return found
    for product, bias in (node.args[:2], node.args[1::-1]):
        if not isinstance(product, fx.Node) or not isinstance(bias, fx.Node):
            continue
        mm, views = _strip_up(product) if through_views else (product, ())
        base = _mm(mm)
        if (base is not None and base.bias is None and len(val(bias).shape) == 1
                and val(bias).dtype == val(mm).dtype and same_size(val(bias).size(0), base.n)):
            return Linear(base.x, base.weight, bias, node, (mm,) + tuple(reversed(views)) + (node,))
    return None


def _second_linear(mm: fx.Node) -> Optional[Linear]:
    """The FFN's second linear starting at ``mm``, with the bias add that follows it directly or
    after views (``nn.Linear`` on N-D rows, as traced before autograd): then its result has the
    views' shape, which the rewrite gives the fused op's ``(M, N2)`` back."""
    base = _mm(mm)
    if base is None or base.bias is not None or base.offs is not None or base.ids is not None:
        return base
    node = mm
    while len(node.users) == 1 and is_op(next(iter(node.users)), *VIEW_OPS):
        node = next(iter(node.users))
    if len(node.users) != 1:
        return base
    with_bias = _linear_ending_at(next(iter(node.users)))
    return with_bias if with_bias is not None and with_bias.nodes[0] is mm else base


@dataclass(frozen=True)
class Columns:
    """Columns ``[start, stop)`` of a linear's result (a GLU half, or the whole of it)."""

    linear: Linear
    start: int
    stop: int
    nodes: tuple[fx.Node, ...]     # split/getitem/views between the linear's result and the use

    @property
    def width(self) -> int:
        return self.stop - self.start

    def build(self, graph: fx.Graph, before: fx.Node, tensor: fx.Node, dim: int = -1) -> fx.Node:
        """These columns of ``tensor`` (the linear's weight or bias; columns are its last dim, or
        ``dim`` of an untransposed weight)."""
        if self.start == 0 and same_size(self.stop, self.linear.n):
            return tensor
        return insert_call(graph, before, aten.slice.Tensor, (tensor, dim, self.start, self.stop))


def _untransposed(node: Optional[fx.Node]) -> Optional[fx.Node]:
    """``w`` when ``node`` is ``w`` with its last two dims swapped (a view), else None."""
    if not isinstance(node, fx.Node) or len(val(node).shape) < 2:
        return None
    rank = len(val(node).shape)
    if is_op(node, aten.permute.default):
        order = [d % rank for d in node.args[1]]
        if order == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return node.args[0]
    if is_op(node, aten.transpose.int) and {d % rank for d in node.args[1:3]} == {rank - 2, rank - 1}:
        return node.args[0]
    return None


def _split_piece(node: fx.Node) -> Optional[tuple[fx.Node, int, int]]:
    """``(split input, start, stop)`` when ``node`` is one piece of a split along the last dim."""
    if node.target is not operator.getitem or not is_op(node.args[0], aten.split.Tensor, aten.split_with_sizes):
        return None
    split, index = node.args
    whole, size_arg = split.args[:2]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    rank = len(val(whole).shape)
    if dim % rank != rank - 1:
        return None
    width = val(whole).size(-1)
    sizes = list(size_arg) if isinstance(size_arg, (list, tuple)) else [size_arg] * -(-width // size_arg)
    if not all(isinstance(s, int) for s in sizes):
        return None
    start = sum(sizes[:index])
    return whole, start, min(start + sizes[index], width)


def _columns(node: fx.Node) -> Optional[Columns]:
    """Which linear columns ``node`` holds: a split piece of a linear's result, or all of it."""
    src, views = _strip_up(node)
    piece = _split_piece(src)
    if piece is None:
        linear = _linear_ending_at(src)
        return None if linear is None else Columns(linear, 0, linear.n, views)
    whole, start, stop = piece
    base, base_views = _strip_up(whole)
    linear = _linear_ending_at(base)
    # Only a split of the last dim of an (..., N) view of (M, N) picks columns.
    if linear is None or not same_size(val(whole).size(-1), linear.n):
        return None
    return Columns(linear, start, stop, views + (src, src.args[0]) + base_views)


# ---------------------------------------------------------------------------------------------
# Match records
# ---------------------------------------------------------------------------------------------

@dataclass
class FfnMatch:
    """``act(x @ W1 + b1) @ W2 + b2`` in the graph. ``first`` lists W1's column blocks in npu_ffn
    order: one block (plain), or ``(left, right)`` for GLU. ``out`` is the second linear's result
    ``(M, N2)``; ``nodes`` every node the rewrite makes dead, ``out`` included."""

    activation: str
    x: fx.Node
    first: tuple[Columns, ...]
    second: Linear
    nodes: frozenset[fx.Node]

    @property
    def out(self) -> fx.Node:
        return self.second.out

    @property
    def anchor(self) -> fx.Node:
        return self.out

    @property
    def dtype(self) -> torch.dtype:
        return val(self.x).dtype

    @property
    def is_glu(self) -> bool:
        return len(self.first) == 2

    @property
    def has_bias1(self) -> bool:
        return self.first[0].linear.bias is not None

    @property
    def offs(self) -> Optional[fx.Node]:
        """The grouped form's segment ends (``read_ffn`` checked both linears share them), else None."""
        return self.second.offs

    @property
    def ids(self) -> Optional[fx.Node]:
        """The gathered form's per-row expert ids ``(M,)`` (``read_ffn`` checked both linears share
        them and that they lie in ``[0, E)``), else None."""
        return self.second.ids

    @property
    def op(self) -> str:
        return "npu_ffn" if self.offs is None and self.ids is None else "npu_ffn_grouped"

    def weight1(self, graph: fx.Graph, before: fx.Node) -> fx.Node:
        """W1 ``(K1, N1)``: the blocks' weight columns, concatenated unless they already are W1."""
        return self._concat(graph, before, "weight")

    def bias1(self, graph: fx.Graph, before: fx.Node) -> Optional[fx.Node]:
        return self._concat(graph, before, "bias") if self.has_bias1 else None

    def _concat(self, graph: fx.Graph, before: fx.Node, field: str) -> fx.Node:
        blocks = self.first
        whole = blocks[0].linear
        if (all(b.linear == whole for b in blocks) and blocks[0].start == 0 and same_size(blocks[-1].stop, whole.n)
                and all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))):
            return getattr(whole, field)            # the blocks are W1's columns in order already
        bases = [_untransposed(getattr(b.linear, field)) for b in blocks]
        if all(base is not None for base in bases):
            # Weights stored (..., N, K) (nn.Linear, HF experts): reorder their rows, a plain block
            # copy, and transpose the result as a view, instead of gathering strided columns.
            rows = [b.build(graph, before, base, dim=-2) for b, base in zip(blocks, bases)]
            stacked = insert_call(graph, before, aten.cat.default, (rows, -2))
            rank = len(val(stacked).shape)      # a permute: post-grad graphs hold no aten.transpose
            return insert_call(graph, before, aten.permute.default,
                               (stacked, list(range(rank - 2)) + [rank - 1, rank - 2]))
        parts = [b.build(graph, before, getattr(b.linear, field)) for b in blocks]
        return insert_call(graph, before, aten.cat.default, (parts, -1))

    def replace_with(self, graph: fx.Graph) -> fx.Node:
        """One ``npu_ffn`` call in place of the FFN.

        Before (``nn.Linear`` -> tanh-GELU -> ``nn.Linear``, post-grad)::

            permute:   "f32[K1, N1]" = aten.permute(w1, [1, 0])
            addmm:     "f32[M, N1]"  = aten.addmm(b1, x, permute)
            mul, ..., tanh, ...      = <tanh-GELU of addmm>
            mul_5:     "f32[M, N1]"
            permute_1: "f32[N1, N2]" = aten.permute(w2, [1, 0])
            addmm_1:   "f32[M, N2]"  = aten.addmm(b2, mul_5, permute_1)

        After::

            permute:   "f32[K1, N1]" = aten.permute(w1, [1, 0])
            permute_1: "f32[N1, N2]" = aten.permute(w2, [1, 0])
            npu_ffn:   "f32[M, N2]"  = moe_fusion.npu_ffn(x, permute, permute_1, "gelu", bias1=b1, bias2=b2,
                                                          inner_precise=0)

        GLU from separate gate/up matmuls (``f(x @ Wg) * (x @ Wu)``) inserts
        ``cat: "[K1, 2H]" = aten.cat([Wu, Wg], -1)`` and passes it as W1 (with ``activation="swiglu"``
        etc.); a chunk whose *first* half is activated inserts ``cat([W[:, H:], W[:, :H]], -1)``.
        Refused (graph unchanged) when the compile target's npu_ffn rejects the call (e.g. fp32 or
        ``N2 != K1`` on A2/A3), or when the cost gate finds it slower here (``cost``).

        The grouped form (HF transformers' grouped experts) becomes ``npu_ffn_grouped(x, W1, W2, act,
        expert_tokens=offs as int64, tokens_index_flag=True)``, the weights ``(E, K, N)`` built the
        same way (GLU halves swapped along the last dim when the first half is activated).

        The gathered form (HF ``batched_mm``: ``bmm(W1[ids], x[..., None])`` ... ``bmm(W2[ids], ...)``)
        is sorted into the grouped form (``_sorted_by_expert``) and put back in row order::

            sort:    (i64[S], i64[S]) = aten.sort(ids, 0)
            perm:    "i64[S]"     = sort[1]                      (sort[0] = ids[perm], ascending)
            experts: "i64[E]"     = aten.arange.start_step(0, E, 1)
            ends:    "i64[E]"     = aten.searchsorted(sort[0], experts, right=True)
            rows:    "f32[S, K1]" = aten.index(x, [perm])
            grouped: "f32[S, N2]" = moe_fusion.npu_ffn_grouped(rows, W1, W2, act, expert_tokens=ends,
                                                               tokens_index_flag=True, inner_precise=0)
            inverse: "i64[S]"     = aten.sort(perm, 0)[1]
            out:     "f32[S, N2]" = aten.index(grouped, [inverse])       (out[perm[r]] = grouped[r])

        ``ends[e]`` counts the ids ``<= e``: ``bincount(ids, minlength=E).cumsum(0)``, with a static
        shape (fake tensors cannot trace bincount, whose size depends on the values), from ops
        inductor lowers.
        """
        refuse_slower_ffn(self.dtype, val(self.x).device, gathered=self.ids is not None)
        if self.ids is not None:
            refuse_decode_gathered(val(self.x).size(0), val(self.second.weight).size(0), val(self.x).device)
        with fused_ops_or_refusal(graph, self.op):
            fused = self._emit(graph) if self.ids is None else self._emit_sorted(graph)
            if tuple(val(fused).shape) != tuple(val(self.out).shape):     # a bias added after views
                fused = insert_call(graph, self.out, aten.view.default, (fused, list(val(self.out).shape)))
        self.out.replace_all_uses_with(fused)
        return fused

    def _emit(self, graph: fx.Graph) -> fx.Node:
        """The npu_ffn / npu_ffn_grouped call of a plain or grouped FFN, inserted before ``out``."""
        w1, w2, kwargs = ffn_operands(graph, self.out, [self], stacked=False)
        if self.offs is None:
            return insert_call(graph, self.out, torch.ops.moe_fusion.npu_ffn.default,
                               (self.x, w1, w2, self.activation), kwargs)
        ends = cast(graph, self.out, self.offs, torch.int64)
        return insert_call(graph, self.out, torch.ops.moe_fusion.npu_ffn_grouped.default,
                           (self.x, w1, w2, self.activation),
                           {"expert_tokens": ends, "tokens_index_flag": True, **kwargs})

    def _emit_sorted(self, graph: fx.Graph) -> fx.Node:
        """The gathered form's rows ``(S, N2)``: the grouped form over the rows ``x[perm]`` sorted by
        expert (``perm`` a sort of the int64 ids ``(S,)``, segment ends the int64 cumulative counts
        ``(E,)``), each result row put back at row ``perm[r]`` (nodes in ``replace_with``). The sorts
        need not be stable (rows are independent, and ``perm`` has distinct values): ``aten.sort``
        and ``aten.arange.start_step`` are what GE converts (``sort.stable`` and ``prims.iota`` it
        does not) and inductor lowers."""
        before = self.out

        def sort(keys: fx.Node) -> fx.Node:
            return insert_call(graph, before, aten.sort.default, (keys, 0))

        ids = cast(graph, before, self.ids, torch.int64)
        order = sort(ids)
        sorted_ids, perm = (insert_getitem(graph, before, order, i) for i in (0, 1))
        # arange.start_step: inductor lowers it in a post-grad graph (arange.default it does not), GE converts it.
        experts = insert_call(graph, before, aten.arange.start_step, (0, val(self.second.weight).size(0), 1),
                              {"dtype": torch.int64, "device": val(ids).device})
        ends = insert_call(graph, before, aten.searchsorted.Tensor, (sorted_ids, experts), {"right": True})
        rows = insert_call(graph, before, aten.index.Tensor, (self.x, [perm]))
        regrouped, permutes = self._sorted_by_expert(graph, rows, ends)
        grouped = regrouped._emit(graph)
        erase_unused(permutes)      # a GLU reorder reads the (E, N, K) storage, not its permute
        inverse = insert_getitem(graph, before, sort(perm), 1)
        return insert_call(graph, before, aten.index.Tensor, (grouped, [inverse]))

    def _sorted_by_expert(self, graph: fx.Graph, rows: fx.Node, ends: fx.Node) -> tuple[FfnMatch, list[fx.Node]]:
        """This gathered FFN as the grouped form over ``rows`` ``(S, K1)`` sorted by expert, with int64
        segment ends ``ends`` ``(E,)``: every linear reads its stack as ``(E, K, N)`` weights (a
        permute of an ``(E, N, K)`` storage, which ``_concat`` sees through for the GLU reorder).
        Also returns the permutes inserted."""
        grouped: dict[Linear, Linear] = {}
        permutes: list[fx.Node] = []

        def regroup(linear: Linear) -> Linear:
            if linear not in grouped:
                weight = linear.weight
                if linear.stored_nk:
                    weight = insert_call(graph, self.out, aten.permute.default, (weight, [0, 2, 1]))
                    permutes.append(weight)
                grouped[linear] = replace(linear, weight=weight, offs=ends, ids=None, stored_nk=False)
            return grouped[linear]

        first = tuple(replace(block, linear=regroup(block.linear)) for block in self.first)
        return replace(self, x=rows, first=first, second=regroup(self.second)), permutes

    def erase(self) -> None:
        erase_unused(self.nodes)

    def describe(self) -> str:
        form = "GLU" if self.is_glu else "plain"
        rows = "" if self.ids is None else ", rows sorted by expert from per-row W[ids] (batched_mm)"
        return f"{self.op}({self.activation}, {form}, {'with' if self.has_bias1 else 'no'} bias1, {self.dtype}){rows}"


def _private(nodes: frozenset[fx.Node], out: fx.Node) -> None:
    """Every node but ``out`` is used only inside the pattern (it disappears with the rewrite)."""
    for node in sorted(nodes - {out}, key=lambda n: n.name):
        outside = [u for u in node.users if u not in nodes]
        # The fused op never materializes its intermediates, so another use would lose its input.
        if outside:
            names = ", ".join(sorted("the graph output (returned, or saved for backward)" if u.op == "output"
                                     else u.name for u in outside))
            raise Refusal(f"the intermediate {node.name} is also used by {names}; npu_ffn does not expose it")


def _activated(node: fx.Node, dtype: torch.dtype) -> Optional[tuple[ActivationMatch, tuple[fx.Node, ...], fx.Node,
                                                                       tuple[fx.Node, ...]]]:
    """``(act, nodes below it, act input source, nodes above it)`` when ``node`` is an activation of
    a value, seen through views and inductor's fp32 up/down casts around it."""
    act_out, below = _strip_up(node, frozenset({(F32, dtype)}))
    act = match_activation(act_out)
    if act is None:
        return None
    source, above = _strip_up(act.input, frozenset({(dtype, F32)}))
    return act, below, source, above


def _match_plain(second: Linear, act: ActivationMatch, below: tuple, source: fx.Node,
                 above: tuple) -> Optional[FfnMatch]:
    first = _linear_ending_at(source)
    if first is None:
        return None
    if act.kind not in PLAIN_ACTIVATIONS:
        raise Refusal(_ACTIVATION_REFUSALS.get(act.kind, f"npu_ffn has no {act.kind} activation"))
    nodes = frozenset(first.nodes + above + act.nodes + below + second.nodes)
    return FfnMatch(PLAIN_ACTIVATIONS[act.kind], first.x, (Columns(first, 0, first.n, ()),), second, nodes)


def _without_zero_offset(factor: fx.Node) -> fx.Node:
    """``x`` for ``factor = x + 0`` (Megatron's GLU adds ``glu_linear_offset``, 0 by default, to the
    linear half: the sum is ``x`` up to the sign of a zero, which the product turns into a zero
    either way), else ``factor``. Any other offset is refused: npu_ffn's GLU adds none."""
    if not (is_op(factor, aten.add.Tensor) and len(factor.args) == 2 and not factor.kwargs
            and isinstance(factor.args[1], (int, float)) and isinstance(factor.args[0], fx.Node)):
        return factor
    offset = factor.args[1]
    if offset != 0:
        raise Refusal(f"the GLU's linear half adds an offset ({offset}, Megatron's glu_linear_offset); "
                      "npu_ffn computes left * f(right) without one")
    return factor.args[0]


def _match_glu(second: Linear, mul: fx.Node, below_mul: tuple, dtype: torch.dtype) -> Optional[FfnMatch]:
    factors = mul.args[:2]
    if not all(isinstance(f, fx.Node) for f in factors) or not _same_shape(*factors):
        return None          # a broadcasting product is not an elementwise GLU
    activated = [_activated(f, dtype) for f in factors]
    if all(a is None for a in activated):
        return None
    if all(a is not None for a in activated):
        raise Refusal("both factors of the product are activated; npu_ffn's GLU computes left * f(right) "
                       "with a raw left half")
    gate_index = 0 if activated[0] is not None else 1
    act, below, source, above = activated[gate_index]
    right = _columns(source)
    linear_half = factors[1 - gate_index]
    offset_free = _without_zero_offset(linear_half)
    left = _columns(offset_free)
    if left is not None and offset_free is not linear_half:
        left = replace(left, nodes=left.nodes + (linear_half,))      # the "+ 0" goes with the match
    if left is None or right is None:
        return None
    if act.kind not in GLU_ACTIVATIONS:
        raise Refusal(_ACTIVATION_REFUSALS.get(act.kind, f"npu_ffn has no GLU form of {act.kind}"))
    # left * f(right) needs column blocks of matmuls of one x; the factors' equal shapes then make
    # the blocks equally wide (the same M rows).
    if not _same_value(left.linear.x, right.linear.x):
        raise Refusal(f"the GLU factors come from matmuls of different inputs ({left.linear.x.name}, "
                       f"{right.linear.x.name})")
    if (left.linear.bias is None) != (right.linear.bias is None):
        raise Refusal("only one of the gate/up projections has a bias")
    nodes = frozenset(left.nodes + right.nodes + left.linear.nodes + right.linear.nodes + above + act.nodes + below
                      + (mul,) + below_mul + second.nodes)
    return FfnMatch(GLU_ACTIVATIONS[act.kind], left.linear.x, (left, right), second, nodes)


def read_ffn(mm: fx.Node) -> Optional[FfnMatch]:
    """The FFN whose second matmul is ``mm``, None when it is no FFN; raises Refusal."""
    second = _second_linear(mm)
    if second is None:
        return None
    dtype = val(second.x).dtype
    activated = _activated(second.x, dtype)
    if activated is not None:
        found = _match_plain(second, *activated)
    else:
        product, below = _strip_up(second.x, frozenset({(F32, dtype)}))
        if not is_op(product, aten.mul.Tensor):
            return None
        found = _match_glu(second, product, below, dtype)
    if found is None:
        return None
    # npu_ffn computes in one dtype: x, W1 and W2 (mm forces x and W to agree).
    if found.dtype != dtype:
        raise Refusal(f"the two matmuls run in different dtypes ({found.dtype}, {dtype})")
    _check_segments(found)
    _private(found.nodes, found.out)
    return found



def _check_segments(found: FfnMatch) -> None:
    """Both linears of a grouped FFN are grouped over the same segments (one ``offs`` node), both of
    a gathered FFN gather by the same ids, in range (``_check_gathered``); a grouped or gathered
    matmul never pairs with another kind."""
    linears = [block.linear for block in found.first] + [found.second]
    offs, ids = {linear.offs for linear in linears}, {linear.ids for linear in linears}
    if len(offs) > 1:
        if None in offs:
            raise Refusal("one matmul of the FFN is grouped (per-expert row segments) and the other is not")
        raise Refusal("the two grouped matmuls use different segment offsets ("
                      + ", ".join(sorted(o.name for o in offs)) + "); npu_ffn_grouped has one expert_tokens")
    if len(ids) > 1:
        if None in ids:
            raise Refusal("one matmul of the FFN gathers per-row expert weights (W[ids]) and the other does not")
        raise Refusal("the two matmuls gather expert weights by different ids ("
                      + ", ".join(sorted(i.name for i in ids)) + "); the rows are sorted by one expert id each")
    if found.ids is not None:
        _check_gathered(found.ids, linears)


def _check_gathered(ids: fx.Node, linears: Sequence[Linear]) -> None:
    """Sorting the rows of a gathered FFN by ``ids`` ``(S,)`` makes each expert's rows one segment
    exactly when every id is in ``[0, E)`` for every stack ``(E, ., .)`` gathered (an id ``< 0``
    indexes from the end, one ``>= E`` fails). Proven when the ids are (views of) the indices of a
    ``topk`` over a dim of at most ``E`` entries, i.e. the router's expert choices; anything else is
    refused."""
    source, _ = _strip_up(ids)
    topk = source.args[0] if source.target is operator.getitem and source.args[1] == 1 else None
    if not is_op(topk, aten.topk):
        raise Refusal(f"the expert weights are gathered by {ids.name} (W[ids]), which are not the indices of a "
                      "topk over the experts (the routing ids), so they are not known to lie in [0, E); sorting "
                      "the rows by them into npu_ffn_grouped's expert segments is not proven exact")
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    choices = val(topk.args[0]).size(dim)
    stacks = {linear.weight.name: val(linear.weight).size(0) for linear in linears}
    experts = next(iter(stacks.values()))
    if len(set(stacks.values())) != 1 or not isinstance(experts, int):
        raise Refusal(f"the gathered expert stacks hold {stacks} experts; npu_ffn_grouped needs one static E")
    if not statically_known_true(choices <= experts):
        raise Refusal(f"the routing ids choose among {choices} experts but the stacks hold {experts}; "
                      "npu_ffn_grouped needs every id in [0, E)")


def find_ffn_forms(graph: fx.Graph, ctx: Optional[PassContext] = None, pattern: str = "ffn") -> list[FfnMatch]:
    """Every plain/GLU FFN of the graph, one per second matmul; refusals go to ``ctx`` under ``pattern``."""
    found = []
    for node in graph.nodes:
        if is_op(node, aten.mm, aten.addmm) or _grouped_mm(node) is not None or _gathered_mm(node) is not None:
            match = attempt(ctx, pattern, node, lambda: read_ffn(node))
            if match is not None:
                found.append(match)
    return found


def check_same_form(experts: Sequence[FfnMatch], what: str = "experts") -> None:
    """One npu_ffn / npu_ffn_grouped call has one activation, one dtype, one W1/W2 shape and one
    bias layout for all experts, each a single-expert FFN (not the grouped or gathered form, whose
    weights are already stacks); raises Refusal naming the first that differs."""
    reference = experts[0]
    for e in experts:
        if e.offs is not None or e.ids is not None:
            raise Refusal(f"the {what} include {e.describe()}, already one FFN over several experts' weights; "
                          "stacking per-expert weights needs single-expert FFNs")
    for e in experts[1:]:
        same = (e.activation == reference.activation and e.has_bias1 == reference.has_bias1
                and (e.second.bias is None) == (reference.second.bias is None) and e.dtype == reference.dtype
                and len(e.first) == len(reference.first) and _same_shape(e.second.weight, reference.second.weight)
                and all(same_size(a.width, b.width) and _same_shape(a.linear.weight, b.linear.weight)
                        for a, b in zip(e.first, reference.first)))
        if not same:
            raise Refusal(f"the {what} differ in activation, dtype, bias or weight shapes ({reference.describe()} vs "
                          f"{e.describe()}); one fused FFN call needs them equal")
