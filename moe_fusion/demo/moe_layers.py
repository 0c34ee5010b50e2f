"""Two unfused expert-parallel MoE layers in plain PyTorch, as static-graph MoE code writes them.

Nothing here mentions moe_fusion: these are the graphs the ``moe_allgather_ep`` and
``moe_capacity_a2a`` passes rewrite into ``dispatch_v2 -> npu_ffn_grouped -> combine_v2``.
Both route each token to its top-k experts (softmax gate, weights renormalized over the top k),
hold ``E / ep`` whole experts per EP rank (rank ``r`` owns experts ``[r*L, (r+1)*L)``) and may add
a shared expert on the local tokens::

    AllGatherEPMoE:      all_gather(x, ids, weights) -> sum_e w_e(token) * expert_e(all tokens)
                         -> reduce_scatter
    CapacityAllToAllMoE: combine_weights (S, E, C) -> einsum dispatch (E, C, H) -> all_to_all
                         -> expert_e(its slots) -> all_to_all -> einsum combine (S, H)

Weights are drawn from ``seed`` for the whole model (gate and every global expert), so every rank
builds the same model and keeps its own experts.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

Tensor = torch.Tensor
ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": lambda h: F.gelu(h, approximate="tanh")}


class Expert(torch.nn.Module):
    """``w2(act(w1(x)))``, no biases; ``activation="swiglu"`` is ``w2(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, ffn_hidden: int, activation: str, generator: torch.Generator,
                 dtype: torch.dtype) -> None:
        super().__init__()
        if activation not in ACTIVATIONS and activation != "swiglu":
            raise ValueError(f"Expert: activation must be one of {sorted(ACTIVATIONS) + ['swiglu']}, got {activation!r}")
        self.activation = activation
        self.w1 = _linear(hidden, ffn_hidden, generator, dtype)
        self.up = _linear(hidden, ffn_hidden, generator, dtype) if activation == "swiglu" else None
        self.w2 = _linear(ffn_hidden, hidden, generator, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.up is not None:
            return self.w2(F.silu(self.w1(x)) * self.up(x))
        return self.w2(ACTIVATIONS[self.activation](self.w1(x)))


def _linear(n_in: int, n_out: int, generator: torch.Generator, dtype: torch.dtype) -> torch.nn.Linear:
    layer = torch.nn.Linear(n_in, n_out, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=generator) / math.sqrt(n_in))
    return layer


