"""Reference kernels of ``npu_alltoall_allgather_bmm`` and ``npu_bmm_reducescatter_alltoall``
(SPEC §6.3), with ``torch.distributed`` collectives on the groups named by ``group_ep``/``group_tp``.

Precision follows the ops-transformer golden: the bmm runs in fp32 and is rounded to x's dtype;
the bias is added in fp32 and rounded; the activation runs in fp32 on the rounded value and is
rounded. The reduce-scatter sums the rounded bmm output in x's dtype (what the device moves).

GELU (``act_type`` 1) is the erf form, as in the only AG-BMM goldens (ops-transformer, MindSpeed);
the device may use the tanh form (SPEC §9 #15, §10.9), which differs by < 1e-3 absolute.

A group of size 1 is never looked up and costs no communication, so a world of one rank runs
without ``torch.distributed``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..op_protos.alltoall_allgather_bmm import NAME as AG_NAME
from ..op_protos.alltoall_allgather_bmm import AllGatherBmmConfig
from ..op_protos.bmm_reducescatter_alltoall import NAME as RS_NAME
from ..op_protos.bmm_reducescatter_alltoall import ReduceScatterBmmConfig
from ._groups import resolve_group
from ._precision import accumulator, widen

Tensor = torch.Tensor


def _fastgelu(z: Tensor) -> Tensor:
    return z * torch.sigmoid(1.702 * z)   # z / (1 + exp(-1.702 z))


# act_type -> f, applied to fp32 values; 0 (no activation) has no entry.
ACTIVATIONS: dict[int, Callable[[Tensor], Tensor]] = {1: F.gelu, 2: F.silu, 3: torch.relu, 4: _fastgelu}
# The same, overwriting their argument: a fresh output costs page faults on CPU.
ACTIVATIONS_INPLACE: dict[int, Callable[[Tensor], Tensor]] = {
    1: torch.ops.aten.gelu_, 2: lambda z: F.silu(z, inplace=True), 3: torch.relu_,
    4: lambda z: z.mul_(torch.sigmoid(1.702 * z))}


def _group(op: str, arg: str, name: str, size: int) -> Optional[dist.ProcessGroup]:
    return None if size == 1 else resolve_group(op, arg, name, size)


def _all_to_all(t: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Equal chunks of dim 0 of contiguous ``t`` to each peer; chunk ``i`` of the result came from peer ``i``."""
    if group is None:
        return t
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out


def _all_gather(t: Tensor, group: Optional[dist.ProcessGroup], size: int) -> Tensor:
    """``(size, *t.shape)``: every peer's contiguous ``t`` in group-rank order."""
    if group is None:
        return t.unsqueeze(0)
    out = t.new_empty((size * t.size(0),) + tuple(t.shape[1:]))   # gloo wants the concatenated layout
    dist.all_gather_single(out, t, group=group)
    return out.view((size,) + tuple(t.shape))


