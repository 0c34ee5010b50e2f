"""The cost gate: rewrites that would make inductor's code slower than the unfused code.

Off Ascend a fused op runs as its reference kernel (inlined into ATen ops for inductor by
``lowering``). Where that kernel is known to do more work on the device than the chain it replaces,
fusing is a regression, whatever the op count says. Under the gate (``gated(True)``: inductor's
compiles, ``moe_fusion.compile(..., cost_gate=True)`` by default) such a rewrite is refused, the
graph keeps the unfused chain, and the report says why. GE compiles the fused ops to CANN's kernels
and ONNX exports them as they are: neither is gated.

The known cases:

* an FFN stored in bf16 or fp16 on a device that multiplies that dtype natively
(CPU AMX / AVX512-BF16 / AMX-FP16 through oneDNN, CUDA tensor cores). ``npu_ffn`` keeps such an
FFN's first matmul and its activation in fp32 (SPEC §5.4, the device's high-precision mode), and no
portable ATen matmul takes bf16 operands to an fp32 result, so the reference multiplies in fp32: on
an AMX CPU 4-8x the time of the unfused chain's bf16 matmuls (``benchmarks/bench_models.py
--hf-dtype bfloat16``). Kept despite that: the gathered form (HF ``batched_mm``) in a training
graph, whose unfused backward scatters a weight gradient per row; fused, its training step measured
6-8x faster (0.12-0.18x) there.
* a capacity block in DeepSpeed's sparse slot form (``capacity_slots``) whose static capacity pads
  its experts' rows little: its unfused experts then compute about the rows the grouped FFN would,
  so fusing saves no FFN work, while the reference ``dispatch_v2`` / ``combine_v2`` cost more host
  work and collective rounds than the block's two fixed-size all-to-alls. Measured with DeepSpeed
  k=1 (``bench_models.py --only ep``, 4 ranks, 512 tokens each, 8 experts; fused / plain inductor,
  inference / training): capacity factor 1.0 (1.0 expert row per route) 1.25 / 1.10, 1.25 (1.25
  rows) 1.04 / - (gated), 1.5 0.83 / 0.86, 2.0 0.70 / 0.60; k=2 at capacity factor 1.0: 1.15 in
  inference. Not gated: a capacity read from the data (dropless: its padding is unknown when
  compiling; k=2 measured 0.95 / 0.89) and the GShard einsum form, whose unfused dispatch and
  combine are dense matmuls over every slot (fairscale: 0.87 / 0.83).
* Megatron's all-to-all token dispatcher (module route ``megatron_moe``): its experts compute
  exactly the rows routed to them (``SequentialMLP`` splits the permuted tokens per expert; padding
  to capacity is refused by the route), so the grouped FFN saves them no work, and off Ascend the
  reference ``dispatch_v2`` / ``combine_v2`` cost more host work and collective rounds than its own
  all-to-alls. Measured with SequentialMLP SwiGLU top-2 in fp32 (``bench_models.py --only ep
  --repeats 11 --no-cost-gate``, 4 ranks, 512 tokens each, 8 experts): 1.04 [1.01, 1.08] /
  1.10 [1.00, 1.16]. Gated over more than one rank only (what was measured: an exchange). Not
  gated: its all-gather dispatcher, which plain inductor cannot run (megatron-core 0.16.1:
  ``masked_select: expected BoolTensor for mask``); where the first case applies to its experts,
  they stay the layer's own between the fused dispatch and combine (``megatron_route``).
* the gathered form (HF ``batched_mm``) in an inference graph on CPU with fewer than
  ``MIN_GATHERED_ROWS`` rows per expert (a decode-sized step): plain inductor turns its per-row
  matmuls into one generated loop that streams each row's gathered weights, while the grouped FFN
  runs one BLAS matmul of a few rows per expert. Measured (``bench_models.py`` HF part, fp32,
  H=1024 I=1408, 4 experts, top-2; fused / plain inductor, inference): 4 rows per expert (8 tokens)
  Mixtral 0.98-1.07, Qwen3-MoE 1.14, DeepSeek-V3 1.19; 8 rows 0.83 / 0.87; 16 rows 0.50 / 0.54;
  32 rows 0.34 / 0.37. Its training step is not gated (its unfused backward scatters a weight
  gradient per row: 0.12-0.18).
"""
from __future__ import annotations

import contextvars
from typing import ContextManager, Optional, Union

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true, optimization_hint

from .context import Refusal, fusing_for_training, scoped

LOW_PRECISION = (torch.bfloat16, torch.float16)
MIN_PADDING = 1.3   # expert rows per route below which a slot-form capacity block is not worth fusing
MIN_GATHERED_ROWS = 6   # rows per expert below which a gathered FFN's inference is not worth fusing on CPU
_gate: contextvars.ContextVar[bool] = contextvars.ContextVar("moe_fusion_cost_gate", default=False)


def gated(on: bool) -> ContextManager[None]:
    """Inside the block, rewrites known to be slower than the unfused code are refused when ``on``."""
    return scoped(_gate, on)


