"""FFN / ``npu_ffn`` (SPEC §5): ``y = act(x @ W1 + b1) @ W2 + b2``, optionally per expert over
contiguous row segments, with quant (int8 x/W) and antiquant (int8/int4 W) modes.

Shapes: ``x`` ``(..., K1)`` with ``M = prod(x.shape[:-1])`` rows. Without experts ``weight1``
``(K1, N1)``, ``weight2`` ``(K2, N2)``, ``bias1`` ``(N1,)``, ``bias2`` ``(N2,)``; with ``E``
experts a leading ``E`` on each. int4 weights are ``uint8`` with a halved last dim
(``moe_fusion.int4``). ``y`` is ``x.shape[:-1] + (N2,)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..int4 import INT4_CARRIER
from ..targets import is_device_target
from ._proto import (PORTABLE_FLOATS, GeAttr, GeInput, GeOutput, OpProto, OutSpec, dtype_name, float_bias_dtype,
                     require, require_dim, require_dtype, require_in, require_shape, shape_of)

NAME = "npu_ffn"
SCHEMA = (
    "(Tensor x, Tensor weight1, Tensor weight2, str activation, *, int[]? expert_tokens=None, "
    "int[]? expert_tokens_index=None, Tensor? bias1=None, Tensor? bias2=None, Tensor? scale=None, "
    "Tensor? offset=None, Tensor? deq_scale1=None, Tensor? deq_scale2=None, Tensor? antiquant_scale1=None, "
    "Tensor? antiquant_scale2=None, Tensor? antiquant_offset1=None, Tensor? antiquant_offset2=None, "
    "int? inner_precise=None, ScalarType? output_dtype=None) -> Tensor"
)
PLAIN_ACTIVATIONS = ("fastgelu", "gelu", "relu", "silu")
GLU_ACTIVATIONS = ("geglu", "swiglu", "reglu")
MAX_K, MAX_EXPERTS = 65535, 256

QUANT_PARAMS = ("scale", "offset", "deq_scale1", "deq_scale2")
ANTIQUANT_PARAMS = ("antiquant_scale1", "antiquant_scale2", "antiquant_offset1", "antiquant_offset2")


@dataclass(frozen=True)
class FfnConfig:
    """A validated ``npu_ffn`` call: mode, expert row counts and logical sizes (SymInts at trace
    time; ``n1``/``n2`` count int4 values, two per stored byte)."""

    mode: str                         # "float" | "quant" | "antiquant"
    activation: str                   # lower-case name
    expert_counts: Optional[tuple]    # rows per expert, or None without experts
    lead_shape: tuple                 # x.shape[:-1]; y is lead_shape + (n2,)
    k1: Any
    n1: Any
    k2: Any
    n2: Any
    out_dtype: torch.dtype

    @property
    def is_glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS


def _logical_n(w: torch.Tensor):
    """Logical last dim of a weight: int4 weights carry two values per byte."""
    return w.size(-1) * 2 if w.dtype == INT4_CARRIER else w.size(-1)


def expert_counts_of(expert_tokens: Optional[Sequence[int]], expert_tokens_index: Optional[Sequence[int]]):
    """Rows per expert from either form (counts, or cumulative ends); None without experts."""
    if expert_tokens_index:
        ends = list(expert_tokens_index)
        return tuple(e - s for s, e in zip([0] + ends[:-1], ends))
    if expert_tokens:
        return tuple(expert_tokens)
    return None


def validate(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, activation: str, *,
             expert_tokens: Optional[Sequence[int]] = None, expert_tokens_index: Optional[Sequence[int]] = None,
             bias1: Optional[torch.Tensor] = None, bias2: Optional[torch.Tensor] = None,
             scale: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
             deq_scale1: Optional[torch.Tensor] = None, deq_scale2: Optional[torch.Tensor] = None,
             antiquant_scale1: Optional[torch.Tensor] = None, antiquant_scale2: Optional[torch.Tensor] = None,
             antiquant_offset1: Optional[torch.Tensor] = None, antiquant_offset2: Optional[torch.Tensor] = None,
             inner_precise: Optional[int] = None, output_dtype: Optional[torch.dtype] = None) -> FfnConfig:
    """Structural rules (SPEC §5.5) for the current target; returns the call's config. Raises
    OpValidationError."""
    device = is_device_target()
    require_dim(NAME, "x", x, range(2, 9))
    require(isinstance(activation, str) and activation.lower() in PLAIN_ACTIVATIONS + GLU_ACTIVATIONS, NAME,
            "activation", f"must be one of {PLAIN_ACTIVATIONS + GLU_ACTIVATIONS} (case-insensitive)", repr(activation))
    act = activation.lower()
    x_dtypes = (torch.float16, torch.bfloat16, torch.int8) + (() if device else PORTABLE_FLOATS)
    require_dtype(NAME, "x", x, x_dtypes)
    require_dtype(NAME, "weight1", weight1, (torch.float16, torch.bfloat16, torch.int8, INT4_CARRIER) + PORTABLE_FLOATS)
    require(weight1.dtype == weight2.dtype, NAME, "weight2", f"dtype must equal weight1's ({dtype_name(weight1.dtype)})",
            dtype_name(weight2.dtype))

    # -- experts ------------------------------------------------------------------------------
    require(not (expert_tokens and expert_tokens_index), NAME, "expert_tokens/expert_tokens_index",
            "must not both be given", "both")
    if expert_tokens_index:
        ends = list(expert_tokens_index)
        require(all(e >= 0 for e in ends), NAME, "expert_tokens_index", "entries must be >= 0", ends)
        require(all(b >= a for a, b in zip(ends, ends[1:])), NAME, "expert_tokens_index", "must be non-decreasing", ends)
    counts = expert_counts_of(expert_tokens, expert_tokens_index)
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    if counts is not None:
        tokens_arg = "expert_tokens_index" if expert_tokens_index else "expert_tokens"
        require(all(c >= 0 for c in counts), NAME, "expert_tokens", "entries must be >= 0", list(counts))
        require(sum(counts) == m, NAME, tokens_arg, f"must cover all M={m} rows of x (sum of counts / last end)",
                list(expert_tokens or expert_tokens_index))
        if device:
            require(len(counts) <= MAX_EXPERTS, NAME, tokens_arg, f"must have at most {MAX_EXPERTS} experts", len(counts))
    w_dims = 3 if counts is not None else 2
    require_dim(NAME, "weight1", weight1, (w_dims,))
    require_dim(NAME, "weight2", weight2, (w_dims,))
    if counts is not None:
        e = len(counts)
        require(weight1.size(0) == e, NAME, "weight1", f"must have E={e} experts in dim 0", f"shape {shape_of(weight1)}")
        require(weight2.size(0) == e, NAME, "weight2", f"must have E={e} experts in dim 0", f"shape {shape_of(weight2)}")

    k1, n1 = weight1.size(-2), _logical_n(weight1)
    k2, n2 = weight2.size(-2), _logical_n(weight2)
    require(x.size(-1) == k1, NAME, "weight1", f"must have K1 == x.size(-1) == {x.size(-1)}", f"shape {shape_of(weight1)}")
    if act in GLU_ACTIVATIONS:
        require(n1 % 2 == 0 and k2 * 2 == n1, NAME, "weight2", f"must have an even N1 and K2 == N1 / 2 for {act} "
                f"(N1 = {n1})", f"shape {shape_of(weight2)}")
    else:
        require(k2 == n1, NAME, "weight2", f"must have K2 == N1 == {n1}", f"shape {shape_of(weight2)}")
    if device:
        # The device kernel writes y in x's layout (GE InferShape y.shape == x.shape).
        require(n2 == k1, NAME, "weight2", f"must have N2 == K1 == {k1} on A2/A3", f"shape {shape_of(weight2)}")
        require(k1 <= MAX_K and k2 <= MAX_K, NAME, "weight1/weight2", f"must have K1, K2 <= {MAX_K}", (k1, k2))

    ip = 0 if inner_precise is None else inner_precise
    require_in(NAME, "inner_precise", ip, (0, 1))
    given = {n: t for n, t in (("scale", scale), ("offset", offset), ("deq_scale1", deq_scale1), ("deq_scale2", deq_scale2),
                               ("antiquant_scale1", antiquant_scale1), ("antiquant_scale2", antiquant_scale2),
                               ("antiquant_offset1", antiquant_offset1), ("antiquant_offset2", antiquant_offset2))
             if t is not None}
    e_lead = () if counts is None else (len(counts),)

    # -- mode ---------------------------------------------------------------------------------
    if x.dtype == torch.int8:
        mode = "quant"
        require_dtype(NAME, "weight1", weight1, (torch.int8,))
        require_in(NAME, "output_dtype", output_dtype, (None, torch.float16, torch.bfloat16))
        out_dtype = output_dtype or torch.float16
        bias_dtype = torch.int32
        _validate_quant_params(given, e_lead, n1, n2, out_dtype, act)
    elif weight1.dtype in (torch.int8, INT4_CARRIER):
        mode = "antiquant"
        out_dtype = x.dtype
        bias_dtype = torch.float16 if x.dtype == torch.float16 else torch.float32
        _validate_antiquant_params(given, x.dtype, weight1.dtype, e_lead, (k1, n1), (k2, n2))
    else:
        mode = "float"
        out_dtype = x.dtype
        require(weight1.dtype == x.dtype, NAME, "weight1", f"dtype must equal x's ({dtype_name(x.dtype)}), or be int8/int4",
                dtype_name(weight1.dtype))
        extra = sorted(given)
        require(not extra, NAME, extra[0] if extra else "", "must not be given without int8 x (quant) or int8/int4 weights "
                "(antiquant)", "a tensor")
        bias_dtype = float_bias_dtype(x.dtype)
    for name, bias, n in (("bias1", bias1, n1), ("bias2", bias2, n2)):
        if bias is not None:
            require_dtype(NAME, name, bias, (bias_dtype,))
            require_shape(NAME, name, bias, e_lead + (n,))

    if device:
        _validate_device_mode(mode, act, x.dtype, weight1.dtype, ip, counts, given)
    return FfnConfig(mode, act, counts, tuple(x.shape[:-1]), k1, n1, k2, n2, out_dtype)


def _validate_quant_params(given, e_lead, n1, n2, out_dtype, act) -> None:
    missing = [p for p in QUANT_PARAMS if p not in given]
    require(not missing, NAME, missing[0] if missing else "", "is required with int8 x (quant mode)", None)
    extra = [p for p in ANTIQUANT_PARAMS if p in given]
    require(not extra, NAME, extra[0] if extra else "", "must not be given in quant mode", "a tensor")
    scale, offset, deq1, deq2 = (given[p] for p in QUANT_PARAMS)
    require_dtype(NAME, "scale", scale, (torch.float32,))
    require_dtype(NAME, "offset", offset, (torch.float32,))
    e = e_lead[0] if e_lead else 1
    per_tensor = (e,)
    per_channel = e_lead + (n1,)
    require(tuple(scale.shape) in (per_tensor, per_channel), NAME, "scale",
            f"must have shape {per_tensor} (per-tensor) or {per_channel} (per-channel)", f"shape {shape_of(scale)}")
    require_shape(NAME, "offset", offset, (e,))
    deq_dtypes = (torch.uint64, torch.int64, torch.float32) if out_dtype == torch.float16 else (torch.bfloat16,)
    require_dtype(NAME, "deq_scale1", deq1, deq_dtypes)
    require(deq2.dtype == deq1.dtype, NAME, "deq_scale2", f"dtype must equal deq_scale1's ({dtype_name(deq1.dtype)})",
            dtype_name(deq2.dtype))
    require_shape(NAME, "deq_scale1", deq1, e_lead + (n1,))
    require_shape(NAME, "deq_scale2", deq2, e_lead + (n2,))
    if tuple(scale.shape) == per_channel and per_channel != per_tensor:
        # fp32 deq scales exist for per-tensor quant only (SPEC §5.5).
        require(deq1.dtype != torch.float32, NAME, "deq_scale1",
                "must be uint64/int64/bfloat16 with a per-channel scale", dtype_name(deq1.dtype))
        # A GLU output has N1 / 2 columns: an (.., N1) scale has no defined meaning (no device runs it).
        require(act not in GLU_ACTIVATIONS, NAME, "scale", f"must be per-tensor {per_tensor} with {act}",
                f"shape {shape_of(scale)}")


def _validate_antiquant_params(given, x_dtype, w_dtype, e_lead, kn1, kn2) -> None:
    missing = [p for p in ANTIQUANT_PARAMS if p not in given]
    require(not missing, NAME, missing[0] if missing else "", "is required with int8/int4 weights (antiquant mode)", None)
    extra = [p for p in QUANT_PARAMS if p in given]
    require(not extra, NAME, extra[0] if extra else "", "must not be given in antiquant mode", "a tensor")
    ndim = given["antiquant_scale1"].dim()
    require(ndim in (len(e_lead) + 1, len(e_lead) + 2), NAME, "antiquant_scale1",
            f"must be {len(e_lead) + 1}-D (per-channel) or {len(e_lead) + 2}-D (per-group)",
            f"shape {shape_of(given['antiquant_scale1'])}")
    per_group = ndim == len(e_lead) + 2
    for idx, (k, n) in ((1, kn1), (2, kn2)):
        sc, off = given[f"antiquant_scale{idx}"], given[f"antiquant_offset{idx}"]
        for name, t in ((f"antiquant_scale{idx}", sc), (f"antiquant_offset{idx}", off)):
            require_dtype(NAME, name, t, (x_dtype,))
            require(t.dim() == ndim, NAME, name, f"must have the same rank as antiquant_scale1 ({ndim})", f"shape {shape_of(t)}")
        require_shape(NAME, f"antiquant_offset{idx}", off, tuple(sc.shape))
        if per_group:
            groups = sc.size(-2)
            require(groups >= 1 and k % groups == 0, NAME, f"antiquant_scale{idx}",
                    f"group count must divide K={k}", f"shape {shape_of(sc)}")
            require_shape(NAME, f"antiquant_scale{idx}", sc, e_lead + (groups, n))
        else:
            require_shape(NAME, f"antiquant_scale{idx}", sc, e_lead + (n,))
    if per_group:
        require(w_dtype == INT4_CARRIER, NAME, "weight1", "must be int4 (uint8-packed) for per-group antiquant",
                dtype_name(w_dtype))


def _validate_device_mode(mode, act, x_dtype, w_dtype, inner_precise, counts, given) -> None:
    """Kernel limits of the A2/A3 FFN (SPEC §5.4/§5.5)."""
    if act in GLU_ACTIVATIONS:
        require(mode == "float" and x_dtype == torch.float16 and inner_precise == 1 and counts is None, NAME, "activation",
                f"{act} needs fp16 x and weights, inner_precise=1 and no experts on A2/A3",
                f"x {dtype_name(x_dtype)}, weights {dtype_name(w_dtype)}, inner_precise={inner_precise}, "
                f"experts={'yes' if counts is not None else 'no'}")
    if mode == "float" and x_dtype == torch.bfloat16:
        require(inner_precise == 0, NAME, "inner_precise", "must be 0 (high precision) for bfloat16 x", inner_precise)


def infer_shape(config: FfnConfig) -> tuple[OutSpec, ...]:
    """``y`` ``x.shape[:-1] + (N2,)``: x's dtype, or fp16/bf16 (``output_dtype``) for int8 x (torch_npu
    ignores ``output_dtype`` for other x)."""
    return (OutSpec(config.lead_shape + (config.n2,), config.out_dtype),)


_FLOAT = ("DT_FLOAT16", "DT_BF16")
PROTO: OpProto[FfnConfig] = OpProto(
    name=NAME,
    schema=SCHEMA,
    ge_type="FFN",
    ge_inputs=(
        GeInput("x", ("DT_INT8",) + _FLOAT),
        GeInput("weight1", ("DT_INT8",) + _FLOAT + ("DT_INT4",)),
        GeInput("weight2", ("DT_INT8",) + _FLOAT + ("DT_INT4",)),
        GeInput("expert_tokens", ("DT_INT64",), "optional"),
        GeInput("bias1", ("DT_INT32", "DT_FLOAT16", "DT_FLOAT"), "optional"),
        GeInput("bias2", ("DT_INT32", "DT_FLOAT16", "DT_FLOAT"), "optional"),
        GeInput("scale", ("DT_FLOAT",), "optional"),
        GeInput("offset", ("DT_FLOAT",), "optional"),
        GeInput("deq_scale1", ("DT_UINT64", "DT_BF16"), "optional"),
        GeInput("deq_scale2", ("DT_UINT64", "DT_BF16"), "optional"),
        GeInput("antiquant_scale1", _FLOAT, "optional"),
        GeInput("antiquant_scale2", _FLOAT, "optional"),
        GeInput("antiquant_offset1", _FLOAT, "optional"),
        GeInput("antiquant_offset2", _FLOAT, "optional"),
    ),
    ge_attrs=(GeAttr("activation", "Str", required=True), GeAttr("inner_precise", "Int", 0),
              GeAttr("output_dtype", "Int", -1), GeAttr("tokens_index_flag", "Bool", False)),
    ge_outputs=(GeOutput("y", _FLOAT),),
    validate=validate,
    infer_shape=infer_shape,
)