def _reduce_scatter(t: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Sum of contiguous ``t`` ``(size, ...)`` over the group, keeping this rank's chunk ``t[rank]``."""
    if group is None:
        return t[0]
    out = t.new_empty(tuple(t.shape[1:]))
    dist.reduce_scatter_single(out, t.flatten(0, 1), group=group)   # gloo wants the concatenated layout
    return out


def _fp32_bmm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``bmm`` in fp32 (fp16/bf16 matmuls are ~100x slower on CPU; fp64 for fp64), rounded to ``dtype``."""
    return torch.bmm(widen(a, dtype), widen(b, dtype)).to(dtype)


def _add_bias(t: Tensor, bias: Tensor) -> Tensor:
    """``t + bias`` in fp32 (fp64 for fp64), rounded to t's dtype; in place on ``t`` (a temporary)
    when t is already in that dtype."""
    if t.dtype == accumulator(t.dtype):
        return t.add_(widen(bias, t.dtype))
    return (widen(t, t.dtype) + widen(bias, t.dtype)).to(t.dtype)


def npu_alltoall_allgather_bmm(config: AllGatherBmmConfig, x: Tensor, weight: Tensor, group_ep: str,
                               group_ep_worldsize: int, group_tp: str, group_tp_worldsize: int, *,
                               bias: Optional[Tensor] = None, **_: object) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` ``(E, c, h)`` -> ``y1`` ``(E/ep, rows, M/tp)``, ``y2`` ``(E/ep, rows, H)``, ``y3`` like y1.

    ``rows = ep*c`` (shard 0, ``H = tp*h``) or ``ep*tp*c`` (shard 1, ``H = h``); y2/y3 are
    ``(0, 0, 0)`` unless requested. Row ``r`` of y2 comes from EP peer ``r // (rows/ep)``. Shard
    type, activation and the outputs requested come from the validated ``config``.
    """
    ep, tp, local, act_type = config.ep, config.tp, config.local_experts, config.act_type
    ep_group = _group(AG_NAME, "group_ep", group_ep, ep)
    tp_group = _group(AG_NAME, "group_tp", group_tp, tp)
    _, c, h = x.shape
    received = _all_to_all(x.contiguous(), ep_group)                    # (ep * local, c, h): peer-major
    gathered = _all_gather(received, tp_group, tp).view(tp, ep, local, c, h)
    if config.shard_type == 0:   # y2[e, p*c + cc, q*h + hh]
        y2 = x.new_empty((local, ep * c, tp * h))
        y2.view(local, ep, c, tp, h).copy_(gathered.permute(2, 1, 3, 0, 4))
    else:                 # y2[e, (p*tp + q)*c + cc, hh]
        y2 = x.new_empty((local, ep * tp * c, h))
        y2.view(local, ep, tp, c, h).copy_(gathered.permute(2, 1, 0, 3, 4))
    y3 = _fp32_bmm(y2, weight, x.dtype)
    if bias is not None:
        y3 = _add_bias(y3, bias.view(local, 1, -1))
    if act_type == 0:
        y1 = y3
    elif x.dtype == accumulator(x.dtype) and not config.need_activation_feature:   # y3: a temporary nobody sees
        y1 = ACTIVATIONS_INPLACE[act_type](y3)
    else:
        y1 = ACTIVATIONS[act_type](widen(y3, x.dtype)).to(x.dtype)
    return (y1,
            y2 if config.need_allgather_out else x.new_empty((0, 0, 0)),
            y3 if config.need_activation_feature else x.new_empty((0, 0, 0)))


def npu_bmm_reducescatter_alltoall(config: ReduceScatterBmmConfig, x: Tensor, weight: Tensor, group_ep: str,
                                   group_ep_worldsize: int, group_tp: str, group_tp_worldsize: int, *,
                                   bias: Optional[Tensor] = None, **_: object) -> Tensor:
    """``x`` ``(E/ep, rows, M/tp)`` -> ``y`` ``(E, C, H/tp)`` (shard 0) or ``(E, C/tp, H)`` (shard 1);
    the shard type comes from the validated ``config``."""
    ep, tp, local, rows, hidden = config.ep, config.tp, config.local_experts, config.rows, config.hidden
    ep_group = _group(RS_NAME, "group_ep", group_ep, ep)
    tp_group = _group(RS_NAME, "group_tp", group_tp, tp)
    t1 = _fp32_bmm(x, weight, x.dtype)                                   # (local, rows, H)
    if config.shard_type == 0:   # TP chunk q = columns [q*H/tp, (q+1)*H/tp)
        send = t1.view(local, ep, rows // ep, tp, hidden // tp).permute(3, 1, 0, 2, 4)
    else:                 # TP chunk q = rows (p*tp + q)*c' + r
        send = t1.view(local, ep, tp, rows // (ep * tp), hidden).permute(2, 1, 0, 3, 4)
    reduced = _reduce_scatter(send.contiguous(), tp_group)              # (ep, local, c', h'), EP-peer-major
    if bias is not None:
        reduced = _add_bias(reduced, bias.view(1, local, 1, -1))
    y = _all_to_all(reduced.contiguous(), ep_group)                     # (ep * local, c', h'): expert-major
    return y.view(ep * local, *reduced.shape[2:])
