"""End-to-end: the BMM fusion passes on real gloo ranks (4 ranks, one spawn for every case).

``DeepSpeedMoE`` (EP=2 x TP=2 with shard "capacity" and "hidden", EP=4 x TP=1) is compiled with
``moe_fusion.backend()`` (``compiler="eager"``, one inductor case) and once through the inductor
adapter (``post_grad_custom_pre_pass = MoeFusionGraphPass()`` with a plain ``torch.compile``).
Each case checks, on every rank: which ops the compiled graph holds before and after the passes
(the fusion report), the fused output against the unfused eager layer, and the eager layer
against a dense single-process MoE (so the layer itself is right). The functional-collective
forms of ``bmm_forms`` (transposes, reshapes, y2/y3 outputs) are checked the same way.

Tolerances. fp32: the fused ops run the same fp32 matmuls, bias adds, activations and gloo sums
as the unfused graph; only a matmul's blocking may differ (measured: <= 1.2e-7 on O(1) outputs),
so ``1e-5`` abs and rel. The dense oracle sums experts in another order: ``1e-4``. bf16: the op
rounds its fp32 bmm to bf16 like CPU's bf16 bmm does (measured: bitwise equal), but blockings
may round a value one bf16 ulp (2^-8 relative) apart, which the second bmm and the combine
carry: ``1e-2`` of the output scale. The eager bf16 layer against the fp32 dense oracle differs
by the layer's bf16 roundings (measured: 0.6 % of the scale): ``2e-2`` of the scale.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

import bmm_forms
from moe_fusion.launch import run_ranks
from moe_fusion.demo.deepspeed_layer import DeepSpeedMoE
from moe_fusion.passes import FusionReport, MoeFusionGraphPass, backend

AG_BMM, BMM_RS = "moe_fusion.npu_alltoall_allgather_bmm.default", "moe_fusion.npu_bmm_reducescatter_alltoall.default"
A2A, AG, RS = (f"_c10d_functional.{op}.default" for op in ("all_to_all_single", "all_gather_into_tensor",
                                                           "reduce_scatter_tensor"))
HIDDEN, FFN, TOKENS = 16, 24, 24
PATTERNS = ("alltoall_allgather_bmm", "bmm_reducescatter_alltoall")   # the whole pipeline runs; these must fire


@dataclass(frozen=True)
class LayerCase:
    ep: int
    tp: int
    shard: str = "capacity"
    activation: str = "gelu"
    bias: bool = True
    dtype: torch.dtype = torch.float32
    top_k: int = 1
    compiler: str = "eager"      # "eager" | "inductor" (moe_fusion.backend) | "adapter" (post_grad_custom_pre_pass)

    @property
    def id(self) -> str:
        return (f"{self.ep}x{self.tp}-{self.shard}-{self.activation}-{'bias' if self.bias else 'nobias'}-"
                f"{str(self.dtype)[6:]}-top{self.top_k}-{self.compiler}")


LAYER_CASES = [
    LayerCase(2, 2, "capacity", "gelu"),
    LayerCase(2, 2, "hidden", "silu", top_k=2),
    LayerCase(2, 2, "capacity", "relu", bias=False, dtype=torch.bfloat16, top_k=2),
    LayerCase(4, 1, "capacity", "gelu"),
    LayerCase(2, 2, "hidden", "gelu", compiler="inductor"),
    LayerCase(2, 2, "capacity", "silu", compiler="adapter"),
]
# (name, function of (x, w, b, ep_group, tp_group), pass, kind, shard)
FORM_CASES = [
    ("forward-s0-transpose-y2", functools.partial(bmm_forms.forward, shard=0, transpose=True, outputs="y2"), 0),
    ("forward-s1-reshape-y3-fastgelu", functools.partial(bmm_forms.forward, shard=1, reshape=True, act="fastgelu",
                                                         outputs="y3"), 1),
    # tanh GELU (not the op's): the all-to-all, all-gather and bmm fuse, the GELU runs after them.
    ("forward-s0-gelu-tanh-prefix", functools.partial(bmm_forms.forward, shard=0, act="gelu_tanh"), 0),
    ("reverse-s0-transpose", functools.partial(bmm_forms.reverse, shard=0, transpose=True), 0),
    ("reverse-s1", functools.partial(bmm_forms.reverse, shard=1), 1),
]
LOCAL, C = 2, 3


def ep_tp_groups(rank: int, ep: int, tp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Global rank ``p*tp + q``; every rank creates every group in the same order."""
    ep_groups = [dist.new_group([p * tp + q for p in range(ep)]) for q in range(tp)]
    tp_groups = [dist.new_group([p * tp + q for q in range(tp)]) for p in range(ep)]
    return ep_groups[rank % tp], tp_groups[rank // tp]


def dense_moe(full: DeepSpeedMoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's MoE on one process in fp32: every kept (token, expert) pair weighted by its gate."""
    weights = full.gate(x).sum(dim=2)                                    # (S, E); 0 for dropped pairs
    out = torch.zeros(x.size(0), full.hidden)
    for e in range(full.num_experts):
        h = x.float() @ full.w1[e].float()
        h = full.act(h + full.b1[e].float() if full.b1 is not None else h)
        y = h @ full.w2[e].float()
        y = y + full.b2[e].float() if full.b2 is not None else y
        out += weights[:, e:e + 1] * y
    return out


def _compile(case: LayerCase, layer: DeepSpeedMoE, report: FusionReport):
    if case.compiler == "adapter":
        return torch.compile(layer, fullgraph=True, dynamic=False)
    return torch.compile(layer, backend=backend(report=report, compiler=case.compiler), fullgraph=True, dynamic=False)


def _run_layer(rank: int, case: LayerCase, groups: dict) -> dict[str, Any]:
    ep_group, tp_group = groups.setdefault((case.ep, case.tp), ep_tp_groups(rank, case.ep, case.tp))
    options = dict(activation=case.activation, bias=case.bias, shard=case.shard, dtype=case.dtype, top_k=case.top_k,
                   seed=7)
    layer = DeepSpeedMoE(HIDDEN, FFN, 4 * case.ep // case.tp, ep_group=ep_group, tp_group=tp_group, **options)
    full = DeepSpeedMoE(HIDDEN, FFN, 4 * case.ep // case.tp, ep_group=None, tp_group=None, **options)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(rank // case.tp)).to(case.dtype)
    report = FusionReport()
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_pre_pass=MoeFusionGraphPass(report=report)
                                                       if case.compiler == "adapter" else None):
        eager = layer(x)
        fused = _compile(case, layer, report)(x)
        dense = dense_moe(full, x)
    return {"eager": eager, "fused": fused, "dense": dense, "patterns": [e.pattern for e in report.fused()],
            "refused": [e.detail for p in PATTERNS for e in report.refused(p)], "before": dict(report.ops_before),
            "after": dict(report.ops_after)}


def _run_form(rank: int, form, shard: int, groups: dict) -> dict[str, Any]:
    ep_group, tp_group = groups.setdefault((2, 2), ep_tp_groups(rank, 2, 2))
    g = torch.Generator().manual_seed(100 + rank)
    hidden = 8
    if form.func is bmm_forms.forward:
        h = hidden // 2 if shard == 0 else hidden
        inputs = (torch.randn(2 * LOCAL, C, h, generator=g), torch.randn(LOCAL, hidden, 5, generator=g),
                  torch.randn(LOCAL, 1, 5, generator=g))
    else:
        rows = 2 * C if shard == 0 else 4 * C
        cols = hidden // 2 if shard == 0 else hidden
        inputs = (torch.randn(LOCAL, rows, 5, generator=g), torch.randn(LOCAL, 5, hidden, generator=g),
                  torch.randn(LOCAL, 1, cols, generator=g))
    fn = functools.partial(form, ep_group=ep_group, tp_group=tp_group)
    report = FusionReport()
    torch._dynamo.reset()
    fused = torch.compile(fn, backend=backend(report=report, compiler="eager"), fullgraph=True, dynamic=False)(*inputs)
    eager = tuple(t.clone() for t in fn(*inputs))   # clone waits: a view of funcol's async result does not
    return {"eager": eager, "fused": fused, "patterns": [e.pattern for e in report.fused()],
            "refused": [e.detail for p in PATTERNS for e in report.refused(p)]}


def _rank_main(rank: int, world_size: int) -> dict[str, Any]:
    groups: dict = {}
    results = {case.id: _run_layer(rank, case, groups) for case in LAYER_CASES}
    results.update({name: _run_form(rank, form, shard, groups) for name, form, shard in FORM_CASES})
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(4, _rank_main, timeout=420)


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_layer_fused_on_ranks(ranks, case):
    for rank, result in enumerate(ranks):
        got = result[case.id]
        assert got["patterns"] == list(PATTERNS), got
        assert not got["refused"], got["refused"]
        before, after = got["before"], got["after"]
        assert before.get(AG_BMM, 0) == before.get(BMM_RS, 0) == 0
        assert after[AG_BMM] == after[BMM_RS] == 1
        assert before[A2A] == 2 and after.get(A2A, 0) == 0
        # The layer issues its TP collectives even on a TP group of one rank, as DeepSpeed code does.
        assert after.get(RS, 0) == 0 and before.get(RS, 0) == 1
        # hidden shard: the layer's own all-gather of the combined columns stays.
        assert after.get(AG, 0) == (case.shard == "hidden")
        fused, eager, dense = got["fused"], got["eager"], got["dense"]
        assert fused.dtype == eager.dtype == case.dtype and fused.shape == (TOKENS, HIDDEN)
        if case.dtype == torch.float32:
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
            torch.testing.assert_close(eager, dense, rtol=1e-4, atol=1e-4, msg=f"rank {rank}")
        else:
            scale = dense.abs().max().item()
            assert (fused.float() - eager.float()).abs().max().item() <= 1e-2 * scale, f"rank {rank}"
            assert (eager.float() - dense).abs().max().item() <= 2e-2 * scale, f"rank {rank}"


@pytest.mark.parametrize("name", [name for name, _, _ in FORM_CASES])
def test_forms_fused_on_ranks(ranks, name):
    pattern = "alltoall_allgather_bmm" if name.startswith("forward") else "bmm_reducescatter_alltoall"
    for rank, result in enumerate(ranks):
        got = result[name]
        assert got["patterns"] == [pattern] and not got["refused"], got
        assert len(got["fused"]) == len(got["eager"])
        for fused, eager in zip(got["fused"], got["eager"]):
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
