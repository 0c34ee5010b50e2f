"""Every pass follows one protocol (``moe_fusion.passes.context``): ``find_<pattern>(graph, ctx)``
returning match records with ``replace_with(graph)`` / ``erase()``; passes share code only through
lower modules; fusions and refusals are counted where inductor's tooling looks."""
from __future__ import annotations

import ast
import importlib
import inspect
import pathlib

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from moe_fusion.passes import PIPELINE, run_fusion_passes

from pass_helpers import calls, trace

PATTERN_MODULES = {inspect.getmodule(p.find).__name__ for p in PIPELINE}


def test_pipeline_names_one_find_per_pattern_module():
    assert [p.name for p in PIPELINE] == ["moe_allgather_ep", "moe_capacity_a2a", "moe_split_a2a",
                                          "alltoall_allgather_bmm", "bmm_reducescatter_alltoall", "ffn", "re_routing"]
    for fusion_pass in PIPELINE:
        assert fusion_pass.find.__name__.startswith("find_"), fusion_pass
        params = list(inspect.signature(fusion_pass.find).parameters)
        assert params == ["graph", "ctx"], (fusion_pass.name, params)
    assert len(PATTERN_MODULES) == len(PIPELINE)


def _imported_modules(module_name: str) -> set[str]:
    path = pathlib.Path(importlib.import_module(module_name).__file__)
    package = module_name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(f"{package}.{node.module}")
            found |= {f"{package}.{alias.name}" for alias in node.names}
    return found


def test_no_pass_imports_another_pass():
    for module in PATTERN_MODULES:
        others = _imported_modules(module) & (PATTERN_MODULES - {module})
        assert not others, f"{module} imports the passes {sorted(others)}"


def test_match_records_have_the_protocol_methods():
    for module_name in PATTERN_MODULES:
        module = importlib.import_module(module_name)
        records = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                   if obj.__module__ == module_name and hasattr(obj, "replace_with")]
        for record in records:
            assert list(inspect.signature(record.replace_with).parameters) == ["self", "graph"], record
            for name in ("erase", "describe", "anchor", "nodes"):
                assert hasattr(record, name), (record, name)


def _mlp(x, w1, w2):
    return F.linear(F.silu(F.linear(x, w1)), w2)


def test_fusions_and_refusals_are_counted():
    counters.clear()
    x, w1, w2 = torch.randn(8, 16), torch.randn(32, 16), torch.randn(16, 32)
    gm = trace(_mlp, x, w1, w2)
    run_fusion_passes(gm.graph, passes=["ffn"])
    assert counters["moe_fusion"]["fused_ffn"] == 1
    gm = trace(_mlp, x, w1, w2)
    report = run_fusion_passes(gm.graph, passes=["ffn"], target="A3")   # fp32 npu_ffn does not exist on A3
    assert counters["moe_fusion"]["refused_ffn"] == len(report.refused("ffn")) == 1
    assert "would be invalid on target A3" in report.refused("ffn")[0].detail
    # A refusal at rewrite time leaves the graph as it was: no fused op, no stray inserted node.
    assert not calls(gm, torch.ops.moe_fusion.npu_ffn) and report.ops_before == report.ops_after
