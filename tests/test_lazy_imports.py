"""``import moe_fusion`` loads the ops only; the passes, torchair backend and ONNX package resolve
on first attribute access, as ``torch.onnx`` does after ``import torch``."""
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_loads_neither_passes_nor_onnx():
    loaded = _run("import sys, moe_fusion; print(sorted(m for m in ('moe_fusion.passes', 'moe_fusion.onnx', 'onnx') "
                  "if m in sys.modules))")
    assert loaded == "[]"


def test_onnx_resolves_after_plain_import():
    pytest.importorskip("onnx")
    out = _run("import moe_fusion; print(moe_fusion.onnx.export.__module__, callable(moe_fusion.onnx.translation_table))")
    assert out == "moe_fusion.onnx.export True"


def test_passes_resolve_after_plain_import():
    out = _run("import moe_fusion; print(moe_fusion.backend.__module__, moe_fusion.explain.__module__)")
    assert out == "moe_fusion.passes.pipeline moe_fusion.passes.explain"


def test_unknown_attribute_is_an_attribute_error():
    out = _run("import moe_fusion\ntry:\n    moe_fusion.no_such_thing\nexcept AttributeError as e:\n    print(e)")
    assert out == "module 'moe_fusion' has no attribute 'no_such_thing'"
