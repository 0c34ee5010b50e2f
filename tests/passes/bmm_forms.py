"""Unfused AlltoAll/AllGather/BMM chains (and their reverse) in the forms users write, shared by
the matcher tests (fake process group) and the rank tests (gloo, numerics).

Per rank: ``x`` ``(E, c, h)``, forward weight ``(local, H, m)``, bias ``(local, 1, m)``; reverse
input ``(local, rows, m)``, weight ``(local, m, H)``. ``H = tp*h`` (shard 0) or ``h`` (shard 1);
``rows = ep*c`` (shard 0) or ``ep*tp*c`` (shard 1).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

Tensor = torch.Tensor
ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda z: z, "gelu": F.gelu, "silu": F.silu, "relu": torch.relu,
    "fastgelu": lambda z: z * torch.sigmoid(1.702 * z), "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}


def sizes(ep_group, tp_group) -> tuple[int, int]:
    return dist.get_world_size(ep_group), dist.get_world_size(tp_group)


def forward(x: Tensor, w: Tensor, b: Optional[Tensor], ep_group, tp_group, *, shard: int = 1, act: str = "gelu",
            transpose: bool = False, reshape: bool = False, swap_peers: bool = False, outputs: str = "y1",
            gather_group=None) -> tuple[Tensor, ...]:
    """All-to-all, all-gather, permute/reshape, bmm (+ bias) (+ act) with functional collectives.

    ``transpose``: permutes written as transposes; ``reshape``: reshape instead of view;
    ``swap_peers``: shard 1 rows ordered (TP peer, EP peer) instead of the op's (EP, TP): a look-alike;
    ``outputs``: which values the function returns besides y1 ("y1", "y2", "y3", "gathered");
    ``gather_group``: the all-gather's group (default ``tp_group``).
    """
    ep, tp = sizes(ep_group, tp_group)
    experts, c, h = x.shape
    local = experts // ep
    view = Tensor.reshape if reshape else Tensor.view
    received = funcol.all_to_all_single(x, None, None, ep_group)                       # (ep*local, c, h)
    if transpose:
        received = view(received, (ep, local, c, h)).transpose(0, 1).contiguous()
    else:
        received = view(received, (ep, local, c, h)).permute(1, 0, 2, 3).contiguous()   # (local, ep, c, h)
    gathered = funcol.all_gather_single(received, 0, gather_group or tp_group)          # (tp*local, ep, c, h)
    g = view(gathered, (tp, local, ep, c, h))
    if shard == 0:
        g = g.permute(1, 2, 3, 0, 4) if not transpose else g.transpose(0, 1).transpose(1, 2).transpose(2, 3)
        y2 = g.reshape(local, ep * c, tp * h)
    else:
        order = (1, 0, 2, 3, 4) if swap_peers else (1, 2, 0, 3, 4)
        g = g.permute(*order) if not transpose else g.transpose(0, 1).transpose(1, 2)
        y2 = g.reshape(local, ep * tp * c, h)
    y3 = torch.bmm(y2, w)
    if b is not None:
        y3 = y3 + b
    y1 = ACTS[act](y3)
    extra = {"y1": lambda: (), "y2": lambda: (y2,), "y3": lambda: (y3,), "gathered": lambda: (gathered.sum(),)}
    return (y1,) + extra[outputs]()


def forward_dist(x: Tensor, w: Tensor, b: Optional[Tensor], ep_group, tp_group, *, shard: int = 1,
                 act: str = "gelu") -> Tensor:
    """The same chain with ``dist.all_to_all_single`` / ``dist.all_gather_into_tensor`` (out= form)."""
    ep, tp = sizes(ep_group, tp_group)
    experts, c, h = x.shape
    local = experts // ep
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x, group=ep_group)
    received = received.view(ep, local, c, h).permute(1, 0, 2, 3).contiguous()
    gathered = received.new_empty((tp * local, ep, c, h))
    dist.all_gather_into_tensor(gathered, received, group=tp_group)
    g = gathered.view(tp, local, ep, c, h)
    if shard == 0:
        y2 = g.permute(1, 2, 3, 0, 4).reshape(local, ep * c, tp * h)
    else:
        y2 = g.permute(1, 2, 0, 3, 4).reshape(local, ep * tp * c, h)
    y3 = torch.bmm(y2, w) + b if b is not None else torch.bmm(y2, w)
    return ACTS[act](y3)


def reverse(x: Tensor, w: Tensor, b: Optional[Tensor], ep_group, tp_group, *, shard: int = 1, transpose: bool = False,
            bias_before: bool = False, reduce_op: str = "sum", scatter_group=None, outputs: str = "y",
            shared_bias: bool = False) -> tuple[Tensor, ...]:
    """bmm, reduce-scatter over TP (sum), + bias, all-to-all over EP, with functional collectives.

    ``bias_before``: the bias added to the partial sums, before the reduce-scatter (a look-alike);
    ``shared_bias``: ``b`` is one ``(H',)`` bias for every expert; ``outputs``: "y" or "reduced"
    (also return the reduce-scatter's result).
    """
    ep, tp = sizes(ep_group, tp_group)
    local, rows, _ = x.shape
    t1 = torch.bmm(x, w)                                                                 # (local, rows, H)
    hidden = t1.size(2)
    if bias_before:
        t1 = t1 + b
    if shard == 0:
        c, h = rows // ep, hidden // tp
        send = t1.view(local, ep, c, tp, h)
        send = send.permute(3, 0, 1, 2, 4) if not transpose else send.transpose(2, 3).transpose(1, 2).transpose(0, 1)
    else:
        c, h = rows // (ep * tp), hidden
        send = t1.view(local, ep, tp, c, h)
        send = send.permute(2, 0, 1, 3, 4) if not transpose else send.transpose(1, 2).transpose(0, 1)
    send = send.contiguous().view(tp * local, ep, c, h)
    reduced = funcol.reduce_scatter_tensor(send, reduce_op, 0, scatter_group or tp_group)   # (local, ep, c, h)
    if b is not None and not bias_before:
        reduced = reduced + (b if shared_bias else b.view(local, 1, 1, h))
    outgoing = reduced.transpose(0, 1).contiguous() if transpose else reduced.permute(1, 0, 2, 3).contiguous()
    y = funcol.all_to_all_single(outgoing, None, None, ep_group).view(ep * local, c, h)
    return (y,) + ((reduced,) if outputs == "reduced" else ())
