"""Module route ``megatron_moe``: megatron-core's ``MoELayer`` (0.16) with the all-to-all or the all-gather
token dispatcher and ``SequentialMLP`` or ``GroupedMLP`` experts, as dispatch_v2 -> grouped FFN -> combine_v2
over its EP group.

Megatron's all-to-all dispatcher cannot be captured as one graph (split sizes read to the host as
numpy arrays for ``all_to_all_single``, ``.tolist()`` of the per-expert counts, CUDA side streams
for the device-to-host copies); its all-gather dispatcher (every rank gathers every token, runs its
local experts on the ones routed to them, reduce-scatters the weighted outputs back) permutes with
``.item()``-sized sorts and ``masked_select``. Without tensor parallelism both compute the same
per-token sum of the routed experts' outputs weighted by their probs. The swapped forward keeps the
layer's own router call (``self.route``: gating, top-k, token dropping, aux losses) and shared
experts, and replaces the dispatcher and experts with the fused ops:

* ``expert_ids`` ``(T, K)``: the experts of each token's ``routing_map`` row (top-k of the map);
  ``expert_scales``: ``probs`` at those experts. Megatron's expert MLP multiplies the activation by
  the token's prob before ``linear_fc2`` (and the fc2 bias by it after): by linearity
  ``p * (act(x W1 + b1) W2 + b2)``, which is combine's weighted sum.
* With ``moe_apply_probs_on_input`` (top-1 only, as Megatron asserts) the tokens are scaled by
  their prob before dispatch and combine's weights are 1, as Megatron does.
* Token dropping by a capacity factor (without padding to capacity) leaves fewer than K experts
  in a row of ``routing_map``: the slots of dropped copies are masked out with dispatch's and
  combine's 2-D ``x_active_mask`` (a token with every copy dropped gives 0, as Megatron's unpermute).
* ``SequentialMLP``: the local experts' ``linear_fc1`` / ``linear_fc2`` weights, stacked, are
  ``npu_ffn_grouped``'s ``(L, H, N1)`` / ``(L, F, H)``. ``GroupedMLP`` (the legacy grouped-GEMM experts,
  no biases) already holds them so: its ``weight1`` ``(H, L * N1)`` and ``weight2`` ``(L * F, H)`` are
  read through the same views its grouped GEMMs take, ``(L, H, N1)`` and ``(L, F, H)``. Megatron's GLU
  is ``act(first half) * second half`` in both; the op's ``second-half-activated`` form gets fc1's
  halves swapped.
* Experts whose activation the op has no exact form of (erf GELU, squared ReLU, GLU of quick GELU,
  clamped or offset GLUs, TE activations): the largest exact part fuses, dispatch_v2 -> the layer's
  own experts over the dispatched rows (``_own_experts``, probs of 1) -> combine_v2; the report says
  the experts were left unfused and why. So do bf16/fp16 experts of the all-gather dispatcher that
  the cost gate finds slower fused (``_own_experts_reason``): plain inductor cannot run that
  dispatcher, so the layer is not handed back to it.

Refused (the report says which): other dispatchers and expert modules, tensor / expert tensor
parallelism, padding to capacity, router padding for quantization, expert configs Megatron's own MLP
raises on (``_megatron_raises``), FP8/FP4, latent projections, CUDA graphs, recomputation of the
whole layer; under inductor's cost gate off Ascend, also the all-to-all dispatcher over more than
one rank (``cost.refuse_unpadded_exchange``).
Every rank of the EP group decides the same: the candidate depends on the config, the device type,
the gate and this machine's native matmul units, and both it and the first-call verdict are the MIN
over the group (``agree``, called by ``module_routes`` before any swapped forward runs).
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .context import Refusal
from .cost import refuse_slower_ffn, refuse_unpadded_exchange

LAYER = ("megatron.core.transformer.moe.moe_layer", "MoELayer")
# The dispatchers the route replaces -> their name in the report.
DISPATCHERS = {"MoEAlltoAllTokenDispatcher": "alltoall", "MoEAllGatherTokenDispatcher": "allgather"}
EXPERTS = ("SequentialMLP", "GroupedMLP")      # the expert modules whose weights the route reads


def is_megatron_moe_layer(module: torch.nn.Module) -> bool:
    """An instance of megatron-core's ``MoELayer`` (or a subclass), told by class module and name so
    that megatron is never imported here."""
    return any((cls.__module__, cls.__name__) == LAYER for cls in type(module).__mro__)


def _activation(config: Any) -> str:
    """``npu_ffn_grouped``'s name of the experts' activation; raises ``Refusal`` (why) where the op has
    no exact form of it: the route then keeps the layer's own experts (``_expert_form``)."""
    f, glu = config.activation_func, bool(config.gated_linear_unit)
    if getattr(config, "use_te_activation_func", False):
        raise Refusal("TE activation modules (use_te_activation_func)")
    if glu and (getattr(config, "glu_linear_offset", 0.0) or getattr(config, "activation_func_clamp_value", None)
                is not None):
        raise Refusal("GLU with glu_linear_offset / activation_func_clamp_value (no such form in npu_ffn_grouped)")
    base = _activation_base(f)
    if base is None:
        raise Refusal(f"activation {getattr(f, '__name__', f)!r}: npu_ffn_grouped has relu, silu, tanh-GELU "
                      f"and x*sigmoid(1.702x) only (its gelu is the tanh form, not erf)")
    if glu:
        name = {"silu": "swiglu", "relu": "reglu", "gelu": "geglu"}.get(base)
        if name is None:
            raise Refusal(f"GLU of {base}: npu_ffn_grouped's GLU forms are swiglu, reglu, geglu")
        return name
    return base


