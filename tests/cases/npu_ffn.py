"""Inputs for ``npu_ffn``: ``FfnCase`` describes a valid call, ``make_call`` builds its tensors, and
``opcheck_cases`` lists the representative calls ``test_registry.py`` runs ``opcheck`` on.

Magnitudes keep every intermediate O(1): weights scaled by ``1/sqrt(K)``, int8 dequant scales by the
inverse of the int32 accumulator's spread, so fp16 never overflows and the int8 requant uses most of
its range (with some saturation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

GLU = ("geglu", "swiglu", "reglu")


@dataclass(frozen=True)
class FfnCase:
    mode: str = "float"                   # "float" | "quant" | "antiquant"
    dtype: torch.dtype = torch.float32    # x dtype; for quant, the output dtype
    activation: str = "relu"
    lead: tuple = (6,)                    # x.shape[:-1]
    k1: int = 8
    hidden: int = 8                       # K2; N1 = K2, or 2 * K2 for GLU
    n2: int = 8
    counts: Optional[tuple] = None        # rows per expert; None = no experts
    index_form: bool = False              # pass the counts as cumulative ends (expert_tokens_index)
    bias: bool = True
    inner_precise: Optional[int] = None
    per_channel: bool = False             # quant: (.., N1) scale instead of one per expert
    deq_dtype: Optional[torch.dtype] = None    # quant: default uint64 (fp16 out), bf16 (bf16 out)
    output_dtype_arg: bool = True         # quant: pass output_dtype (fp16 is also the default)
    weight_dtype: str = "int8"            # antiquant: "int8" | "int4"
    groups: int = 0                       # antiquant: 0 = per-channel, else G groups along K
    seed: int = 0

    @property
    def n1(self) -> int:
        return 2 * self.hidden if self.activation.lower() in GLU else self.hidden


def _uniform(gen, shape, lo, hi) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)


def encode_deq(values: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Deq scales as ``dtype``: uint64/int64 carry the float32 bits in the low word (SPEC §5.4) and
    arbitrary bits in the high word, which decoding must ignore (int64 ones may be negative)."""
    if dtype not in (torch.uint64, torch.int64):
        return values.to(dtype)
    low = values.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if dtype == torch.uint64:
        high = torch.randint(0, 2 ** 31, values.shape, generator=gen, dtype=torch.int64)
        return ((high << 32) | low).to(torch.uint64)
    high = torch.randint(-2 ** 31, 2 ** 31, values.shape, generator=gen, dtype=torch.int64)
    return (high << 32) | low


def _float_tensors(case: FfnCase, gen, lead_e, k2) -> dict:
    dt = case.dtype
    bias_dtype = torch.float16 if dt == torch.float16 else torch.float32
    t = {
        "x": torch.randn(case.lead + (case.k1,), generator=gen).to(dt),
        "weight1": (torch.randn(lead_e + (case.k1, case.n1), generator=gen) / math.sqrt(max(case.k1, 1))).to(dt),
        "weight2": (torch.randn(lead_e + (k2, case.n2), generator=gen) / math.sqrt(max(k2, 1))).to(dt),
    }
    if case.bias:
        t["bias1"] = (0.5 * torch.randn(lead_e + (case.n1,), generator=gen)).to(bias_dtype)
        t["bias2"] = (0.5 * torch.randn(lead_e + (case.n2,), generator=gen)).to(bias_dtype)
    return t


def _quant_tensors(case: FfnCase, gen, lead_e, k2) -> dict:
    int8 = lambda shape: torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    num = lead_e[0] if lead_e else 1
    deq_dtype = case.deq_dtype or (torch.uint64 if case.dtype == torch.float16 else torch.bfloat16)
    spread = 74.0 * 74.0      # std of an int8 x int8 product
    t = {
        "x": int8(case.lead + (case.k1,)),
        "weight1": int8(lead_e + (case.k1, case.n1)),
        "weight2": int8(lead_e + (k2, case.n2)),
        "scale": _uniform(gen, lead_e + (case.n1,) if case.per_channel else (num,), 20, 60).float(),
        "offset": _uniform(gen, (num,), -3, 3).float(),
        "deq_scale1": encode_deq(_uniform(gen, lead_e + (case.n1,), 0.5, 1.5) / (spread * math.sqrt(max(case.k1, 1))),
                                 deq_dtype, gen),
        "deq_scale2": encode_deq(_uniform(gen, lead_e + (case.n2,), 0.5, 1.5) / (30 * 74 * math.sqrt(max(k2, 1))),
                                 deq_dtype, gen),
    }
    if case.bias:
        t["bias1"] = torch.randint(-3000, 3000, lead_e + (case.n1,), generator=gen, dtype=torch.int32)
        t["bias2"] = torch.randint(-3000, 3000, lead_e + (case.n2,), generator=gen, dtype=torch.int32)
    return t


