"""Fake kernels of the local ops reproduce torch_npu 2.13's Meta outputs (tests/data/fidelity, a copy of the shared fidelity data)."""
import pytest
import torch

import moe_fusion
from fidelity import cases


def _outputs(result):
    result = result if isinstance(result, tuple) else (result,)
    return [(tuple(t.shape), t.dtype) for t in result]


@pytest.mark.parametrize("op", ["npu_moe_re_routing", "npu_moe_update_expert", "npu_ffn"])
def test_fake_kernels_match_torch_npu_meta(op):
    fn = getattr(torch.ops.moe_fusion, op)
    seen = 0
    for case_id, args, kwargs, expected in cases(op):
        if op == "npu_ffn" and "output_dtype" in kwargs and isinstance(kwargs["output_dtype"], str):
            kwargs["output_dtype"] = getattr(torch, kwargs["output_dtype"])
        if op == "npu_ffn" and args[0].dtype == torch.int8:
            # Exception: torch_npu's Meta accepts int8 x without quant parameters; SPEC §5.5 requires
            # scale, offset, deq_scale1/2 in quant mode, so the case is run with minimal ones.
            kwargs.update(_minimal_quant_params(args, kwargs))
        with moe_fusion.target("A3"):  # the grid was run with the SoC treated as A2/A3
            if expected == "error":
                with pytest.raises(moe_fusion.OpValidationError):
                    fn(*args, **kwargs)
            else:
                assert _outputs(fn(*args, **kwargs)) == expected, case_id
        seen += 1
    assert seen > 0


def _minimal_quant_params(args, kwargs):
    x, w1, w2 = args[:3]
    experts = kwargs.get("expert_tokens")
    lead = (len(experts),) if experts else ()
    e = lead[0] if lead else 1
    deq_dtype = torch.bfloat16 if kwargs.get("output_dtype") == torch.bfloat16 else torch.int64
    meta = dict(device="meta")
    return {
        "scale": torch.empty((e,), dtype=torch.float32, **meta),
        "offset": torch.empty((e,), dtype=torch.float32, **meta),
        "deq_scale1": torch.empty(lead + (w1.size(-1),), dtype=deq_dtype, **meta),
        "deq_scale2": torch.empty(lead + (w2.size(-1),), dtype=deq_dtype, **meta),
    }


def test_fidelity_file_is_present_and_covers_every_local_op():
    counts = {op: sum(1 for _ in cases(op)) for op in ["npu_moe_re_routing", "npu_moe_update_expert", "npu_ffn"]}
    assert all(n >= 10 for n in counts.values()), counts