def _expert_form(config: Any) -> tuple[Optional[str], Optional[str]]:
    """``(activation, None)`` when ``npu_ffn_grouped`` computes the experts, ``(None, why not)`` when
    the layer's own experts run between dispatch and combine (the largest exact part fused)."""
    try:
        return _activation(config), None
    except Refusal as why:
        return None, str(why)


def _own_experts_reason(layer: torch.nn.Module) -> Optional[str]:
    """Why the layer's own experts run between the fused dispatch and combine, or None when
    ``npu_ffn_grouped`` computes them: an activation the op lacks, or, with the all-gather dispatcher,
    a low-precision FFN the cost gate finds slower fused (plain inductor cannot run that dispatcher,
    so the layer stays routed, its experts as they are)."""
    why = _expert_form(layer.experts.config)[1]
    if why is None and DISPATCHERS[type(layer.token_dispatcher).__name__] == "allgather":
        weight = _fc1_weight(layer.experts)
        try:
            refuse_slower_ffn(weight.dtype, weight.device)
        except Refusal as slower:
            why = str(slower)
    return why


def _megatron_raises(config: Any) -> Optional[str]:
    """Why Megatron's own expert MLP raises on ``config`` (it is given per-token probs), or None:
    with ``bias_activation_fusion`` it has weighted fused forms of SwiGLU and quick-GeGLU only (the
    latter for ``fused_bias_geglu.quick_gelu`` itself, which its MLP compares by identity)."""
    f = config.activation_func
    fused_quick_gelu = (getattr(f, "__module__", ""), getattr(f, "__name__", "")) == (
        "megatron.core.fusions.fused_bias_geglu", "quick_gelu")
    if config.bias_activation_fusion and not (config.gated_linear_unit and (f is F.silu or fused_quick_gelu)):
        return "bias_activation_fusion other than with SwiGLU or quick-GeGLU (Megatron's expert MLP raises)"
    return None