def _antiquant_tensors(case: FfnCase, gen, lead_e, k2) -> dict:
    dt = case.dtype
    int4 = case.weight_dtype == "int4"
    spread, offset_std = (4.6, 1.0) if int4 else (74.0, 3.0)     # std of uniform int4 / int8 values

    def weight(k, n):
        if int4:    # every byte is a valid pair of int4 values
            return torch.randint(0, 256, lead_e + (k, n // 2), generator=gen, dtype=torch.uint8)
        return torch.randint(-128, 128, lead_e + (k, n), generator=gen, dtype=torch.int8)

    def params(k, n):
        shape = lead_e + ((case.groups, n) if case.groups else (n,))
        scale = (_uniform(gen, shape, 0.5, 1.5) / (spread * math.sqrt(max(k, 1)))).to(dt)
        return scale, (offset_std * torch.randn(shape, generator=gen)).to(dt)

    t = {"x": torch.randn(case.lead + (case.k1,), generator=gen).to(dt),
         "weight1": weight(case.k1, case.n1), "weight2": weight(k2, case.n2)}
    t["antiquant_scale1"], t["antiquant_offset1"] = params(case.k1, case.n1)
    t["antiquant_scale2"], t["antiquant_offset2"] = params(k2, case.n2)
    if case.bias:
        bias_dtype = torch.float16 if dt == torch.float16 else torch.float32
        t["bias1"] = (0.5 * torch.randn(lead_e + (case.n1,), generator=gen)).to(bias_dtype)
        t["bias2"] = (0.5 * torch.randn(lead_e + (case.n2,), generator=gen)).to(bias_dtype)
    return t


def make_call(case: FfnCase) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``npu_ffn`` for ``case``."""
    gen = torch.Generator().manual_seed(case.seed)
    lead_e = () if case.counts is None else (len(case.counts),)
    build = {"float": _float_tensors, "quant": _quant_tensors, "antiquant": _antiquant_tensors}[case.mode]
    t = build(case, gen, lead_e, case.hidden)
    args = (t.pop("x"), t.pop("weight1"), t.pop("weight2"), case.activation)
    kwargs = dict(t)
    if case.counts is not None:
        if case.index_form:
            kwargs["expert_tokens_index"] = [sum(case.counts[:i + 1]) for i in range(len(case.counts))]
        else:
            kwargs["expert_tokens"] = list(case.counts)
    if case.inner_precise is not None:
        kwargs["inner_precise"] = case.inner_precise
    if case.mode == "quant" and case.output_dtype_arg:
        kwargs["output_dtype"] = case.dtype
    return args, kwargs


REPRESENTATIVE = (
    FfnCase(activation="gelu"),
    FfnCase(activation="swiglu", lead=(2, 3), counts=(2, 0, 4), seed=1),
    FfnCase(dtype=torch.float16, activation="silu", lead=(4,), counts=(1, 3), index_form=True, inner_precise=1, seed=2),
    FfnCase(dtype=torch.bfloat16, activation="FastGelu", lead=(2, 2), counts=(4, 0), bias=False, seed=3),
    FfnCase(dtype=torch.float16, activation="reglu", inner_precise=1, seed=4),
    FfnCase(mode="quant", dtype=torch.float16, activation="relu", output_dtype_arg=False, seed=5),
    FfnCase(mode="quant", dtype=torch.bfloat16, activation="gelu", counts=(3, 3), per_channel=True, seed=6),
    FfnCase(mode="quant", dtype=torch.float16, activation="silu", counts=(0, 6), index_form=True,
            deq_dtype=torch.int64, per_channel=True, seed=7),
    FfnCase(mode="quant", dtype=torch.float16, activation="geglu", deq_dtype=torch.float32, seed=8),
    FfnCase(mode="antiquant", dtype=torch.float16, activation="gelu", counts=(2, 4), seed=9),
    FfnCase(mode="antiquant", dtype=torch.bfloat16, activation="silu", weight_dtype="int4", groups=2, seed=10),
    FfnCase(mode="antiquant", dtype=torch.float16, activation="relu", weight_dtype="int4", lead=(3, 2),
            counts=(5, 1), seed=11),
)


def opcheck_cases() -> list[tuple[tuple, dict]]:
    return [make_call(case) for case in REPRESENTATIVE]
