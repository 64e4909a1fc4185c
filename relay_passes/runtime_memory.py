"""Run-time memory of a walked frame: its timeline and the simulated high-water mark.

``timeline`` gives the live bytes after each binding (the peak site); ``runtime_peak``
simulates what the VM's pooled allocator and TVM's workspace pool really touch in one call.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .frame import FrameAnalysis
from .plan import TensorRecord, TimelineEntry


def live_records(protos, index: int) -> list[TensorRecord]:
    """Tensors live right after binding ``index``."""
    out = []
    for p in protos:
        if p.born <= index <= p.last_use:
            kind = "output" if p.output else "intermediate"
            out.append(TensorRecord(p.name, p.shape, p.dtype, p.nbytes, p.op, kind))
    out.sort(key=lambda r: (-r.nbytes, r.name))
    return out


def timeline(analysis: FrameAnalysis, callee_transient: dict[str, int]) -> list[TimelineEntry]:
    """Live bytes after each binding, with that binding's workspace and callee frame.

    ``callee_transient`` maps a callee to the bytes its frame holds during the call beyond the
    results it returns (those are live in this frame from the call on).
    """
    n = analysis.num_bindings
    delta = [0] * (n + 2)
    for p in analysis.protos:
        delta[p.born] += p.nbytes
        delta[min(p.last_use, n) + 1] -= p.nbytes
    live = 0
    per_index = []
    for i in range(n + 1):
        live += delta[i]
        per_index.append(live)
    out = []
    for ev in analysis.events:
        extra = ev.workspace + (callee_transient.get(ev.callee, 0) if ev.callee else 0)
        out.append(TimelineEntry(ev.index, ev.name, ev.op, per_index[ev.index] + extra))
    return out


PAGE = 4096  # the VM's pooled allocator and the CPU workspace pool round to whole pages
# the CUDA driver maps device memory in 2 MiB pages, so a device allocation can take more than
# its size (docs/gpu.md "GPU memory model" has the measurements behind these two constants)
GPU_ALLOC_GRANULARITY = 2 * 2**20
GPU_SMALL_ALLOC = 2**20  # below this the driver packs allocations into shared pages


def _pages(n: int, page: int = PAGE) -> int:
    return max(page, -(-n // page) * page)


class _WorkspacePool:
    """TVM's CPU WorkspacePool: keeps freed blocks; a request takes the smallest free block
    that fits, else the largest free block is freed and re-allocated at the new size."""

    def __init__(self) -> None:
        self.free: list[int] = []
        self.total = 0

    def alloc(self, n: int) -> int:
        n = _pages(n)
        if not self.free:
            self.total += n
            return n
        if self.free[-1] >= n:
            j = bisect.bisect_left(self.free, n)
            return self.free.pop(j)
        old = self.free.pop()
        self.total += n - old
        return n

    def release(self, n: int) -> None:
        bisect.insort(self.free, n)


@dataclass(frozen=True)
class Footprint:
    """What one call of a frame leaves in the pools (they never shrink): its high-water mark
    (``peak``), the storage blocks its pool made (pool key, bytes) and the workspace blocks."""

    peak: int
    blocks: tuple = ()
    workspace: tuple = ()


def runtime_peak(analysis: FrameAnalysis, callee_peak: dict, gpu: bool = False) -> int:
    """``runtime_footprint(...).peak``."""
    return runtime_footprint(analysis, callee_peak, gpu).peak


def runtime_footprint(analysis: FrameAnalysis, callee_peak: dict, gpu: bool = False) -> Footprint:
    """Simulate the run-time memory of one call of the frame.

    The VM allocates a storage at its first use and frees it after its last use into a pool
    that never shrinks and hands a freed block to the next request of the same (page-rounded)
    size; kernel workspace comes from TVM's workspace pool (``_WorkspacePool``). The result's
    ``peak`` is the high-water mark of both pools, i.e. what the process really touches.

    ``callee_peak``: each callee's ``Footprint`` (or its peak, as one block). On CPUs a call
    asks the caller's pools for the callee's blocks, storage and workspace, for the duration
    of the call: there is one pool per process, so a chunk's blocks are the ones the chunk
    before it freed, and a loop's shorter last chunk (its own function, with a padded
    matmul's workspace besides) reuses the full chunk's storage blocks.

    Pages are 4 KiB on CPUs. On GPUs (``gpu``), a new block of at least ``GPU_SMALL_ALLOC``
    (1 MiB) costs whole ``GPU_ALLOC_GRANULARITY`` (2 MiB) pages (smaller ones their size: the
    driver packs them into shared pages), and a callee's frame its peak in whole pages; the
    pool still matches a request to a freed block by its 4 KiB-rounded size (so a freed 9 MiB
    block serves no 0.1 MiB request), and a callee's frame, which is several allocations of its
    own sizes, is reused only by calls of the same function (docs/gpu.md).
    """
    page = GPU_ALLOC_GRANULARITY if gpu else PAGE
    n = analysis.num_bindings
    starts: dict[int, list[tuple]] = {}
    ends: dict[int, list[tuple]] = {}
    for size, lo, hi in analysis.blocks:
        # (pool key, bytes it costs): on GPUs blocks of 1 MiB and more in whole 2 MiB pages,
        # smaller ones packed (the CUDA driver sub-allocates them from shared pages)
        cost = _pages(size, page) if gpu and size >= GPU_SMALL_ALLOC else _pages(size)
        blk = ((None, _pages(size)), cost)
        starts.setdefault(lo, []).append(blk)
        ends.setdefault(min(hi, n), []).append(blk)
    callee_ws: dict[int, list[int]] = {}
    for ev in analysis.events:
        fp = callee_peak.get(ev.callee) if ev.callee else None
        if not fp:
            continue
        if gpu or not isinstance(fp, Footprint):
            r = _pages(fp.peak if isinstance(fp, Footprint) else fp, page)
            blks = [((ev.callee if gpu else None, r), r)]
        else:
            blks = list(fp.blocks)
            callee_ws.setdefault(ev.index, []).extend(fp.workspace)
        starts.setdefault(ev.index, []).extend(blks)
        ends.setdefault(ev.index, []).extend(blks)
    free: dict[tuple, int] = {}
    made: list[tuple] = []
    wsp = _WorkspacePool()
    total = peak = 0
    for i in range(n + 1):
        for key, cost in sorted(starts.get(i, ()), key=lambda b: (b[1], b[0][1]), reverse=True):
            if free.get(key):
                free[key] -= 1
            else:
                total += cost
                made.append((key, cost))
        asks = [*callee_ws.get(i, ()), *analysis.workspace_by_index.get(i, ())]
        taken = [wsp.alloc(b) for b in asks]
        peak = max(peak, total + wsp.total)
        for b in reversed(taken):
            wsp.release(b)
        for key, _cost in ends.get(i, ()):
            free[key] = free.get(key, 0) + 1
    return Footprint(peak, tuple(made), tuple(wsp.free))
