"""World-level oracles of the two BMM collective ops, written from SPEC §6.3 with plain loops.

Ranks are addressed by ``(p, q)``: EP index ``p`` (the EP group is every rank with the same
``q``) and TP index ``q`` (the TP group is every rank with the same ``p``). Each oracle takes a
dict ``(p, q) -> per-rank input`` and returns a dict ``(p, q) -> per-rank output``. Independent of
the kernels: no collectives, no permute tricks, one row or one column block at a time.

Arithmetic runs in fp32 as on the device (SPEC §6.3), or in fp64 for fp64 inputs: the autograd
tests differentiate the oracle in fp64 as their reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor
Ranks = dict  # (p, q) -> value


def _act(act_type: int, z: Tensor) -> Tensor:
    """SPEC §6.3 activations on fp32 ``z``: 1 GELU (erf), 2 SiLU, 3 ReLU, 4 FastGELU."""
    if act_type == 1:
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    if act_type == 2:
        return z / (1.0 + torch.exp(-z))
    if act_type == 3:
        return torch.where(z > 0, z, torch.zeros_like(z))
    if act_type == 4:
        return z / (1.0 + torch.exp(-1.702 * z))
    raise AssertionError(act_type)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype the oracle computes in for inputs of ``dtype``: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_matrix(bias: Tensor, e: int, dtype: torch.dtype) -> Tensor:
    """Row of expert ``e`` of a ``(E/ep, 1, n)`` or ``(E/ep, n)`` bias, ``(n,)`` in ``_wide(dtype)``."""
    return bias[e].reshape(-1).to(_wide(dtype))


def alltoall_allgather_bmm_world(xs: Ranks, weights: Ranks, ep: int, tp: int, *, biases: Optional[Ranks] = None,
                                 shard_type: int = 0, act_type: int = 0) -> Ranks:
    """``(p, q) -> (y1, y2, y3)`` with every output materialized (y3 is the bmm(+bias) result)."""
    out = {}
    for (p, q), x in xs.items():
        dtype = x.dtype
        experts, c, h = x.shape
        local = experts // ep
        hidden = h * tp if shard_type == 0 else h
        rows = ep * c if shard_type == 0 else ep * tp * c
        y2 = torch.zeros(local, rows, hidden, dtype=dtype)
        for e in range(local):
            for src_p in range(ep):
                for src_q in range(tp):
                    # all-to-all from (src_p, src_q) to (p, src_q), then all-gather from (p, src_q)
                    chunk = xs[(src_p, src_q)][p * local + e]                  # (c, h)
                    for cc in range(c):
                        if shard_type == 0:
                            y2[e, src_p * c + cc, src_q * h:(src_q + 1) * h] = chunk[cc]
                        else:
                            y2[e, (src_p * tp + src_q) * c + cc, :] = chunk[cc]
        w = weights[(p, q)]
        wide = _wide(dtype)
        y3 = torch.stack([(y2[e].to(wide) @ w[e].to(wide)).to(dtype) for e in range(local)])
        if biases is not None:
            y3 = torch.stack([(y3[e].to(wide) + _bias_matrix(biases[(p, q)], e, dtype)).to(dtype)
                              for e in range(local)])
        y1 = y3 if act_type == 0 else _act(act_type, y3.to(wide)).to(dtype)
        out[(p, q)] = (y1, y2, y3)
    return out


def bmm_reducescatter_alltoall_world(xs: Ranks, weights: Ranks, ep: int, tp: int, *,
                                     biases: Optional[Ranks] = None, shard_type: int = 0) -> Ranks:
    """``(p, q) -> y``: ``y[p'*E/ep + e, r] = sum_q' t1[(p', q')][e, row, cols] + bias[(p', q)][e]``."""
    t1 = {k: torch.stack([(x[e].to(_wide(x.dtype)) @ weights[k][e].to(_wide(x.dtype))).to(x.dtype)
                          for e in range(x.size(0))])
          for k, x in xs.items()}
    out = {}
    for (p, q), x in xs.items():
        dtype = x.dtype
        local, rows, _ = x.shape
        hidden = weights[(p, q)].size(2)
        if shard_type == 0:
            c_out, h_out = rows // ep, hidden // tp
        else:
            c_out, h_out = rows // (ep * tp), hidden
        y = torch.zeros(ep * local, c_out, h_out, dtype=dtype)
        for src_p in range(ep):
            for e in range(local):
                for r in range(c_out):
                    acc = torch.zeros(h_out, dtype=_wide(dtype))
                    for src_q in range(tp):
                        if shard_type == 0:
                            acc += t1[(src_p, src_q)][e, p * c_out + r, q * h_out:(q + 1) * h_out].to(acc.dtype)
                        else:
                            acc += t1[(src_p, src_q)][e, (p * tp + q) * c_out + r, :].to(acc.dtype)
                    value = acc.to(dtype)
                    if biases is not None:
                        value = (value.to(acc.dtype) + _bias_matrix(biases[(src_p, q)], e, dtype)).to(dtype)
                    y[src_p * local + e, r] = value
        out[(p, q)] = y
    return out
