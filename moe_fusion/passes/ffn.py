"""FFN fusion: ``linear -> activation -> linear`` in a post-grad graph => ``moe_fusion.npu_ffn`` (SPEC §5).

Forms matched (``x`` ``(M, K1)``; 3-D inputs appear as views around the mms):

* plain: ``act(x @ W1 + b1) @ W2 + b2`` with ``act`` in relu, tanh-GELU, silu, fastgelu
  (``x * sigmoid(1.702 x)``); each linear as ``mm``, ``addmm`` or ``mm`` + 1-D bias ``add`` (a
  second bias added after a view back to 3-D stays a separate ``add``).
* GLU: ``left * f(right)`` where ``left`` and ``right`` are column blocks of matmuls of the same
  ``x``: halves of one matmul (``a, b = h.chunk(2, -1)``) or two matmuls (separate gate/up
  projections). ``f`` in relu/tanh-GELU/silu gives reglu/geglu/swiglu. npu_ffn computes
  ``h[:, :N1/2] * f(h[:, N1/2:])`` (SPEC §9 #14), so W1 is ``cat([W_left, W_right], -1)``: the
  *non-activated* factor goes first, whichever chunk it is (a product commutes; only which
  factor is activated matters). W1 is passed unchanged when it already has that layout.
* per expert: ``cat([ffn_e(x[s_e:s_{e+1}]) for e], 0)`` over adjacent static row segments, each
  FFN with its own weights => one ``npu_ffn`` with ``expert_tokens`` and stacked weights.

Refused, with a reason in the fusion report: erf GELU (npu_ffn's "gelu" is the tanh form, SPEC
§9 #15), fastgelu GLU (no such npu_ffn activation), GLU look-alikes (both factors activated,
factors from matmuls of different inputs, one biased projection), intermediates used outside
the pattern, expert segments that overlap or leave gaps or differ in form, and anything the
compile target's npu_ffn rejects (``PROTOS["npu_ffn"].check`` on the fake values, e.g. fp32 or
``N2 != K1`` on A2/A3). Not seen: products that broadcast, chunks along rows, and 1-row matmuls
with N, K <= 16, which inductor decomposes into ``mul`` + ``sum`` on CPU.

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
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..errors import OpValidationError
from ..op_protos import PROTOS
from ._graph import VIEW_OPS, erase_unused, insert_call, is_op, val
from .activations import ActivationMatch, match_activation
from .context import PassContext, Refusal, attempt
from .pipeline import register_pass

aten, prims = torch.ops.aten, torch.ops.prims
PATTERN = "ffn"
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

def _same(a, b) -> bool:
    """Sizes (ints or SymInts) known equal without adding a guard."""
    return statically_known_true(a == b)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = val(a).shape, val(b).shape
    return len(sa) == len(sb) and all(_same(x, y) for x, y in zip(sa, sb))


def _same_value(a: fx.Node, b: fx.Node) -> bool:
    """``a`` and ``b`` hold the same values: the same node or equal views of the same value."""
    if a is b:
        return True
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
    ``nodes`` run from the mm to ``out``."""

    x: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    out: fx.Node
    nodes: tuple[fx.Node, ...]

    @property
    def n(self):
        return val(self.weight).size(-1)


def _mm(node: fx.Node) -> Optional[Linear]:
    """``mm(x, w)`` or ``addmm(b, x, w)`` with a 1-D bias and unit alpha/beta."""
    if is_op(node, aten.mm):
        return Linear(node.args[0], node.args[1], None, node, (node,))
    if is_op(node, aten.addmm) and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        bias, x, w = node.args[:3]
        # A 2-D "bias" is a residual, not a per-column bias.
        if len(val(bias).shape) == 1 and _same(val(bias).size(0), val(w).size(-1)):
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
                and val(bias).dtype == val(mm).dtype and _same(val(bias).size(0), base.n)):
            return Linear(base.x, base.weight, bias, node, (mm,) + tuple(reversed(views)) + (node,))
    return None


