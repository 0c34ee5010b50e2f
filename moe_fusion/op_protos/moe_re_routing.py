"""MoeReRouting / ``npu_moe_re_routing`` (SPEC §7).

Re-orders all-to-all output from rank-major, expert-minor blocks to expert-major, rank-minor
blocks. ``tokens`` ``(A, H)``; ``expert_token_num_per_rank`` ``(N, E)`` int32/int64 with
``c[i, j]`` rows of rank ``i`` for local expert ``j`` and ``sum(c) == A``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import fail
from ..targets import is_device_target
from ._proto import (INT32_MAX, PORTABLE_FLOATS, GeAttr, GeInput, GeOutput, OpProto, OutSpec, require, require_dim,
                     require_dtype, require_shape, shape_of)

NAME = "npu_moe_re_routing"
SCHEMA = (
    "(Tensor tokens, Tensor expert_token_num_per_rank, *, Tensor? per_token_scales=None, "
    "int expert_token_num_type=1, int idx_type=0, int? tokens_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)"
)
TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.int8) + PORTABLE_FLOATS
DEVICE_TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
COUNT_DTYPES = (torch.int32, torch.int64)
# [K] tiling errors only when H > 16384 (the API page says H < 16384; SPEC §9 #17).
DEVICE_MAX_H = 16384
# Every target: permute_token_idx is int32 and holds row indices < A, and an int32 expert_token_num
# holds column sums <= A, so A <= INT32_MAX. The counts (N, E) are each in [0, A] (validate_values):
# with N * E <= INT32_MAX their int64 sum is below 2**62 and cannot wrap.
MAX_TOKENS = INT32_MAX
MAX_COUNT_ENTRIES = INT32_MAX


@dataclass(frozen=True)
class ReRoutingConfig:
    """A validated ``npu_moe_re_routing`` call. Sizes are SymInts at trace time."""

    num_tokens: Any             # A, rows of tokens
    hidden: Any                 # H
    num_experts: Any            # E, local experts (columns of expert_token_num_per_rank)
    tokens_dtype: torch.dtype
    counts_dtype: torch.dtype
    scales_dtype: torch.dtype   # per_token_scales' (fp32, or fp64 on the portable target); fp32 without them


def validate(tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor, *,
             per_token_scales: Optional[torch.Tensor] = None, expert_token_num_type: int = 1,
             idx_type: int = 0, tokens_dtype: Optional[int] = None) -> ReRoutingConfig:
    """Structural rules (SPEC §7.4) for the current target; returns the call's config."""
    counts = expert_token_num_per_rank
    require_dim(NAME, "tokens", tokens, (2,))
    require_dim(NAME, "expert_token_num_per_rank", counts, (2,))
    require_dtype(NAME, "tokens", tokens, DEVICE_TOKEN_DTYPES if is_device_target() else TOKEN_DTYPES)
    require_dtype(NAME, "expert_token_num_per_rank", counts, COUNT_DTYPES)
    # Only count mode and gather indices are implemented by the device kernel (SPEC §7.3).
    require(expert_token_num_type == 1, NAME, "expert_token_num_type",
            "must be 1 (counts; cumsum mode 0 is not implemented)", expert_token_num_type)
    require(idx_type == 0, NAME, "idx_type", "must be 0 (gather index; scatter index 1 is not implemented)", idx_type)
    # fp8/hifloat8/fp4 token reinterpretation exists only on Ascend950 (out of scope, SPEC §7.1).
    require(tokens_dtype is None, NAME, "tokens_dtype", "must be None (fp8/fp4 tokens are not supported)", tokens_dtype)
    if not tokens.size(0) <= MAX_TOKENS:
        fail(NAME, "tokens", f"must have A <= {MAX_TOKENS} rows (permute_token_idx is int32)", f"A={tokens.size(0)}")
    if not counts.size(0) * counts.size(1) <= MAX_COUNT_ENTRIES:
        fail(NAME, "expert_token_num_per_rank", f"must have N * E <= {MAX_COUNT_ENTRIES} entries (so their sum "
             "cannot wrap)", f"shape {shape_of(counts)}")
    if is_device_target():
        # The device tiling also rejects H == 0 (SPEC §7.4 "0 < H"); portable copies empty rows.
        require(0 < tokens.size(1) <= DEVICE_MAX_H, NAME, "tokens", f"hidden size H must be in [1, {DEVICE_MAX_H}]",
                f"H={tokens.size(1)}")
    if per_token_scales is not None:
        require_dtype(NAME, "per_token_scales", per_token_scales,
                      (torch.float32,) if is_device_target() else PORTABLE_FLOATS)
        require_shape(NAME, "per_token_scales", per_token_scales, (tokens.size(0),))
    return ReRoutingConfig(num_tokens=tokens.size(0), hidden=tokens.size(1), num_experts=counts.size(1),
                           tokens_dtype=tokens.dtype, counts_dtype=counts.dtype,
                           scales_dtype=torch.float32 if per_token_scales is None else per_token_scales.dtype)


def validate_values(config: ReRoutingConfig, expert_token_num_per_rank: torch.Tensor) -> None:
    """Counts ``(N, E)`` are each in ``[0, A]`` (zero is allowed, SPEC §9 #18) and add up to A (one
    host read). The per-entry range comes first: it is what keeps the int64 sum from wrapping (a
    wrapped sum can equal A and would send the gather out of bounds)."""
    counts = expert_token_num_per_rank
    if counts.numel() == 0:
        low = high = total = 0
    else:
        low, high, total = torch.stack((*torch.aminmax(counts), counts.sum(dtype=torch.int64))).tolist()
    if low < 0:
        fail(NAME, "expert_token_num_per_rank", "entries must be >= 0", low)
    if high > config.num_tokens:
        fail(NAME, "expert_token_num_per_rank", f"entries must be <= tokens.size(0)={config.num_tokens}", high)
    if total != config.num_tokens:
        fail(NAME, "expert_token_num_per_rank", f"must sum to tokens.size(0)={config.num_tokens}", f"sum {total}")


def infer_shape(config: ReRoutingConfig) -> tuple[OutSpec, ...]:
    """``permute_tokens`` ``(A, H)``, ``permute_per_token_scales`` ``(A,)`` (scales dtype), ``permute_token_idx``
    ``(A,)`` int32, ``expert_token_num`` ``(E,)`` (counts dtype)."""
    a = config.num_tokens
    return (
        OutSpec((a, config.hidden), config.tokens_dtype),
        OutSpec((a,), config.scales_dtype),
        OutSpec((a,), torch.int32),
        OutSpec((config.num_experts,), config.counts_dtype),
    )


PROTO: OpProto[ReRoutingConfig] = OpProto(
    name=NAME,
    schema=SCHEMA,
    ge_type="MoeReRouting",
    ge_inputs=(
        GeInput("tokens", ("DT_FLOAT16", "DT_BF16", "DT_INT8")),
        GeInput("expert_token_num_per_rank", ("DT_INT32", "DT_INT64")),
        GeInput("per_token_scales", ("DT_FLOAT",), "optional"),
    ),
    ge_attrs=(GeAttr("expert_token_num_type", "Int", 1), GeAttr("idx_type", "Int", 0)),
    ge_outputs=(
        GeOutput("permute_tokens", ("DT_FLOAT16", "DT_BF16", "DT_INT8")),
        GeOutput("permute_per_token_scales", ("DT_FLOAT",)),
        GeOutput("permute_token_idx", ("DT_INT32",)),
        GeOutput("expert_token_num", ("DT_INT32", "DT_INT64")),
    ),
    validate=validate,
    infer_shape=infer_shape,
)