def _activation_base(f: Callable) -> Optional[str]:
    if f in (F.silu,):
        return "silu"
    if f in (F.relu, torch.relu):
        return "relu"
    if isinstance(f, functools.partial) and f.func is F.gelu and not f.args \
            and f.keywords == {"approximate": "tanh"}:
        return "gelu"
    module, name = getattr(f, "__module__", ""), getattr(f, "__name__", "")
    if (module, name) in {("megatron.core.activations", "fast_gelu"),
                          ("megatron.core.transformer.utils", "openai_gelu")}:
        return "gelu"       # 0.5 x (1 + tanh(0.79788456 (x + 0.044715 x^3))): the op's gelu
    if (module, name) in {("megatron.core.activations", "quick_gelu"),
                          ("megatron.core.fusions.fused_bias_geglu", "quick_gelu")}:
        return "fastgelu"   # x * sigmoid(1.702 x)
    return None


def _layer_refusal(layer: torch.nn.Module) -> Optional[str]:
    """Why the swapped forward would not compute what ``layer`` computes, or None."""
    config = layer.config
    dispatcher = type(layer.token_dispatcher).__name__
    if dispatcher not in DISPATCHERS:
        return f"token dispatcher {dispatcher} (the route replaces {' and '.join(DISPATCHERS)})"
    if type(layer.experts).__name__ not in EXPERTS:
        return f"experts {type(layer.experts).__name__} (the route reads the weights of {' and '.join(EXPERTS)})"
    if layer.attn_tp_group.size() > 1 or layer.token_dispatcher.tp_size > 1:
        return "tensor / expert tensor parallelism (dispatch over EP only)"
    checks = (
        (config.moe_pad_expert_input_to_capacity,
         "padding to capacity (routes tokens to more than K experts with zero weight)"),
        (config.moe_router_padding_for_quantization, "router padding for quantization"),
        (config.fp8 or config.fp4, "FP8/FP4 experts"),
        (config.moe_latent_size, "latent projections (moe_latent_size)"),
        (config.cuda_graph_impl != "none", f"CUDA graphs ({config.cuda_graph_impl})"),
        (layer.moe_layer_recompute, "recomputation of the MoE layer (the swapped forward would not recompute)"),
        (config.moe_apply_probs_on_input and config.moe_router_topk != 1, "moe_apply_probs_on_input with top-k > 1"),
        (getattr(config, "gradient_accumulation_fusion", False), "gradient_accumulation_fusion (main_grad)"),
    )
    for refused, why in checks:
        if refused:
            return why
    for expert in getattr(layer.experts, "local_experts", ()):      # SequentialMLP's
        for linear in (expert.linear_fc1, expert.linear_fc2):
            if type(linear).__name__ not in ("ColumnParallelLinear", "RowParallelLinear"):
                return f"expert linear {type(linear).__name__} (local ColumnParallelLinear / RowParallelLinear only)"
    if layer.config.add_bias_linear and config.bias_activation_fusion:
        return "fc1 bias with bias_activation_fusion (Megatron's weighted SwiGLU raises)"
    return _megatron_raises(layer.experts.config)


def candidate(module: torch.nn.Module) -> Optional[str]:
    """What the route swaps in ``module`` (a megatron ``MoELayer``); raises ``Refusal`` with the
    reason for a layer it cannot express exactly; None for any other module."""
    if not is_megatron_moe_layer(module):
        return None
    why = _layer_refusal(module)
    if why is not None:
        raise Refusal(why)
    weight = _fc1_weight(module.experts)
    dispatcher = DISPATCHERS[type(module.token_dispatcher).__name__]
    if dispatcher == "alltoall" and module.ep_group.size() > 1:    # first: it holds whatever the dtype
        refuse_unpadded_exchange("Megatron's all-to-all token dispatcher", weight.device)
    act, kept = _expert_form(module.experts.config)[0], _own_experts_reason(module)
    if kept is None:            # (the layer's own experts are no fused FFN to be slower)
        refuse_slower_ffn(weight.dtype, weight.device)
    experts = f"npu_ffn_grouped({act})" if kept is None else f"the layer's own experts, left unfused ({kept})"
    shared = ", shared experts added" if module.shared_experts is not None else ""
    return (f"Megatron MoELayer ({dispatcher}, {type(module.experts).__name__} x{module.num_local_experts}) -> "
            f"npu_moe_distribute_dispatch_v2 / {experts} / npu_moe_distribute_combine_v2 "
            f"over EP {module.ep_group.size()}{shared}")


