"""``moe_fusion.explain`` and ``python -m moe_fusion explain module:factory`` on the example factory."""
import pathlib
import sys

import pytest

from moe_fusion.__main__ import main as moe_fusion_main

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.setattr(sys, "path", [str(EXAMPLES)] + sys.path)


def test_explain_cli_reports_fused_and_refused(examples_on_path, capsys):
    assert moe_fusion_main(["explain", "mlp_factory:make_mlp"]) == 0
    out = capsys.readouterr().out
    fused = [line for line in out.splitlines() if line.strip().startswith("FUSED")]
    refused = [line for line in out.splitlines() if line.strip().startswith("REFUSED")]
    assert len(fused) == 1 and "npu_ffn(gelu" in fused[0]
    assert len(refused) == 1 and "exact erf form" in refused[0]
    assert "moe_fusion.npu_ffn.default" in out and "0 ->    1" in out


def test_explain_training_graph_fuses_before_autograd(examples_on_path):
    """With autograd, the tanh MLP fuses too (before AOT autograd, so no intermediate is saved for
    backward); the erf MLP is refused for its activation, as in inference."""
    from mlp_factory import make_mlp

    from moe_fusion import explain

    model, inputs = make_mlp()
    report = explain(model, *inputs, grad=True, print_report=False)
    assert [e.detail.split(",")[0] for e in report.fused()] == ["npu_ffn(gelu"]
    assert not any("saved for backward" in e.detail for e in report.refused("ffn"))
    assert any("exact erf form" in e.detail for e in report.refused("ffn"))


def test_explain_factory_without_colon_is_a_clear_error(capsys):
    assert moe_fusion_main(["explain", "mlp_factory"]) == 2
    err = capsys.readouterr().err
    assert err == ("python -m moe_fusion explain: error: give the factory as module:function "
                   "(returning (model, inputs)), got 'mlp_factory'\n")
