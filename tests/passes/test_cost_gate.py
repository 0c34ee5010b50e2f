"""The cost gate (``moe_fusion.passes.cost``): under inductor, a bf16/fp16 FFN on a device that
multiplies that dtype natively is left unfused (the fused reference multiplies in fp32) and the
report says why; the gathered form keeps fusing in training; ``cost_gate=False``, the ``eager``
compiler and fp32 FFNs are not gated. Which CPU this is must not matter: the tests set the CPU's
capability flags themselves. A decode-sized gathered form (few rows per expert) is gated in
inference on CPU whatever the dtype. The reference is the unfused module, run eagerly."""
from __future__ import annotations

import pytest
import torch

import moe_fusion
from moe_fusion.passes import FusionReport, cost
from step_results import step_results
from test_gathered_ffn_pattern import GatheredExperts

H, INNER, TOKENS = 64, 96, 16


@pytest.fixture
def cpu_multiplies_bf16(monkeypatch):
    """This CPU has AMX (bf16 matmuls natively), whatever it really has."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    """This CPU has neither AMX nor AVX512-BF16."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)


def _ffn(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(H, INNER), torch.nn.ReLU(), torch.nn.Linear(INNER, H)).to(dtype)


def _run(model: torch.nn.Module, x: torch.Tensor, train: bool, **options) -> tuple[FusionReport, list, list]:
    """Report, and (output, grads) of ``moe_fusion.compile(model, **options)`` and of the eager model."""
    report = FusionReport()
    torch._dynamo.reset()
    compiled = moe_fusion.compile(model, report=report, **options)
    got, want = (step_results(model, run, x, train) for run in (compiled, model))
    return report, got, want


def _close(got: list, want: list, dtype: torch.dtype) -> None:
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_bf16_ffn_left_unfused_where_bf16_is_native(cpu_multiplies_bf16, train):
    x = torch.randn(TOKENS, H).bfloat16()
    report, got, want = _run(_ffn(torch.bfloat16), x, train)
    assert not report.fused("ffn"), report.format()
    # (In training the forward graph AOT autograd returns is fused again, and refused there too:
    # its intermediates are saved for the backward.)
    assert "slower here than the unfused code" in report.refused("ffn")[0].detail, report.format()
    assert "bfloat16 natively (AMX)" in report.refused("ffn")[0].detail, report.format()
    _close(got, want, torch.bfloat16)


@pytest.mark.parametrize("options", [{"cost_gate": False}, {"compiler": "eager"}], ids=["cost_gate=False", "eager"])
def test_bf16_ffn_fuses_without_the_gate(cpu_multiplies_bf16, options):
    x = torch.randn(TOKENS, H).bfloat16()
    report, got, want = _run(_ffn(torch.bfloat16), x, False, **options)
    assert [e.detail.split(",")[0] for e in report.fused("ffn")] == ["npu_ffn(relu"], report.format()
    _close(got, want, torch.bfloat16)


def test_bf16_ffn_fuses_where_bf16_is_not_native(cpu_without_bf16):
    report, got, want = _run(_ffn(torch.bfloat16), torch.randn(TOKENS, H).bfloat16(), False)
    assert len(report.fused("ffn")) == 1, report.format()
    _close(got, want, torch.bfloat16)


def test_fp32_ffn_is_not_gated(cpu_multiplies_bf16):
    report, got, want = _run(_ffn(torch.float32), torch.randn(TOKENS, H), True)
    assert len(report.fused("ffn")) == 1, report.format()
    _close(got, want, torch.float32)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_gathered_form_is_gated_in_inference_only(cpu_multiplies_bf16, train):
    """HF batched_mm's unfused backward scatters one weight gradient per row: fused, the training
    step is faster even with fp32 matmuls, so only inference is gated."""
    model = GatheredExperts().bfloat16()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    report, got, want = _run(model, x, train, fullgraph=True)
    assert len(report.fused("ffn")) == (1 if train else 0), report.format()
    _close(got, want, torch.bfloat16)


@pytest.mark.parametrize("tokens,fused", [(6, False), (12, True)], ids=["3-rows-per-expert", "6-rows-per-expert"])
def test_decode_sized_gathered_inference_is_gated_on_cpu(tokens, fused):
    """fp32 HF batched_mm inference: with fewer than MIN_GATHERED_ROWS rows per expert (top-2 of 4
    experts: 2 * tokens / 4 rows each) plain inductor's one generated loop is faster here."""
    model = GatheredExperts()
    x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(1))
    report, got, want = _run(model, x, False, fullgraph=True)
    assert len(report.fused("ffn")) == int(fused), report.format()
    if not fused:
        why = report.refused("ffn")[0].detail
        assert "slower here" in why and "12 rows over 4 experts (3.0 per expert, under 6)" in why, why
    _close(got, want, torch.float32)


def test_decode_steps_after_a_prefill_are_gated_in_their_dynamic_graph():
    """A generate loop: the prefill compiles static and fuses; the first decode step recompiles with a
    dynamic row count, which the gate guards on (one graph each side of the threshold)."""
    model = GatheredExperts().eval()
    report = FusionReport()
    torch._dynamo.reset()
    compiled = moe_fusion.compile(model, report=report)
    with torch.no_grad():
        for tokens in (64, 4, 3, 48):           # prefill, two decode steps, a second long prompt
            x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(tokens))
            _close([compiled(x)], [model(x)], torch.float32)
    assert len(report.fused("ffn")) == 2, report.format()       # the static prefill, the dynamic long graph
    refused = [e.detail for e in report.refused("ffn")]
    assert len(refused) == 1 and "8 rows over 4 experts (2.0 per expert" in refused[0], report.format()


def test_decode_sized_gathered_training_fuses():
    report, got, want = _run(GatheredExperts(), torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), True,
                             fullgraph=True)
    assert len(report.fused("ffn")) == 1, report.format()
    _close(got, want, torch.float32)


def test_native_matmul():
    cpu = torch.device("cpu")
    assert cost.native_matmul(torch.float32, cpu) is None
    with torch.backends.mkldnn.flags(enabled=False):
        assert cost.native_matmul(torch.bfloat16, cpu) is None      # no oneDNN: converted to fp32 anyway
    assert cost.native_matmul(torch.bfloat16, torch.device("meta")) is None


def test_explain_reports_the_gate_for_inductor_only(cpu_multiplies_bf16):
    """``explain(compiler="inductor")`` reports what the default ``moe_fusion.compile`` does; the
    eager compiler (explain's default) never gates."""
    x = torch.randn(TOKENS, H).bfloat16()
    gated = moe_fusion.explain(_ffn(torch.bfloat16), x, print_report=False, compiler="inductor")
    assert not gated.fused("ffn") and "slower here" in gated.refused("ffn")[0].detail, gated.format()
    assert moe_fusion.explain(_ffn(torch.bfloat16), x, print_report=False).fused("ffn")
