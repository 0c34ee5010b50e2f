"""A DeepSpeed-MoE style expert-parallel layer in plain PyTorch, with tensor-parallel experts.

Nothing in it mentions moe_fusion: it is the unfused code the fusion passes rewrite. The expert
FFN of one rank runs as two batched matmuls over its ``E/ep`` local experts; the communication is
``torch.distributed`` on the EP and TP groups (``None`` means no collective; a group of one rank
communicates with itself, as DeepSpeed code does, so a world of one still holds the collectives)::

    gate -> dispatch einsum (E, C, H) -> all_to_all(EP) -> all_gather(TP) -> permute/reshape
         -> bmm W1 (+b1) -> act -> bmm W2 -> reduce_scatter(TP) (+b2) -> all_to_all(EP) -> combine

With ``ep``/``tp`` the group sizes, ``local = E/ep``, ``C`` the capacity and ``M`` the FFN size:

* ``shard="capacity"``: TP rank ``q`` dispatches the capacity slots ``[q*C/tp, (q+1)*C/tp)``,
  the all-gather over TP collects every slot (``x_shard_type`` 1 of ``npu_alltoall_allgather_bmm``),
  the reduce-scatter hands slot slice ``q`` back (``y_shard_type`` 1), and the TP ranks' partial
  combines are summed with an all-reduce.
* ``shard="hidden"``: TP rank ``q`` dispatches hidden columns ``[q*H/tp, (q+1)*H/tp)``, the
  all-gather collects H (``x_shard_type`` 0), the reduce-scatter hands column slice ``q`` back
  (``y_shard_type`` 0), and the combined column slices are all-gathered into ``(tokens, H)``.

Global rank ``p*tp + q`` is usual but not assumed: shards follow each group's own rank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

Tensor = torch.Tensor
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def _frozen(t: Tensor) -> torch.nn.Parameter:
    """An inference weight: ``torch.distributed``'s in-place collectives have no autograd (gloo
    rejects outputs that require grad); ``TrainableDeepSpeedMoE`` trains."""
    return torch.nn.Parameter(t, requires_grad=False)


def _size_rank(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(size, this process's rank) of ``group``; ``None`` is a group of one."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class DeepSpeedMoE(torch.nn.Module):
    """Top-k softmax gating with capacity dropping, experts sharded over EP (whole experts) and TP
    (columns of W1, rows of W2).

    Args:
        hidden: ``H``, the model size.
        ffn_hidden: ``M``, the expert FFN size (split over TP).
        num_experts: ``E``, a multiple of the EP group size.
        ep_group, tp_group: process groups (``None``: no communication).
        capacity_factor: ``C = ceil(tokens * top_k * capacity_factor / E)``, rounded up to a
            multiple of ``tp`` for ``shard="capacity"``. Tokens beyond an expert's capacity are dropped.
        activation: ``"gelu"`` (erf), ``"silu"`` or ``"relu"``.
        bias: add ``b1`` ``(local, 1, M/tp)`` after the first bmm and ``b2`` after the TP reduction.
        shard: ``"capacity"`` or ``"hidden"`` (see the module docstring).
        dtype: parameter and activation dtype; the gate runs in fp32.
        seed: every rank draws the full weights from this seed and keeps its own slices.
        top_k: experts per token; their gate weights are renormalized to sum to 1 when > 1.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, *, ep_group: Optional[dist.ProcessGroup],
                 tp_group: Optional[dist.ProcessGroup], capacity_factor: float = 1.0, activation: str = "gelu",
                 bias: bool = True, shard: str = "capacity", dtype: torch.dtype = torch.float32, seed: int = 0,
                 top_k: int = 1) -> None:
        super().__init__()
        if shard not in ("capacity", "hidden"):
            raise ValueError(f"DeepSpeedMoE: shard must be 'capacity' or 'hidden', got {shard!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"DeepSpeedMoE: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.ep_group, self.tp_group = ep_group, tp_group
        self.ep, self.ep_rank = _size_rank(ep_group)
        self.tp, self.tp_rank = _size_rank(tp_group)
        if num_experts % self.ep or ffn_hidden % self.tp or (shard == "hidden" and hidden % self.tp):
            raise ValueError(f"DeepSpeedMoE: E={num_experts} must divide by ep={self.ep}, M={ffn_hidden} "
                             f"(and H={hidden} for shard='hidden') by tp={self.tp}")
        self.hidden, self.num_experts, self.local_experts = hidden, num_experts, num_experts // self.ep
        self.capacity_factor, self.top_k, self.shard = capacity_factor, top_k, shard
        self.act = ACTIVATIONS[activation]

        g = torch.Generator().manual_seed(seed)
        wg = torch.randn(hidden, num_experts, generator=g) / math.sqrt(hidden)
        w1 = torch.randn(num_experts, hidden, ffn_hidden, generator=g) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, ffn_hidden, hidden, generator=g) / math.sqrt(ffn_hidden)
        b1 = torch.randn(num_experts, 1, ffn_hidden, generator=g) * 0.1
        b2 = torch.randn(num_experts, 1, hidden, generator=g) * 0.1
        experts = slice(self.ep_rank * self.local_experts, (self.ep_rank + 1) * self.local_experts)
        m = ffn_hidden // self.tp
        cols = slice(self.tp_rank * m, (self.tp_rank + 1) * m)
        self.wg = _frozen(wg)                                           # (H, E) fp32, replicated
        self.w1 = _frozen(w1[experts, :, cols].to(dtype).contiguous())  # (local, H, M/tp)
        self.w2 = _frozen(w2[experts, cols, :].to(dtype).contiguous())  # (local, M/tp, H)
        if bias:
            self.b1 = _frozen(b1[experts, :, cols].to(dtype).contiguous())   # (local, 1, M/tp)
            h_out = self.hidden_slice(hidden)
            self.b2 = _frozen(b2[experts, :, h_out].to(dtype).contiguous())  # (local, 1, H or H/tp)
        else:
            self.b1 = self.b2 = None

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert: ``ceil(tokens * top_k * capacity_factor / E)``, a multiple of tp when sharded."""
        slots = math.ceil(num_tokens * self.top_k * self.capacity_factor / self.num_experts)
        step = self.tp if self.shard == "capacity" else 1
        return max(step, math.ceil(slots / step) * step)

    def hidden_slice(self, hidden: int) -> slice:
        """The hidden columns this rank dispatches and returns (all of them for shard="capacity")."""
        if self.shard == "capacity":
            return slice(0, hidden)
        h = hidden // self.tp
        return slice(self.tp_rank * h, (self.tp_rank + 1) * h)

    def capacity_slice(self, capacity: int) -> slice:
        """The capacity slots this rank dispatches and returns (all of them for shard="hidden")."""
        if self.shard == "hidden":
            return slice(0, capacity)
        c = capacity // self.tp
        return slice(self.tp_rank * c, (self.tp_rank + 1) * c)

    def gate(self, x: Tensor) -> Tensor:
        """``combine_weights`` ``(tokens, E, C)`` fp32: gate weight of token s in slot c of expert e
        (zero for dropped tokens). Slots are taken in token order, first choices before second ones."""
        num_tokens, capacity = x.size(0), self.capacity(x.size(0))
        gates = torch.softmax(x.float() @ self.wg, dim=1)                      # (S, E)
        topk_gates, topk_experts = gates.topk(self.top_k, dim=1)               # (S, k)
        if self.top_k > 1:
            topk_gates = topk_gates / topk_gates.sum(dim=1, keepdim=True)
        combine = x.new_zeros((num_tokens, self.num_experts, capacity), dtype=torch.float32)
        taken = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)   # slots used per expert
        for k in range(self.top_k):
            mask = F.one_hot(topk_experts[:, k], self.num_experts)             # (S, E)
            locations = torch.cumsum(mask, dim=0) - 1 + taken                  # slot of each token in each expert
            taken = taken + mask.sum(dim=0)
            mask = mask * (locations < capacity)                               # drop tokens beyond capacity
            slot = (locations * mask).sum(dim=1)                               # (S,)
            combine = combine + (topk_gates[:, k, None, None] * mask[:, :, None]
                                 * F.one_hot(slot, capacity)[:, None, :])
        return combine

    def experts(self, tokens: Tensor) -> Tensor:
        """``(local, rows, H)`` -> partial sums ``(local, rows, H)`` of this TP rank's columns of M."""
        h = torch.bmm(tokens, self.w1)
        if self.b1 is not None:
            h = h + self.b1
        return torch.bmm(self.act(h), self.w2)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(tokens, H)`` -> ``(tokens, H)``, x's dtype; every TP rank of a group passes the same x."""
        ep, tp, local = self.ep, self.tp, self.local_experts
        combine = self.gate(x)                                                 # (S, E, C)
        cap_slice, hid_slice = self.capacity_slice(combine.size(2)), self.hidden_slice(x.size(1))
        dispatch_mask = (combine[:, :, cap_slice] > 0).to(x.dtype)
        dispatched = torch.einsum("sec,sm->ecm", dispatch_mask, x[:, hid_slice])   # (E, c, h): this rank's shard
        _, c, h = dispatched.shape

        # Send each expert's slots to the EP rank owning it: dim 0 becomes (source EP rank, local expert).
        received = dispatched if self.ep_group is None else self.all_to_all(dispatched, self.ep_group)
        received = received.view(ep, local, c, h).permute(1, 0, 2, 3).contiguous()   # (local, ep, c, h)

        # Collect the TP ranks' shards: (tp, local, ep, c, h) -> (local, ep*C, H).
        gathered = received if self.tp_group is None else self.all_gather(received, self.tp_group)
        gathered = gathered.view(tp, local, ep, c, h)
        if self.shard == "capacity":   # rows (source EP rank, TP rank, slot): every slot of C
            tokens = gathered.permute(1, 2, 0, 3, 4).reshape(local, ep * tp * c, h)
        else:                          # columns (TP rank, hidden): all of H
            tokens = gathered.permute(1, 2, 3, 0, 4).reshape(local, ep * c, tp * h)

        partial = self.experts(tokens)                                         # (local, ep*C, H), summed over TP

        # Reduce over TP, each rank keeping its own slot (or column) slice; then add the bias once.
        if self.shard == "capacity":
            send = partial.view(local, ep, tp, c, h).permute(2, 0, 1, 3, 4)     # (tp, local, ep, c, H)
        else:
            send = partial.view(local, ep, c, tp, h).permute(3, 0, 1, 2, 4)     # (tp, local, ep, C, h)
        send = send.contiguous()
        reduced = send[0] if self.tp_group is None else self.reduce_scatter(send, self.tp_group)
        if self.b2 is not None:
            reduced = reduced + self.b2.view(local, 1, 1, h)

        # Return every expert output to the EP rank its tokens came from.
        outgoing = reduced.permute(1, 0, 2, 3).contiguous()                    # (ep, local, c, h)
        returned = outgoing if self.ep_group is None else self.all_to_all(outgoing, self.ep_group)
        expert_out = returned.view(ep * local, c, h)                           # (E, c, h), by global expert

        out = torch.einsum("sec,ecm->sm", combine[:, :, cap_slice].to(x.dtype), expert_out)   # (S, h)
        if self.tp_group is not None and self.shard == "capacity":     # each TP rank combined its own slots
            out = self.all_reduce(out, self.tp_group)
        elif self.tp_group is not None:                                # each TP rank combined its own columns
            columns = self.all_gather(out.contiguous(), self.tp_group)
            out = columns.view(tp, -1, h).permute(1, 0, 2).reshape(-1, tp * h)
        return out

    # The collectives: ``torch.distributed``'s in-place calls, as DeepSpeed writes them (no autograd).

    def all_to_all(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        """Equal chunks of dim 0 exchanged over ``group``."""
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=group)
        return out

    def all_gather(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        """``(size * t.size(0), ...)``: every rank's ``t`` in rank order."""
        out = t.new_empty((dist.get_world_size(group) * t.size(0),) + tuple(t.shape[1:]))
        dist.all_gather_into_tensor(out, t, group=group)
        return out

    def reduce_scatter(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        """``t`` ``(size, ...)`` summed over ``group``; this rank's ``t[rank]`` slot."""
        out = t.new_empty(t.shape[1:])
        dist.reduce_scatter_tensor(out, t.flatten(0, 1), group=group)
        return out

    def all_reduce(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        dist.all_reduce(t, group=group)
        return t


class TrainableDeepSpeedMoE(DeepSpeedMoE):
    """``DeepSpeedMoE`` whose parameters train: the same math, with the differentiable functional
    collectives (``*_autograd``), whose graphs the same passes read. The TP all-reduce of the
    capacity shard is an all-gather and a sum (funcol has no differentiable all-reduce; the
    all-gather's adjoint, a reduce-scatter, is the all-reduce's)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requires_grad_(True)

    def all_to_all(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        return funcol.all_to_all_single_autograd(t, None, None, group)

    def all_gather(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        return funcol.all_gather_tensor_autograd(t, 0, group)

    def reduce_scatter(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        return funcol.reduce_scatter_tensor_autograd(t.flatten(0, 1), "sum", 0, group).view(t.shape[1:])

    def all_reduce(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        size = dist.get_world_size(group)
        return funcol.all_gather_tensor_autograd(t, 0, group).view(size, *t.shape).sum(0)