class _TopKMoE(torch.nn.Module):
    """Gate, local experts and optional shared expert shared by both layers.

    Args:
        hidden, ffn_hidden: ``H`` and the expert FFN size.
        num_experts: ``E``, a multiple of the EP group size.
        top_k: experts per token.
        ep_group: the expert-parallel process group.
        shared_expert: add ``shared(x)`` (an FFN of the same sizes) to every token's output.
        activation: expert activation, ``silu``, ``relu``, ``gelu`` (tanh) or ``swiglu``.
        dtype: parameter and activation dtype; the softmax and top-k run in fp32.
        seed: seed of every weight.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, *, ep_group: dist.ProcessGroup,
                 shared_expert: bool = False, activation: str = "silu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        super().__init__()
        self.group = ep_group
        self.ep, self.ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        if num_experts % self.ep:
            raise ValueError(f"{type(self).__name__}: E={num_experts} must be a multiple of the EP size {self.ep}")
        self.num_experts, self.top_k = num_experts, top_k
        self.local_experts = num_experts // self.ep
        self.first_expert = self.ep_rank * self.local_experts
        self.gate = _linear(hidden, num_experts, torch.Generator().manual_seed(seed), dtype)
        self.experts = torch.nn.ModuleList(
            Expert(hidden, ffn_hidden, activation, torch.Generator().manual_seed(seed + 1 + e), dtype)
            for e in range(self.first_expert, self.first_expert + self.local_experts))
        self.shared = (Expert(hidden, ffn_hidden, activation, torch.Generator().manual_seed(seed + 1 + num_experts),
                              dtype) if shared_expert else None)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights, ids)`` ``(S, K)``: fp32 top-k softmax probabilities renormalized to sum to 1, int64 ids."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

    def add_shared(self, y: Tensor, x: Tensor) -> Tensor:
        return y if self.shared is None else y + self.shared(x)


class AllGatherEPMoE(_TopKMoE):
    """Every EP rank gathers all tokens, runs each local expert densely on all of them, weighted by
    that expert's top-k weight per token (zero when not routed there), and reduce-scatters the sum.

    ``x`` ``(S, H)`` -> ``(S, H)``, same dtype; ``S`` is the same on every rank.
    """

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = self.route(x)
        weights = weights.to(x.dtype)
        gathered_x = x.new_empty((self.ep * x.size(0), x.size(1)))
        dist.all_gather_into_tensor(gathered_x, x, group=self.group)
        gathered_ids = ids.new_empty((self.ep * ids.size(0), ids.size(1)))
        dist.all_gather_into_tensor(gathered_ids, ids, group=self.group)
        gathered_w = weights.new_empty((self.ep * weights.size(0), weights.size(1)))
        dist.all_gather_into_tensor(gathered_w, weights, group=self.group)

        out = torch.zeros_like(gathered_x)
        for i, expert in enumerate(self.experts):
            token_weight = (gathered_w * (gathered_ids == self.first_expert + i)).sum(dim=-1, keepdim=True)
            out = out + expert(gathered_x) * token_weight
        y = x.new_empty(x.shape)
        dist.reduce_scatter_tensor(y, out, group=self.group)
        return self.add_shared(y, x)


class CapacityAllToAllMoE(_TopKMoE):
    """GShard/DeepSpeed capacity routing: tokens take slots ``c < C`` of their experts (first choices
    first, token order), a dispatch einsum builds ``(E, C, H)``, all_to_all sends each expert's slots
    to its rank, the outputs return by all_to_all and a combine einsum weights them back.

    Args (besides ``_TopKMoE``'s):
        capacity_factor: ``C = ceil(S * K * capacity_factor / E)``; ``None`` gives ``C = S``, where
            no token can be dropped. Tokens past an expert's capacity are dropped (output 0).
    """

    def __init__(self, *args, capacity_factor: Optional[float] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int:
        if self.capacity_factor is None:
            return num_tokens
        return max(1, math.ceil(num_tokens * self.top_k * self.capacity_factor / self.num_experts))

    def combine_weights(self, weights: Tensor, ids: Tensor, capacity: int) -> Tensor:
        """``(S, E, C)`` fp32: the weight of token ``s`` in slot ``c`` of expert ``e``."""
        num_tokens, top_k = ids.shape
        mask = F.one_hot(ids, self.num_experts)                                 # (S, K, E)
        # Slots go to first choices before second ones, in token order (DeepSpeed's priority).
        by_choice = mask.transpose(0, 1).reshape(top_k * num_tokens, self.num_experts)
        locations = (torch.cumsum(by_choice, dim=0) - 1).reshape(top_k, num_tokens, self.num_experts).transpose(0, 1)
        mask = mask * (locations < capacity)                                    # drop tokens beyond capacity
        slot = (locations * mask).sum(dim=-1)                                   # (S, K)
        gates = weights.unsqueeze(-1) * mask                                    # (S, K, E)
        return torch.einsum("ske,skc->sec", gates, F.one_hot(slot, capacity).to(gates.dtype))

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = self.route(x)
        capacity = self.capacity(x.size(0))
        combine = self.combine_weights(weights, ids, capacity)                 # (S, E, C)
        dispatch_mask = combine.bool().to(x.dtype)
        dispatched = torch.einsum("sec,sm->ecm", dispatch_mask, x)             # (E, C, H)
        received = torch.empty_like(dispatched)
        dist.all_to_all_single(received, dispatched, group=self.group)
        # (source rank, local expert, C, H): each local expert takes its slots from every source.
        received = received.view(self.ep, self.local_experts, capacity, x.size(1))
        outputs = [expert(chunk.reshape(-1, x.size(1))).view(self.ep, 1, capacity, x.size(1))
                   for expert, chunk in zip(self.experts, received.chunk(self.local_experts, dim=1))]
        expert_out = torch.cat(outputs, dim=1).view(self.num_experts, capacity, x.size(1))
        returned = torch.empty_like(expert_out)
        dist.all_to_all_single(returned, expert_out, group=self.group)
        y = torch.einsum("sec,ecm->sm", combine.to(x.dtype), returned)
        return self.add_shared(y, x)


class TrainableAllGatherEPMoE(AllGatherEPMoE):
    """``AllGatherEPMoE`` with differentiable functional collectives (``*_autograd``): the same
    graph for the passes, and an eager step that trains (``dist.*``'s in-place collectives have
    no autograd)."""

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = self.route(x)
        gathered_x = funcol.all_gather_tensor_autograd(x, 0, self.group)
        gathered_ids = funcol.all_gather_tensor(ids, 0, self.group)
        gathered_w = funcol.all_gather_tensor_autograd(weights.to(x.dtype), 0, self.group)
        out = torch.zeros_like(gathered_x)
        for i, expert in enumerate(self.experts):
            token_weight = (gathered_w * (gathered_ids == self.first_expert + i)).sum(dim=-1, keepdim=True)
            out = out + expert(gathered_x) * token_weight
        return self.add_shared(funcol.reduce_scatter_tensor_autograd(out, "sum", 0, self.group), x)


class TrainableCapacityAllToAllMoE(CapacityAllToAllMoE):
    """``CapacityAllToAllMoE`` with differentiable all_to_alls (``all_to_all_single_autograd``)."""

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = self.route(x)
        capacity = self.capacity(x.size(0))
        combine = self.combine_weights(weights, ids, capacity)
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().to(x.dtype), x)
        received = funcol.all_to_all_single_autograd(dispatched, None, None, self.group)
        received = received.view(self.ep, self.local_experts, capacity, x.size(1))
        outputs = [expert(chunk.reshape(-1, x.size(1))).view(self.ep, 1, capacity, x.size(1))
                   for expert, chunk in zip(self.experts, received.chunk(self.local_experts, dim=1))]
        expert_out = torch.cat(outputs, dim=1).view(self.num_experts, capacity, x.size(1))
        returned = funcol.all_to_all_single_autograd(expert_out, None, None, self.group)
        return self.add_shared(torch.einsum("sec,ecm->sm", combine.to(x.dtype), returned), x)