def _second_linear(mm: fx.Node) -> Optional[Linear]:
    """The FFN's second linear starting at ``mm``: its bias add is absorbed only when it follows
    the mm directly, so the result is 2-D like npu_ffn's (a bias after a view stays in the graph)."""
    base = _mm(mm)
    if base is None or base.bias is not None or len(mm.users) != 1:
        return base
    with_bias = _linear_ending_at(next(iter(mm.users)), through_views=False)
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

    def build(self, graph: fx.Graph, before: fx.Node, tensor: fx.Node) -> fx.Node:
        """These columns of ``tensor`` (the linear's weight or bias; columns are its last dim)."""
        if self.start == 0 and _same(self.stop, self.linear.n):
            return tensor
        return insert_call(graph, before, aten.slice.Tensor, (tensor, -1, self.start, self.stop))


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
    if linear is None or not _same(val(whole).size(-1), linear.n):
        return None
    return Columns(linear, start, stop, views + (src, src.args[0]) + base_views)


# ---------------------------------------------------------------------------------------------
# Match records
# ---------------------------------------------------------------------------------------------

@dataclass
class FfnMatch:
    """``act(x @ W1 + b1) @ W2 + b2`` in the graph. ``first`` lists W1's column blocks in npu_ffn
    order: one block (plain), or ``(left, right)`` for GLU. ``out`` is the second linear's result
    ``(M, N2)``; ``nodes`` every other node the rewrite makes dead."""

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

    def weight1(self, graph: fx.Graph, before: fx.Node) -> fx.Node:
        """W1 ``(K1, N1)``: the blocks' weight columns, concatenated unless they already are W1."""
        return self._concat(graph, before, "weight")

    def bias1(self, graph: fx.Graph, before: fx.Node) -> Optional[fx.Node]:
        return self._concat(graph, before, "bias") if self.has_bias1 else None

    def _concat(self, graph: fx.Graph, before: fx.Node, field: str) -> fx.Node:
        blocks = self.first
        whole = blocks[0].linear
        if (all(b.linear == whole for b in blocks) and blocks[0].start == 0 and _same(blocks[-1].stop, whole.n)
                and all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))):
            return getattr(whole, field)            # the blocks are W1's columns in order already
        parts = [b.build(graph, before, getattr(b.linear, field)) for b in blocks]
        return insert_call(graph, before, aten.cat.default, (parts, -1))

    def replace_with(self, new: fx.Node) -> None:
        self.out.replace_all_uses_with(new)

    def erase(self) -> None:
        erase_unused(self.nodes | {self.out})

    def describe(self) -> str:
        form = "GLU" if self.is_glu else "plain"
        return f"npu_ffn({self.activation}, {form}, {'with' if self.has_bias1 else 'no'} bias1, {self.dtype})"


@dataclass
class ExpertFfnMatch:
    """``cat([ffn_e(x[s_e:s_{e+1}]) for e], 0)``: per-expert FFNs over adjacent static row segments
    of one 2-D ``source`` ``(rows, K1)``; ``bounds`` are ``s_0 < ... <= s_E``."""

    experts: list[FfnMatch]
    source: fx.Node
    bounds: tuple[int, ...]
    cat: fx.Node

    @property
    def out(self) -> fx.Node:
        return self.cat

    @property
    def anchor(self) -> fx.Node:
        return self.cat

    @property
    def nodes(self) -> frozenset[fx.Node]:
        inner = frozenset().union(*(e.nodes | {e.out} for e in self.experts))
        return inner | {e.x for e in self.experts}

    @property
    def counts(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds, self.bounds[1:])]

    def replace_with(self, new: fx.Node) -> None:
        self.cat.replace_all_uses_with(new)

    def erase(self) -> None:
        erase_unused(self.nodes | {self.cat})

    def describe(self) -> str:
        return f"npu_ffn over {len(self.experts)} experts, expert_tokens={self.counts}: {self.experts[0].describe()}"


