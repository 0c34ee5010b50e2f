"""The kernels' zero-filled outputs (``kernels/_zeroed``): ``zero_past`` reuses a freed mapping, and
whatever its last user wrote, the rows past the ones the caller writes read as zeros."""
import gc
import multiprocessing

import pytest
import torch

from moe_fusion.kernels import _zeroed
from moe_fusion.kernels._zeroed import MAPPED_BYTES, POOLED_MAPPINGS, zero_past

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not _zeroed._CLEARS_BY_DROPPING, reason="the pool clears pages the Linux way")


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    """Each test starts with an empty pool: outputs other tests keep alive must not fill it."""
    monkeypatch.setattr(_zeroed, "_POOL", _zeroed._Pool())


# (rows, row elements, written rows): written rows ending on, before and inside a huge page.
SHAPES = [(8192, 512, 2048), (8192, 512, 2047), (4099, 513, 1000), (1024, 1024, 0)]


def _mapped(rows: int, width: int) -> tuple[tuple[int, int], torch.dtype]:
    shape, dtype = (rows, width), torch.float32
    assert rows * width * dtype.itemsize >= MAPPED_BYTES       # (the pooled path)
    return shape, dtype


@pytest.mark.parametrize("rows,width,written", SHAPES)
def test_a_reused_mapping_reads_zeros_past_the_written_rows_whatever_its_last_user_wrote(rows, width, written):
    shape, dtype = _mapped(rows, width)
    first = zero_past(rows // 2, shape, dtype, CPU)
    first.fill_(float("nan"))                       # the last user wrote everywhere, padding included
    address = first.data_ptr()
    del first
    gc.collect()
    again = zero_past(written, shape, dtype, CPU)
    assert again.data_ptr() == address              # the same pages again, not a fresh mapping
    tail = again[written:]
    assert torch.equal(tail, torch.zeros_like(tail))


def test_a_mapping_a_view_still_uses_is_not_handed_out():
    shape, dtype = _mapped(8192, 512)
    first = zero_past(100, shape, dtype, CPU)
    first[:100] = 1.0
    kept = first[:100]                              # a view keeps the storage, and so the mapping, in use
    del first
    gc.collect()
    second = zero_past(100, shape, dtype, CPU)
    second.fill_(7.0)
    assert second.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, torch.ones_like(kept))


def test_the_pool_keeps_at_most_its_bound_and_outputs_in_use_never_share_pages():
    shape, dtype = _mapped(4096, 512)
    alive = [zero_past(0, shape, dtype, CPU) for _ in range(POOLED_MAPPINGS + 3)]
    for value, out in enumerate(alive):
        out.fill_(float(value))
    for value, out in enumerate(alive):
        assert torch.equal(out, torch.full_like(out, float(value)))
    assert len(_zeroed._POOL._mappings) == POOLED_MAPPINGS
    del alive, out
    gc.collect()
    evicted = _zeroed._POOL._mappings[0][0]
    other = zero_past(0, (4096, 1024), dtype, CPU)  # another size: a freed mapping makes room for it
    assert torch.equal(other, torch.zeros_like(other))
    pooled = [pages for pages, _ in _zeroed._POOL._mappings]
    assert len(pooled) == POOLED_MAPPINGS and evicted not in pooled
    assert len(pooled[-1]) == other.numel() * other.element_size()


def test_mostly_written_rows_come_from_the_allocator_with_the_rest_cleared():
    out = zero_past(900, (1000, 700), torch.float32, CPU)
    assert torch.equal(out[900:], torch.zeros(100, 700))


def test_a_mostly_written_buffer_the_allocator_would_map_afresh_is_pooled():
    shape, dtype = (4096, _zeroed.ALWAYS_MAPPED_BYTES // (4096 * 4)), torch.float32
    first = zero_past(4000, shape, dtype, CPU)
    first.fill_(float("nan"))
    address = first.data_ptr()
    del first
    gc.collect()
    again = zero_past(3000, shape, dtype, CPU)
    # The pooled pages, resident: the rows the caller writes still hold the last user's NaN (fresh
    # pages, which the allocator maps there even at this address, would read zero).
    assert again.data_ptr() == address and bool(again[:3000].isnan().all())
    assert torch.equal(again[3000:], torch.zeros_like(again[3000:]))


def test_memory_that_cannot_be_dropped_is_cleared_instead(monkeypatch):
    shape, dtype = _mapped(8192, 512)
    first = zero_past(0, shape, dtype, CPU)
    first.fill_(float("nan"))
    del first
    gc.collect()
    monkeypatch.setattr(_zeroed.mmap, "MADV_DONTNEED", -1)     # madvise fails (EINVAL), as on locked memory
    again = zero_past(100, shape, dtype, CPU)
    assert torch.equal(again[100:], torch.zeros_like(again[100:]))


def test_segment_ops_write_every_counted_row_of_a_reused_output():
    """The grouped FFN's matmul and activation (``zero_past`` callers) over outputs whose last user
    wrote NaN everywhere: the counted rows are theirs, the padding zero (oracle: per-segment torch.mm)."""
    from moe_fusion.kernels.ffn_grouped import segment_activation, segment_mm

    gen = torch.Generator().manual_seed(0)
    rows, k, n = 4096, 64, 256                      # (rows, n) fp32: 4 MB, mapped; 1000 counted rows
    a, w = torch.randn(rows, k, generator=gen), torch.randn(3, k, n, generator=gen)
    ends = torch.tensor([300, 700, 1000], dtype=torch.int32)
    want = torch.zeros(rows, n)
    for e, (start, end) in enumerate(zip([0, 300, 700], [300, 700, 1000])):
        want[start:end] = a[start:end] @ w[e]
    for _ in range(2):                              # the second call reuses the first call's mappings
        got = segment_mm(a, w, ends)
        torch.testing.assert_close(got, want)
        act = segment_activation(got, ends, "relu", torch.float32, False)
        torch.testing.assert_close(act, torch.relu(want))
        got.fill_(float("nan")), act.fill_(float("nan"))
        del got, act
        gc.collect()


def _pooled_mappings(queue) -> None:
    queue.put(len(_zeroed._POOL._mappings))


def test_a_forked_child_starts_with_an_empty_pool():
    shape, dtype = _mapped(4096, 512)
    kept = zero_past(0, shape, dtype, CPU)
    assert _zeroed._POOL._mappings
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_pooled_mappings, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and queue.get(timeout=5) == 0
    del kept