def graph_break(module: torch.nn.Module) -> Optional[str]:
    """Why a candidate's swapped forward leaves part of ``module`` outside the graph, or None."""
    kept = _own_experts_reason(module)
    return None if kept is None else f"runs the layer's own experts outside the graph, eagerly ({kept})"


def untraceable(module: torch.nn.Module) -> Optional[str]:
    """Why ``module``, a Megatron layer running its own forward, cannot be traced with data-dependent
    counts captured, or None: the all-to-all dispatcher with several local experts reorders its
    chunks by a Python list of them (``sort_chunks_by_idxs``)."""
    if not is_megatron_moe_layer(module) or module.num_local_experts < 2:
        return None
    if DISPATCHERS.get(type(module.token_dispatcher).__name__) != "alltoall":
        return None
    return ("Megatron's all-to-all dispatcher orders its chunks by data-dependent counts as Python list indices "
            "(sort_chunks_by_idxs)")


def _is_grouped(experts: torch.nn.Module) -> bool:
    """Megatron's legacy ``GroupedMLP`` (every local expert in one weight), not ``SequentialMLP``."""
    return type(experts).__name__ == "GroupedMLP"


def _fc1_weight(experts: torch.nn.Module) -> torch.Tensor:
    """The first local expert's fc1 weight (``GroupedMLP``: all of them in one)."""
    if _is_grouped(experts):
        return experts.weight1
    return experts.local_experts[0].linear_fc1.weight


def swap(layer: torch.nn.Module) -> Callable[[], None]:
    layer.forward = types.MethodType(_routed_forward(layer), layer)
    return lambda: delattr(layer, "forward")


