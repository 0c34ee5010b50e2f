"""MoeReRouting / ``npu_moe_re_routing`` (SPEC §7).

Re-orders all-to-all output from rank-major, expert-minor blocks to expert-major, rank-minor
blocks. ``tokens`` ``(A, H)``; ``expert_token_num_per_rank`` ``(N, E)`` int32/int64 with
``c[i, j]`` rows of rank ``i`` for local expert ``j`` and ``sum(c) == A``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..targets import is_device_target
from ._proto import (GeAttr, GeInput, GeOutput, OpProto, OutSpec, require, require_dim,
                     require_dtype, require_shape)

NAME = "npu_moe_re_routing"
SCHEMA = (
    "(Tensor tokens, Tensor expert_token_num_per_rank, *, Tensor? per_token_scales=None, "
    "int expert_token_num_type=1, int idx_type=0, int? tokens_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)"
)
TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.int8, torch.float32)
DEVICE_TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
COUNT_DTYPES = (torch.int32, torch.int64)
# [K] tiling errors only when H > 16384 (the API page says H < 16384; SPEC §9 #17).
DEVICE_MAX_H = 16384


def validate(tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor, *,
             per_token_scales: Optional[torch.Tensor] = None, expert_token_num_type: int = 1,
             idx_type: int = 0, tokens_dtype: Optional[int] = None) -> None:
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
    if is_device_target():
        # The device tiling also rejects H == 0 (SPEC §7.4 "0 < H"); portable copies empty rows.
        require(0 < tokens.size(1) <= DEVICE_MAX_H, NAME, "tokens", f"hidden size H must be in [1, {DEVICE_MAX_H}]",
                f"H={tokens.size(1)}")
    if per_token_scales is not None:
        require_dtype(NAME, "per_token_scales", per_token_scales, (torch.float32,))
        require_shape(NAME, "per_token_scales", per_token_scales, (tokens.size(0),))


def validate_values(tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor, **_: object) -> None:
    """Counts are non-negative (zero is allowed, SPEC §9 #18) and add up to A."""
    counts = expert_token_num_per_rank
    if counts.numel() and bool((counts < 0).any()):
        bad = counts[counts < 0][0].item()
        require(False, NAME, "expert_token_num_per_rank", "entries must be >= 0", bad)
    total = int(counts.sum().item())
    require(total == tokens.size(0), NAME, "expert_token_num_per_rank",
            f"must sum to tokens.size(0)={tokens.size(0)}", f"sum {total}")


def infer_shape(tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor, *,
                per_token_scales: Optional[torch.Tensor] = None, **_: object) -> tuple[OutSpec, ...]:
    a = tokens.size(0)
    return (
        OutSpec(tuple(tokens.shape), tokens.dtype),                      # permute_tokens
        OutSpec((a,), torch.float32 if per_token_scales is None else per_token_scales.dtype),
        OutSpec((a,), torch.int32),                                       # permute_token_idx
        OutSpec((expert_token_num_per_rank.size(1),), expert_token_num_per_rank.dtype),
    )


PROTO = OpProto(
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
    validate_values=validate_values,
)
