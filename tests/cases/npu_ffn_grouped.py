"""Inputs for ``npu_ffn_grouped``: ``GroupedCase`` describes a valid call, ``make_call`` builds it (the
counts as an int64 tensor, ``rows`` of x of which the counts may cover fewer: padding rows), and
``opcheck_cases`` lists the representative calls ``test_registry.py`` runs ``opcheck`` on."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GLU = ("geglu", "swiglu", "reglu")


@dataclass(frozen=True)
class GroupedCase:
    counts: tuple = (2, 0, 3)             # rows per expert; sum <= rows
    rows: int = 7                         # M; rows past sum(counts) are padding (output zero)
    dtype: torch.dtype = torch.float32
    activation: str = "silu"
    k1: int = 8
    hidden: int = 6                       # K2; N1 = K2, or 2 * K2 for GLU
    n2: int = 8
    bias: bool = False
    index_form: bool = False              # cumulative ends (tokens_index_flag=True)
    inner_precise: int = 0
    seed: int = 0

    @property
    def n1(self) -> int:
        return 2 * self.hidden if self.activation.lower() in GLU else self.hidden


def make_call(case: GroupedCase) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``npu_ffn_grouped`` for ``case``; weights scaled by ``1/sqrt(K)``."""
    gen = torch.Generator().manual_seed(case.seed)
    e = len(case.counts)
    x = torch.randn(case.rows, case.k1, generator=gen).to(case.dtype)
    w1 = (torch.randn(e, case.k1, case.n1, generator=gen) / math.sqrt(case.k1)).to(case.dtype)
    w2 = (torch.randn(e, case.hidden, case.n2, generator=gen) / math.sqrt(case.hidden)).to(case.dtype)
    tokens = torch.tensor(case.counts, dtype=torch.int64)
    kwargs: dict = {"expert_tokens": tokens.cumsum(0) if case.index_form else tokens,
                    "inner_precise": case.inner_precise}
    if case.index_form:
        kwargs["tokens_index_flag"] = True
    if case.bias:
        bias_dtype = torch.float16 if case.dtype == torch.float16 else torch.float32
        kwargs["bias1"] = (0.5 * torch.randn(e, case.n1, generator=gen)).to(bias_dtype)
        kwargs["bias2"] = (0.5 * torch.randn(e, case.n2, generator=gen)).to(bias_dtype)
    return (x, w1, w2, case.activation), kwargs


def opcheck_cases() -> list[tuple[tuple, dict]]:
    return [make_call(c) for c in (
        GroupedCase(),
        GroupedCase(dtype=torch.bfloat16, bias=True, activation="gelu"),
        GroupedCase(dtype=torch.float16, activation="swiglu", inner_precise=1, index_form=True),
        GroupedCase(counts=(0, 0), rows=3),
    )]
