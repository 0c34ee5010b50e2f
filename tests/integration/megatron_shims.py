"""Test-side shims to run megatron-core 0.16.1's MoE layer on CPU gloo ranks (never in model code).

Megatron's MoE code asks CUDA for things a CPU run answers trivially: the current device (tensors
are allocated on ``torch.cuda.current_device()``), a side stream for the all-to-all dispatcher's
device-to-host copies (``torch.cuda.Stream``, ``current_stream``, ``stream``, ``record_stream``),
TE's ``te_general_gemm`` and, for the legacy ``GroupedMLP`` experts, the CUDA-only ``grouped_gemm``
package's ``gmm``. ``install`` points them at CPU stand-ins; ``init_parallel`` builds
Megatron's process groups (``parallel_state``) on the already initialized gloo world.
"""
from __future__ import annotations

import contextlib
import types

import torch


class _Event:
    """A CUDA event stand-in."""

    def synchronize(self) -> None:
        pass

    def wait(self, _: object = None) -> None:
        pass


class _Stream:
    """A CUDA stream stand-in: CPU work is synchronous, so waiting and syncing do nothing."""

    def __init__(self, *_: object, **__: object) -> None:
        pass

    def wait_stream(self, _: object) -> None:
        pass

    def wait_event(self, _: object) -> None:
        pass

    def record_event(self, event: object = None) -> object:
        return event if event is not None else _Event()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Stream)

    __hash__ = object.__hash__


_CURRENT = _Stream()


def _to_host(tensor: object, as_numpy: bool = False, record_stream: bool = False) -> object:
    """``moe_utils.maybe_move_tensor_to_cpu`` as it behaves on a CUDA tensor."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """``grouped_gemm.ops.gmm`` on CPU: rows ``a`` ``(M, K)`` in segments of ``batch_sizes`` ``(E,)``
    (host int64), segment ``e`` times ``b[e]`` ``(K, N)`` (``(N, K)`` transposed with ``trans_b``):
    ``(M, N)`` in ``a``'s dtype, differentiable by torch's own matmuls."""
    segments = a.split(batch_sizes.tolist())
    return torch.cat([rows @ (b[e].t() if trans_b else b[e]) for e, rows in enumerate(segments)])


def install() -> None:
    """Patch ``torch.cuda`` (process-wide: call in the rank processes of a test only) and Megatron's
    TE gemm hook."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = _Stream
    torch.cuda.current_stream = lambda *_, **__: _CURRENT
    torch.cuda.stream = lambda *_, **__: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *_, **__: None
    torch.Tensor.record_stream = lambda self, stream: None
    from megatron.core.transformer.moe import grouped_gemm_util, moe_utils, token_dispatcher
    moe_utils.te_general_gemm = None
    grouped_gemm_util.grouped_gemm = types.SimpleNamespace(ops=types.SimpleNamespace(gmm=_gmm))
    grouped_gemm_util.ops = grouped_gemm_util.grouped_gemm.ops
    # The all-to-all dispatcher copies its split sizes to the host as numpy arrays, but only from a
    # CUDA tensor: on CPU they would stay tensors, which ``all_to_all_single`` does not take.
    token_dispatcher.maybe_move_tensor_to_cpu = _to_host


def init_parallel(expert_model_parallel_size: int) -> None:
    """Megatron's parallel state over the initialized (gloo) default group: EP of the given size,
    no tensor/pipeline parallelism."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_model_parallel_size)