Match = Union[FfnMatch, ExpertFfnMatch]


# ---------------------------------------------------------------------------------------------
# Matcher
# ---------------------------------------------------------------------------------------------

def _private(nodes: frozenset[fx.Node], out: fx.Node) -> None:
    """Every node but ``out`` is used only inside the pattern (it disappears with the rewrite)."""
    for node in sorted(nodes, key=lambda n: n.name):
        outside = [u for u in node.users if u not in nodes and u is not out]
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
    nodes = frozenset(first.nodes + above + act.nodes + below + second.nodes[:-1])
    return FfnMatch(PLAIN_ACTIVATIONS[act.kind], first.x, (Columns(first, 0, first.n, ()),), second, nodes)


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
    left = _columns(factors[1 - gate_index])
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
                      + (mul,) + below_mul + second.nodes[:-1])
    return FfnMatch(GLU_ACTIVATIONS[act.kind], left.linear.x, (left, right), second, nodes)


def _match_at(mm: fx.Node) -> Optional[FfnMatch]:
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
    _private(found.nodes, found.out)
    return found


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
    reference = experts[0]
    for e in experts[1:]:
        # One npu_ffn call has one activation, one W1/W2 shape and one bias layout for all experts.
        same = (e.activation == reference.activation and e.has_bias1 == reference.has_bias1
                and (e.second.bias is None) == (reference.second.bias is None) and e.dtype == reference.dtype
                and len(e.first) == len(reference.first) and _same_shape(e.second.weight, reference.second.weight)
                and all(_same(a.width, b.width) and _same_shape(a.linear.weight, b.linear.weight)
                        for a, b in zip(e.first, reference.first)))
        if not same:
            raise Refusal(f"the experts differ in activation, bias or weight shapes ({reference.describe()} vs "
                           f"{e.describe()})")
    for e in experts:
        if len(e.out.users) != 1:
            raise Refusal(f"the output of expert FFN {e.out.name} is also used outside the concatenation")
    bounds = tuple(s[1] for s in slices) + (slices[-1][2],)
    return ExpertFfnMatch(experts, slices[0][0], bounds, cat)


def find_ffn_patterns(graph: fx.Graph, ctx: Optional[PassContext] = None) -> list[Match]:
    """Every FFN candidate, per-expert groups first, then each single FFN (group members
    included, for when their group is refused at rewrite time). Refusals go to ``ctx``."""
    singles: list[FfnMatch] = []
    for node in graph.nodes:
        if not is_op(node, aten.mm, aten.addmm):
            continue
        found = attempt(ctx, PATTERN, node, lambda: _match_at(node))
        if found is not None:
            singles.append(found)
    by_out = {m.out: m for m in singles}
    groups: list[Match] = []
    for node in graph.find_nodes(op="call_function", target=aten.cat.default):
        group = attempt(ctx, PATTERN, node, lambda: _match_experts(node, by_out))
        if group is not None:
            groups.append(group)
    return groups + singles


# ---------------------------------------------------------------------------------------------
# Rewriter
# ---------------------------------------------------------------------------------------------

