"""Grouped FFN with device-resident expert counts / ``npu_ffn_grouped`` (SPEC §5, GE ``FFN``).

Decision: a new op, not a tensor form of ``npu_ffn``'s ``expert_tokens``. torch_npu's ``npu_ffn``
schema takes ``int[]? expert_tokens`` (aclnnFFNV2, host list), and moe_fusion keeps torch_npu's
schemas so code ports by renaming; widening that argument to ``Tensor`` would break the schema
test and every caller that passes a list. GE's ``FFN`` op itself takes ``expert_tokens`` as an
optional INT64 *tensor* input (aclnnFFNV3 ``expertTokensOptional``), which is what a static graph
needs: the counts come from ``npu_moe_distribute_dispatch_v2``'s ``expert_token_nums`` on the
device, and a host list would force a device-to-host sync (or data-dependent shapes) mid-graph.
``npu_ffn_grouped`` is that GE form as a torch op.

GE mapping (the converter is ``FFN`` with ``npu_ffn``'s GE prototype, ``PROTO.ge_*`` below):
inputs ``x, weight1, weight2, expert_tokens (tensor, INT64), bias1, bias2`` and the quant /
antiquant inputs left empty; attrs ``activation``, ``inner_precise`` (0 when None),
``output_dtype = -1``, ``tokens_index_flag``.

Signature::

    npu_ffn_grouped(Tensor x, Tensor weight1, Tensor weight2, str activation, *, Tensor expert_tokens,
                    Tensor? bias1=None, Tensor? bias2=None, int? inner_precise=None,
                    bool tokens_index_flag=False) -> Tensor

Shapes and dtypes (float modes of SPEC §5.4; quant/antiquant are ``npu_ffn``'s):

* ``x`` ``(M, K1)`` fp16/bf16 (fp32 on the portable target); ``weight1`` ``(E, K1, N1)``,
  ``weight2`` ``(E, K2, N2)`` in x's dtype; ``bias1`` ``(E, N1)``, ``bias2`` ``(E, N2)``, fp16
  for fp16 x, else fp32.
* ``expert_tokens`` ``(E,)`` int64: rows per expert (``tokens_index_flag=False``), or cumulative
  ends (``True``). Rows ``[s_e, s_{e+1})`` use expert ``e``. Unlike ``npu_ffn`` the counts may
  cover fewer than ``M`` rows (``sum <= M``): dispatch pads ``expand_x`` to its capacity ``A``.
* ``y`` ``(M, N2)`` in x's dtype. Rows past the last counted row are zero (on the device they are
  not written: implementation-defined, consumed by nobody but the paired combine, which reads
  counted rows only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..targets import is_device_target
from . import ffn
from ._proto import (INT32_MAX, PORTABLE_FLOATS, OpProto, OutSpec, dtype_name, float_bias_dtype, require, require_dim,
                     require_dtype, require_in, require_shape)

NAME = "npu_ffn_grouped"
SCHEMA = (
    "(Tensor x, Tensor weight1, Tensor weight2, str activation, *, Tensor expert_tokens, Tensor? bias1=None, "
    "Tensor? bias2=None, int? inner_precise=None, bool tokens_index_flag=False) -> Tensor"
)
DEVICE_X_DTYPES = (torch.float16, torch.bfloat16)
# Every target: segment ends are int32 (torch._grouped_mm offsets) and reach M, so M <= INT32_MAX.
MAX_ROWS = INT32_MAX


@dataclass(frozen=True)
class FfnGroupedConfig:
    """A validated ``npu_ffn_grouped`` call. Sizes are SymInts at trace time."""

    rows: Any                   # M, rows of x
    num_experts: Any            # E
    k1: Any
    n1: Any
    k2: Any
    n2: Any
    dtype: torch.dtype          # x's (and y's) dtype
    activation: str             # lower-case name
    inner_precise: int          # 0 (high precision) or 1 (fp16 intermediate)
    tokens_index_flag: bool     # expert_tokens holds cumulative ends


def validate(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, activation: str, *,
             expert_tokens: torch.Tensor, bias1: Optional[torch.Tensor] = None, bias2: Optional[torch.Tensor] = None,
             inner_precise: Optional[int] = None, tokens_index_flag: bool = False) -> FfnGroupedConfig:
    """Structural rules (SPEC §5.5, float modes, with experts) for the current target; returns the
    call's config."""
    device = is_device_target()
    activations = ffn.PLAIN_ACTIVATIONS + ffn.GLU_ACTIVATIONS
    require(isinstance(activation, str) and activation.lower() in activations, NAME, "activation",
            f"must be one of {activations} (case-insensitive)", repr(activation))
    act = activation.lower()
    require_dim(NAME, "x", x, (2,))
    require_dtype(NAME, "x", x, DEVICE_X_DTYPES if device else DEVICE_X_DTYPES + PORTABLE_FLOATS)
    require(x.size(0) <= MAX_ROWS, NAME, "x", f"must have M <= {MAX_ROWS} rows (int32 segment ends)",
            f"shape {tuple(x.shape)}")
    for name, w in (("weight1", weight1), ("weight2", weight2)):
        require_dim(NAME, name, w, (3,))
        require(w.dtype == x.dtype, NAME, name, f"dtype must equal x's ({dtype_name(x.dtype)})", dtype_name(w.dtype))
    require_dim(NAME, "expert_tokens", expert_tokens, (1,))
    require_dtype(NAME, "expert_tokens", expert_tokens, (torch.int64,))
    e = expert_tokens.size(0)
    require(e >= 1, NAME, "expert_tokens", "must have at least one expert", f"shape {tuple(expert_tokens.shape)}")
    for name, w in (("weight1", weight1), ("weight2", weight2)):
        require(w.size(0) == e, NAME, name, f"must have E={e} experts in dim 0 (len(expert_tokens))",
                f"shape {tuple(w.shape)}")
    k1, n1 = weight1.shape[1:]
    k2, n2 = weight2.shape[1:]
    require(x.size(1) == k1, NAME, "weight1", f"must have K1 == x.size(1) == {x.size(1)}", f"shape {tuple(weight1.shape)}")
    if act in ffn.GLU_ACTIVATIONS:
        require(n1 % 2 == 0 and k2 * 2 == n1, NAME, "weight2", f"must have an even N1 and K2 == N1 / 2 for {act} "
                f"(N1 = {n1})", f"shape {tuple(weight2.shape)}")
    else:
        require(k2 == n1, NAME, "weight2", f"must have K2 == N1 == {n1}", f"shape {tuple(weight2.shape)}")
    bias_dtype = float_bias_dtype(x.dtype)
    for name, bias, n in (("bias1", bias1, n1), ("bias2", bias2, n2)):
        if bias is not None:
            require_dtype(NAME, name, bias, (bias_dtype,))
            require_shape(NAME, name, bias, (e, n))
    ip = 0 if inner_precise is None else inner_precise
    require_in(NAME, "inner_precise", ip, (0, 1))
    require(isinstance(tokens_index_flag, bool), NAME, "tokens_index_flag", "must be a bool", repr(tokens_index_flag))
    if device:
        # The device FFN writes y in x's layout (GE InferShape y.shape == x.shape).
        require(n2 == k1, NAME, "weight2", f"must have N2 == K1 == {k1} on A2/A3", f"shape {tuple(weight2.shape)}")
        require(k1 <= ffn.MAX_K and k2 <= ffn.MAX_K, NAME, "weight1/weight2", f"must have K1, K2 <= {ffn.MAX_K}",
                (k1, k2))
        require(e <= ffn.MAX_EXPERTS, NAME, "expert_tokens", f"must have at most {ffn.MAX_EXPERTS} experts", e)
        # The device's GLU FFN runs without experts only (SPEC §5.4).
        require(act not in ffn.GLU_ACTIVATIONS, NAME, "activation", f"{act} is not supported with experts on A2/A3",
                repr(activation))
        if x.dtype == torch.bfloat16:
            require(ip == 0, NAME, "inner_precise", "must be 0 (high precision) for bfloat16 x", ip)
    return FfnGroupedConfig(rows=x.size(0), num_experts=e, k1=k1, n1=n1, k2=k2, n2=n2, dtype=x.dtype, activation=act,
                            inner_precise=ip, tokens_index_flag=tokens_index_flag)


