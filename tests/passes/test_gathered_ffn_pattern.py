"""The gathered FFN form (``ffn_forms``): per-row expert weights ``W[ids]`` and two bmms, as HF
transformers' ``batched_mm`` experts write it, become a stable sort of the rows by expert,
``npu_ffn_grouped(..., tokens_index_flag=True)`` over them and the rows put back in order; look-alikes
whose ids are not provably in ``[0, E)`` are refused with the reason. The HF blocks themselves
(``W`` stored ``(E, N, K)``, GLU) are in ``tests/integration/test_hf_transformers.py``; here the other
layout, ``x[:, None] @ W[ids]`` with ``W`` ``(E, K, N)``, a plain activation and the look-alikes. The
reference is the unfused module itself, run eagerly; fp32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_fusion.passes import FusionReport, backend
from step_results import step_results

E, K, INNER, TOKENS, TOP_K = 4, 8, 16, 6, 2


class GatheredExperts(torch.nn.Module):
    """Router ``topk`` over ``choices`` scores, then ``down(act(x @ W1[ids])) @ W2[ids]`` per
    (token, choice) row, weighted and summed over the choices. ``shift`` adds to the second
    bmm's ids (a look-alike); ``choices > E`` routes over more experts than the stacks hold (the
    extra ones penalized so that the router never picks them and eager runs)."""

    def __init__(self, choices: int = E, shift: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.router = torch.nn.Parameter(torch.randn(K, choices, generator=g) * 0.3)
        self.w1 = torch.nn.Parameter(torch.randn(E, K, INNER, generator=g) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(E, INNER, K, generator=g) * 0.3)
        self.shift = shift
        self.register_buffer("penalty", (torch.arange(choices) >= E).float() * 1e4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = torch.topk((x @ self.router - self.penalty).softmax(-1), TOP_K)
        rows = x.repeat_interleave(TOP_K, dim=0)
        ids = ids.reshape(-1)
        h = F.silu(torch.bmm(rows.unsqueeze(1), self.w1[ids]).squeeze(1))
        second = ids if not self.shift else (ids + self.shift) % E
        y = torch.bmm(h.unsqueeze(1), self.w2[second]).squeeze(1)
        return (y * weights.reshape(-1, 1)).view(x.size(0), TOP_K, K).sum(1)


def _compile(model: torch.nn.Module, train: bool) -> tuple[FusionReport, list[torch.Tensor], list[torch.Tensor]]:
    """Report, and (output, grads) of the compiled and of the eager model."""
    x = torch.randn(TOKENS, K, generator=torch.Generator().manual_seed(1))
    report = FusionReport()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend(report=report, compiler="eager"), fullgraph=True)
    got, want = (step_results(model, run, x, train) for run in (compiled, model))
    return report, got, want


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_gathered_ffn_fuses(train):
    report, got, want = _compile(GatheredExperts(), train)
    fused = report.fused("ffn")
    assert [e.detail for e in fused] == ["npu_ffn_grouped(silu, plain, no bias1, torch.float32), rows sorted by "
                                         "expert from per-row W[ids] (batched_mm)"], report.format()
    assert report.ops_after["aten.bmm.default"] == 0, report.format()
    assert len(got) == len(want) == (5 if train else 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("model,reason", [
    (GatheredExperts(shift=1), "the two matmuls gather expert weights by different ids"),
    (GatheredExperts(choices=E - 1), None),         # fewer choices than experts: still exact, fuses
    (GatheredExperts(choices=E + 1), "the routing ids choose among 5 experts but the stacks hold 4"),
])
def test_gathered_look_alikes(model, reason):
    """Refused (graph left as it was, output equal to eager) unless the ids are provably in range."""
    report, got, want = _compile(model, train=False)
    if reason is None:
        assert report.fused("ffn"), report.format()
    else:
        assert not report.fused(), report.format()
        assert any(reason in e.detail for e in report.refused("ffn")), report.format()
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=2e-5)
