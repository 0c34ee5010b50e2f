"""GE converters of the local ops: MoeReRouting, MoeUpdateExpert, FFN (SPEC §7.1, §2.1, §5.1), and FFN
for ``npu_ffn_grouped`` (its counts already an int64 tensor)."""
from __future__ import annotations

from typing import Any

import torch
from torchair import ge
from torchair._ge_concrete_graph.utils import dtype_promote

from ._emit import Args, converter, emit, pick

# FFN's output_dtype attr for an int8 x: the y dtype GE must produce (-1: let GE choose, fp16).
_FFN_QUANT_OUTPUT_DTYPES = {torch.float16: 0, torch.bfloat16: 1}


@converter("npu_moe_re_routing")
def moe_re_routing(a: Args) -> Any:
    """Every argument passes through under its own name (``tokens_dtype``, for fp8/fp4 tokens, is
    rejected at trace time and never reaches GE)."""
    return emit("MoeReRouting", inputs=pick(a, "tokens", "expert_token_num_per_rank", "per_token_scales"),
                attrs=pick(a, "expert_token_num_type", "idx_type"))


@converter("npu_moe_update_expert")
def moe_update_expert(a: Args) -> Any:
    """Every argument passes through under its own name."""
    return emit("MoeUpdateExpert", inputs=pick(a, "expert_ids", "eplb_table", "expert_scales", "pruning_threshold",
                                               "active_mask"),
                attrs=pick(a, "local_rank_id", "world_size", "balance_mode"))


def _expert_tokens(a: Args) -> tuple[Any, bool]:
    """The GE ``expert_tokens`` input (an int64 tensor, or None without experts) and
    ``tokens_index_flag``. torchair hands an int list over as ints, or as a ge.Tensor when it holds
    SymInts. An empty list means no experts, as in the proto."""
    counts, ends = a["expert_tokens"], a["expert_tokens_index"]
    if _given(counts) and _given(ends):
        raise ValueError("npu_ffn: expert_tokens and expert_tokens_index cannot both be given")
    if _given(ends):
        return dtype_promote(ends, target_dtype=torch.int64), True
    if _given(counts):
        return dtype_promote(counts, target_dtype=torch.int64), False
    return None, False


def _given(tokens: Any) -> bool:
    return isinstance(tokens, ge.Tensor) or bool(tokens)


@converter("npu_ffn")
def ffn(a: Args) -> Any:
    """FFN as torchair converts ``npu_ffn``.

    * ``expert_tokens`` (counts) or ``expert_tokens_index`` (cumulative ends) becomes the GE input
      ``expert_tokens``, an int64 tensor; ``tokens_index_flag`` says which form it is.
    * ``output_dtype`` attr: -1, except for an int8 ``x`` with ``output_dtype`` given: 0 for fp16,
      1 for bf16. A float ``x`` keeps its own dtype whatever ``output_dtype`` says.
    * ``inner_precise`` None means 0, as in the eager wrapper.
    """
    y_dtype = -1
    if a["x"].dtype == ge.DataType.DT_INT8 and a["output_dtype"] is not None:
        if a["output_dtype"] not in _FFN_QUANT_OUTPUT_DTYPES:
            raise ValueError(f"npu_ffn: output_dtype must be float16 or bfloat16 for an int8 x, got {a['output_dtype']}")
        y_dtype = _FFN_QUANT_OUTPUT_DTYPES[a["output_dtype"]]
    expert_tokens, tokens_index_flag = _expert_tokens(a)
    inputs = pick(a, "x", "weight1", "weight2", "bias1", "bias2", "scale", "offset", "deq_scale1", "deq_scale2",
                  "antiquant_scale1", "antiquant_scale2", "antiquant_offset1", "antiquant_offset2")
    return emit("FFN", inputs={**inputs, "expert_tokens": expert_tokens}, attrs={
        "activation": a["activation"], "inner_precise": a["inner_precise"] or 0, "output_dtype": y_dtype,
        "tokens_index_flag": tokens_index_flag})


@converter("npu_ffn_grouped")
def ffn_grouped(a: Args) -> Any:
    """FFN with the expert counts (or ends) as the int64 tensor GE's ``expert_tokens`` input takes;
    the quant/antiquant inputs stay empty and ``output_dtype`` is -1 (y in x's dtype)."""
    return emit("FFN", inputs=pick(a, "x", "weight1", "weight2", "expert_tokens", "bias1", "bias2"), attrs={
        "activation": a["activation"], "inner_precise": a["inner_precise"] or 0, "output_dtype": -1,
        "tokens_index_flag": a["tokens_index_flag"]})