def validate_values(config: FfnGroupedConfig, expert_tokens: torch.Tensor) -> None:
    """Count rules that need the values (eager only; one host read of ``expert_tokens`` ``(E,)``):
    counts >= 0 (ends non-decreasing) covering at most M rows."""
    tokens = expert_tokens.tolist()
    m = config.rows
    if config.tokens_index_flag:
        require(all(v >= 0 for v in tokens) and all(b >= a for a, b in zip(tokens, tokens[1:])), NAME,
                "expert_tokens", "must be non-negative, non-decreasing cumulative ends (tokens_index_flag=True)", tokens)
        total = tokens[-1]
    else:
        require(all(v >= 0 for v in tokens), NAME, "expert_tokens", "entries must be >= 0", tokens)
        total = sum(tokens)
    require(total <= m, NAME, "expert_tokens", f"must cover at most the M={m} rows of x", tokens)


def device_value_checks(config: FfnGroupedConfig, expert_tokens: torch.Tensor) -> None:
    """``validate_values``'s rules as device asserts, for compiled code that must not read the
    counts on the host (inductor's lowering, ``passes.lowering``): a failing call raises with the
    op, the argument and the rule (the values are not in the message: reading them is the sync
    being avoided)."""
    ends = expert_tokens if config.tokens_index_flag else torch.cumsum(expert_tokens, 0)
    if config.tokens_index_flag:
        rule = "must be non-negative, non-decreasing cumulative ends (tokens_index_flag=True)"
        ordered = (expert_tokens[1:] >= expert_tokens[:-1]).all()
    else:
        rule, ordered = "entries must be >= 0", expert_tokens.new_ones((), dtype=torch.bool)
    torch._assert_async((expert_tokens >= 0).all() & ordered, f"{NAME}: expert_tokens {rule}")
    torch._assert_async(ends[-1] <= config.rows, f"{NAME}: expert_tokens must cover at most the M rows of x")


def infer_shape(config: FfnGroupedConfig) -> tuple[OutSpec, ...]:
    """``y`` ``(M, N2)`` in x's dtype."""
    return (OutSpec((config.rows, config.n2), config.dtype),)


PROTO: OpProto[FfnGroupedConfig] = OpProto(
    name=NAME,
    schema=SCHEMA,
    ge_type=ffn.PROTO.ge_type,
    ge_inputs=ffn.PROTO.ge_inputs,
    ge_attrs=ffn.PROTO.ge_attrs,
    ge_outputs=ffn.PROTO.ge_outputs,
    validate=validate,
    infer_shape=infer_shape,
)