def _ffn_arguments(graph: fx.Graph, match: Match) -> tuple[tuple, dict]:
    """npu_ffn's args and kwargs; the nodes that build them (W1 cats, expert stacks, bias casts)
    are inserted before ``match.out``."""
    before = match.out
    if isinstance(match, ExpertFfnMatch):
        experts, first = match.experts, match.experts[0]
        x = match.source
        if match.bounds[0] != 0 or match.bounds[-1] != val(x).size(0):
            x = insert_call(graph, before, aten.slice.Tensor, (x, 0, match.bounds[0], match.bounds[-1]))
        w1 = _stack(graph, before, [e.weight1(graph, before) for e in experts])
        w2 = _stack(graph, before, [e.second.weight for e in experts])
        b1 = _stack(graph, before, [e.bias1(graph, before) for e in experts]) if first.has_bias1 else None
        b2 = _stack(graph, before, [e.second.bias for e in experts]) if first.second.bias is not None else None
        kwargs: dict = {"expert_tokens": match.counts}
    else:
        first, x = match, match.x
        w1, w2 = match.weight1(graph, before), match.second.weight
        b1, b2 = match.bias1(graph, before), match.second.bias
        kwargs = {}
    dtype = first.dtype
    # npu_ffn takes fp32 biases with bf16 x (SPEC §5.5); the cast is exact.
    bias_dtype = F32 if dtype == torch.bfloat16 else dtype
    for name, bias in (("bias1", b1), ("bias2", b2)):
        if bias is not None:
            if val(bias).dtype != bias_dtype:
                bias = insert_call(graph, before, prims.convert_element_type.default, (bias, bias_dtype))
            kwargs[name] = bias
    # fp16 GLU runs only with inner_precise=1 on the device, which rounds h like the unfused graph.
    kwargs["inner_precise"] = 1 if first.is_glu and dtype == torch.float16 else 0
    return (x, w1, w2, first.activation), kwargs


def _stack(graph: fx.Graph, before: fx.Node, parts: list[fx.Node]) -> fx.Node:
    """``stack(parts)`` ``(E, ...)``, or the tensor they were selected from (``parts[e] = W[e]``)."""
    whole = parts[0].args[0] if is_op(parts[0], aten.select.int) else None
    if whole is not None and val(whole).size(0) == len(parts) and all(
            is_op(p, aten.select.int) and p.args[0] is whole and p.args[1] == 0 and p.args[2] == e
            for e, p in enumerate(parts)):
        return whole
    # cat of unsqueezed parts, not aten.stack: inductor cannot lower a stack inserted post-grad.
    leading = [insert_call(graph, before, aten.unsqueeze.default, (p, 0)) for p in parts]
    return insert_call(graph, before, aten.cat.default, (leading,))


@register_pass("ffn")
def fuse_ffn(graph: fx.Graph, ctx: PassContext) -> None:
    """Rewrite every FFN candidate into one ``npu_ffn`` call.

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
    Per-expert FFNs over ``x[s_e:s_{e+1}]`` inserted ``stack`` nodes for W1/W2/biases (or reuse
    ``W`` when the experts' weights are ``W[e]``), and the ``cat`` of their outputs becomes
    ``npu_ffn(x, stack, stack_1, act, expert_tokens=[s_1 - s_0, ...])``.

    Every rewrite is checked against the compile target's npu_ffn contract first, on the fake
    values of the arguments; a failing candidate is left unfused with the proto's message.
    """
    proto = PROTOS["npu_ffn"]
    consumed: set[fx.Node] = set()
    for match in find_ffn_patterns(graph, ctx):
        mine = match.nodes | {match.out}
        if mine <= consumed:
            continue        # a member of an expert group that was fused as a whole
        if mine & consumed:
            ctx.refuse(PATTERN, match.anchor, "it shares nodes with an FFN fused already (chained FFNs fuse "
                                              "the first pair only)")
            continue
        before_nodes = set(graph.nodes)
        args, kwargs = _ffn_arguments(graph, match)
        inserted = [n for n in graph.nodes if n not in before_nodes]
        try:
            proto.check(*(val(a) for a in args), **{k: val(v) for k, v in kwargs.items()})
        except OpValidationError as error:
            erase_unused(inserted)
            ctx.refuse(PATTERN, match.anchor, f"npu_ffn would be invalid on target {ctx.target}: {error}")
            continue
        fused = insert_call(graph, match.out, torch.ops.moe_fusion.npu_ffn.default, args, kwargs)
        match.replace_with(fused)
        match.erase()
        consumed |= mine
        ctx.record_fused(PATTERN, fused, match.describe())