def _slower(why: str) -> Refusal:
    """The gate's refusal of a rewrite, ``why`` saying what makes it slower here."""
    return Refusal(f"slower here than the unfused code: {why}; left unfused under inductor "
                   "(moe_fusion.compile(..., cost_gate=False) fuses it anyway; GE always does)")


def native_matmul(dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """The unit that multiplies ``dtype`` matrices natively on ``device`` (faster than fp32), or None."""
    if dtype not in LOW_PRECISION:
        return None
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return None     # without oneDNN, CPU low-precision matmuls are converted to fp32 anyway
        if dtype == torch.bfloat16:
            if torch.cpu._is_amx_tile_supported():
                return "AMX"
            return "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else None
        return "AMX-FP16" if torch.cpu._is_amx_fp16_supported() else None
    if device.type == "cuda" and torch.cuda.is_available():
        needed = (8, 0) if dtype == torch.bfloat16 else (7, 0)
        return "tensor cores" if torch.cuda.get_device_capability(device) >= needed else None
    return None


def cache_key() -> tuple[Optional[str], ...]:
    """What the gate's verdicts depend on besides the graph: this CPU's native low-precision matmul
    units (for the FX graph cache key: a cache shared by machines must not serve one's verdicts to
    another)."""
    cpu = torch.device("cpu")
    return tuple(native_matmul(dtype, cpu) for dtype in LOW_PRECISION)


def refuse_slower_ffn(dtype: torch.dtype, device: torch.device, *, gathered: bool = False) -> None:
    """Raise ``Refusal`` when the gate is on and a fused FFN stored in ``dtype`` on ``device`` would
    run slower than the unfused one (module docstring). ``gathered``: the unfused FFN is the gathered
    form (a weight copy per row)."""
    if not _gate.get() or (gathered and fusing_for_training()):
        return
    unit = native_matmul(dtype, device)
    if unit is None:
        return
    name = str(dtype).removeprefix("torch.")
    raise _slower(f"the fused FFN computes a {name} FFN's first matmul and activation in float32 (SPEC §5.4), "
                  f"which off Ascend means float32 matmuls, and this {device.type} multiplies {name} natively ({unit})")


def refuse_decode_gathered(rows: Union[int, torch.SymInt], experts: int, device: torch.device) -> None:
    """Raise ``Refusal`` when the gate is on, on CPU, for the gathered form (HF ``batched_mm``) in an
    inference graph whose ``rows`` (token-slots) give its ``experts`` fewer than ``MIN_GATHERED_ROWS``
    rows each on average (module docstring)."""
    if not _gate.get() or fusing_for_training() or device.type != "cpu":
        return
    # A dynamic row count (a generate loop's decode steps after its prefill) is guarded on: one graph
    # each side of the threshold. Unknown (data-dependent) rows are not gated.
    if guard_or_true(rows >= MIN_GATHERED_ROWS * experts):
        return
    rows = optimization_hint(rows, fallback=0)
    raise _slower(f"its {rows} rows over {experts} experts ({rows / max(experts, 1):.1f} per expert, under "
                  f"{MIN_GATHERED_ROWS}) make a decode-sized step, where inductor streams each row's gathered weights "
                  "through one generated loop faster than the grouped FFN runs one small matmul per expert")


def refuse_unpadded_slot_block(table_rows: Union[int, torch.SymInt], routes: Union[int, torch.SymInt],
                               device: torch.device) -> None:
    """Raise ``Refusal`` when the gate is on and a slot-form capacity block (module docstring) would
    run slower fused: its dispatch table of ``table_rows`` rows (``E * C``: the expert rows each rank
    computes unfused) holds fewer than ``MIN_PADDING`` rows per route of this rank (``routes``,
    ``S * K``). A size read from the data (a ``SymInt``) is not gated, nor is an Ascend device."""
    if not _gate.get() or not isinstance(table_rows, int) or not isinstance(routes, int) or device.type == "npu":
        return
    if table_rows >= MIN_PADDING * routes:
        return
    raise _slower(f"its capacity gives the experts {table_rows} rows per rank for {routes} routes "
                  f"({table_rows / max(routes, 1):.2f} per route, under {MIN_PADDING}), so the grouped FFN would save "
                  "the unfused experts few padding rows, and off Ascend the reference dispatch and combine cost more "
                  "host work and collective rounds than the block's two all_to_alls")


def refuse_unpadded_exchange(block: str, device: torch.device) -> None:
    """Raise ``Refusal`` when the gate is on, off Ascend, for ``block``: an all-to-all block whose
    experts compute exactly their routed rows, unpadded (module docstring), so that fusing would only
    trade its own exchange for the reference one."""
    if not _gate.get() or device.type == "npu":
        return
    raise _slower(f"{block} computes only the rows routed to its experts, so the grouped FFN saves it no work, and "
                  "off Ascend the reference dispatch and combine cost more host work and collective rounds than its "
                  "own all-to-alls")