def agree(layer: torch.nn.Module, ok: bool) -> bool:
    """Every rank of ``layer``'s EP group keeps the swap only if all of them may (MIN of the flag)."""
    group = layer.ep_group
    if group.size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _routed_forward(layer: torch.nn.Module) -> Callable[..., Any]:
    from ..functional import npu_ffn_grouped, npu_moe_distribute_combine_v2, npu_moe_distribute_dispatch_v2

    config = layer.config
    group, world, rank = layer.ep_group, layer.ep_group.size(), layer.ep_group.rank()
    group_name = group.group_name if world > 1 else ""
    experts_total, top_k = config.num_moe_experts, config.moe_router_topk
    activation = None if _own_experts_reason(layer) else _expert_form(layer.experts.config)[0]
    glu = activation in ("swiglu", "reglu", "geglu")
    probs_on_input = bool(config.moe_apply_probs_on_input)
    may_drop = config.moe_expert_capacity_factor is not None
    grouped = _is_grouped(layer.experts)
    original = type(layer).forward

    def op_glu_order(fc1: torch.Tensor, dim: int) -> torch.Tensor:
        """``fc1``'s output columns (along ``dim``) in the op's GLU order: Megatron activates the first
        half, the op the second, so the halves are swapped (a copy); as they are without GLU."""
        return torch.cat(fc1.chunk(2, dim=dim)[::-1], dim=dim) if glu else fc1

    def expert_weights(self: torch.nn.Module) -> tuple:
        """``(L, H, N1)``, ``(L, F, H)`` and the biases of the local experts (fc1's halves swapped for GLU)."""
        if grouped:         # GroupedMLP's views for its grouped GEMMs; it has no biases
            hidden = self.experts.config.hidden_size
            w1 = op_glu_order(self.experts.weight1.view(self.num_local_experts, hidden, -1), 2)
            return w1, self.experts.weight2.view(self.num_local_experts, -1, hidden), None, None
        mlps = self.experts.local_experts
        w1 = op_glu_order(torch.stack([m.linear_fc1.weight for m in mlps]), 1)     # (L, N1, H)
        w2 = torch.stack([m.linear_fc2.weight for m in mlps])           # (L, H, F)
        b1 = b2 = None
        if mlps[0].linear_fc1.bias is not None:
            b1 = op_glu_order(torch.stack([m.linear_fc1.bias for m in mlps]), 1)
            b2 = torch.stack([m.linear_fc2.bias for m in mlps])
            if w1.dtype != torch.float16:
                b1, b2 = b1.float(), b2.float()
        return w1.transpose(1, 2), w2.transpose(1, 2), b1, b2

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor, intermediate_tensors: Any = None,
                padding_mask: Optional[torch.Tensor] = None) -> tuple:
        if intermediate_tensors is not None:     # partial (CUDA graph) execution: Megatron's own forward
            return original(self, hidden_states, intermediate_tensors, padding_mask)
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        if self.shared_expert_overlap:
            shared = self.shared_experts(hidden_states)
        else:
            shared = self.shared_experts_compute(hidden_states)
        probs, routing_map = self.route(hidden_states, padding_mask)
        tokens = hidden_states.reshape(-1, hidden_states.size(-1))
        expert_ids = torch.topk(routing_map.to(torch.float32), top_k, dim=1).indices
        mask = routing_map.gather(1, expert_ids) if may_drop else None
        weights = probs.gather(1, expert_ids)
        if probs_on_input:
            tokens = (weights * tokens).to(tokens.dtype)
            weights = torch.ones_like(weights)
        expert_ids = expert_ids.to(torch.int32)
        expand_x, _, assist, token_nums, recv_counts, _, _ = npu_moe_distribute_dispatch_v2(
            tokens, expert_ids, group_name, world, rank, experts_total, x_active_mask=mask)
        if activation is None:
            expert_out = _own_experts(self, expand_x, token_nums, weights.dtype)
        else:
            w1, w2, b1, b2 = expert_weights(self)
            expert_out = npu_ffn_grouped(expand_x, w1, w2, activation, expert_tokens=token_nums, bias1=b1, bias2=b2)
        output = npu_moe_distribute_combine_v2(
            expert_out, expert_ids, assist, recv_counts, weights.float(), group_name, world, rank, experts_total,
            x_active_mask=mask)
        output = output.view(hidden_states.shape)
        if shared is not None:
            output = output + shared
        return output, None

    return forward


# Run eagerly, outside any compiled graph: Megatron's expert linears warn on global rank 0 only, which
# would break rank 0's graph alone, and ranks whose graphs differ meet in different collectives.
@torch._dynamo.disable
def _own_experts(layer: torch.nn.Module, expand_x: torch.Tensor, token_nums: torch.Tensor,
                 probs_dtype: torch.dtype) -> torch.Tensor:
    """The layer's own experts over dispatch's rows: ``expand_x`` ``(A, H)`` holds ``token_nums``
    ``(L,)`` int64 rows per local expert first, then padding. Returns ``(A, H)`` in its dtype, the
    padding rows zero. Each row's prob is 1 (exact): combine weighs the rows by the router's probs."""
    rows = int(token_nums.sum())
    ones = torch.ones(rows, dtype=probs_dtype, device=expand_x.device)
    # On the host, as Megatron's dispatchers pass them: GroupedMLP's grouped_gemm requires it.
    out, bias = layer.experts(expand_x[:rows], token_nums.cpu(), ones)
    if bias is not None:
        out = out + bias
    return F.pad(out, (0, 0, 0, expand_x.size(0) - rows))
