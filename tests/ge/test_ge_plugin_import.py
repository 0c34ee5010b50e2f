"""``import moe_fusion`` needs neither torch_npu nor torchair, and registering converters without
torchair registers nothing (checked in a fresh interpreter: this session has torchair imported)."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_needs_no_torchair_and_registration_is_a_no_op():
    code = textwrap.dedent("""
        import sys
        import torch
        import moe_fusion
        from moe_fusion import ge_plugin
        assert ge_plugin.register_converters() is False
        assert ge_plugin.register_npu_dispatch() is False
        assert not {"torchair", "torch_npu"} & set(sys.modules), sorted(sys.modules)
        assert getattr(torch.ops.moe_fusion.npu_ffn.default, "_ge_converter", None) is None
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
