"""The dtype the reference kernels compute in: fp32 for fp16/bf16/fp32 values (the device
accumulates in fp32), fp64 for fp64 values (the portable target's dtype for gradient checks, which
must not be rounded to fp32 on the way)."""
from __future__ import annotations

import torch


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 ``dtype``, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def widen(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in the accumulator dtype of ``dtype`` (values of ``dtype``'s tensors), without a copy
    when it already is."""
    return t.to(accumulator(dtype))
