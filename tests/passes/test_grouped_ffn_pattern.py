"""The grouped FFN form (``ffn_forms``): two grouped matmuls over the same row segments with an
activation between them, as HF transformers' ``grouped_mm`` experts write it, become one
``npu_ffn_grouped(..., expert_tokens=offs, tokens_index_flag=True)``; look-alikes are refused with
the reason. The reference is the unfused module itself, run eagerly. bf16: the only dtype
``torch._grouped_mm`` traces in (HF falls back to its own op otherwise, ``test_hf_transformers``);
the fused op keeps ``h`` in fp32 where the unfused graph rounds it to bf16 (``ffn_forms``' low
precision argument), so results agree to bf16 rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_fusion.passes import FusionReport, backend
from step_results import step_results

E, K, INNER, ROWS = 3, 8, 16, 10      # row strides: multiples of 16 bytes (_grouped_mm)
BF16 = torch.bfloat16


class GroupedExperts(torch.nn.Module):
    """``down(act(gate) * up)`` per expert over sorted rows (``offs``: int32 segment ends);
    ``activation(gate, up)`` combines the two halves of the first grouped matmul."""

    def __init__(self, activation, glu: bool = True, second_offs_shift: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter((torch.randn(E, K, (2 if glu else 1) * INNER, generator=g) * 0.3).to(BF16))
        self.w2 = torch.nn.Parameter((torch.randn(E, INNER, K, generator=g) * 0.3).to(BF16))
        self.activation, self.glu, self.shift = activation, glu, second_offs_shift

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        h = torch._grouped_mm(x, self.w1, offs=offs)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            a = self.activation(gate) * up
        else:
            a = self.activation(h)
        other = offs if not self.shift else torch.clamp(offs - self.shift, min=0)
        return torch._grouped_mm(a, self.w2, offs=other)


OFFS = torch.tensor([4, 4, ROWS], dtype=torch.int32)      # an empty middle expert


def _compile(model: torch.nn.Module, train: bool) -> tuple[FusionReport, list[torch.Tensor], list[torch.Tensor]]:
    """Report, and (output, grads) of the compiled and of the eager model."""
    x = torch.randn(ROWS, K, generator=torch.Generator().manual_seed(1)).to(BF16)
    report = FusionReport()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend(report=report, compiler="eager"), fullgraph=True)
    got, want = (step_results(model, lambda leaf, run=run: run(leaf, OFFS), x, train) for run in (compiled, model))
    return report, got, want


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("activation,glu,name", [(F.silu, True, "swiglu"), (F.relu, True, "reglu"),
                                                 (lambda t: F.gelu(t, approximate="tanh"), False, "gelu")])
def test_grouped_ffn_fuses(activation, glu, name, train):
    report, got, want = _compile(GroupedExperts(activation, glu), train)
    fused = report.fused("ffn")
    assert [e.detail.split("(")[0] for e in fused] == ["npu_ffn_grouped"], report.format()
    assert fused[0].detail.startswith(f"npu_ffn_grouped({name},")
    assert report.ops_after["aten._grouped_mm.default"] == 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("model,reason", [
    (GroupedExperts(F.silu, second_offs_shift=1), "the two grouped matmuls use different segment offsets"),
    (GroupedExperts(F.gelu, glu=False), "exact erf form"),
])
def test_grouped_look_alikes_are_refused(model, reason):
    report, got, want = _compile(model, train=False)
    assert not report.fused(), report.format()
    assert any(reason in e.detail for e in report.refused("ffn")), report.format()
    defined = ROWS - 1      # _grouped_mm leaves rows past the shifted last offset unwritten
    torch.testing.assert_close(got[0][:defined].float(), want[0][:defined].float(), rtol=2e-2, atol=2e-2)
