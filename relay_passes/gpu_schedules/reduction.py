"""Row reductions of any kind (max, min, sum, product; ``any`` imports as an int8 max) that
dlight's GPU rules leave to ``Fallback``: one CUDA block per output element (rows fused), its
threads striding over the reduced axes, then one cross-thread (tree) reduction.

dlight's ``Reduction`` takes only sums, and ``GeneralReduction`` only chains ending in an
injective block; ``Fallback`` runs each row on one thread, serially."""

from __future__ import annotations

from tvm.s_tir.dlight.base import get_extent, try_inline_contiguous_spatial

from .common import GPURule

MAX_THREADS = 256  # as dlight's GeneralReduction on CUDA
WARP = 32


def threads_for(extent) -> int:
    """Threads per row: the reduced extent rounded up to a warp multiple, at most 256."""
    if not isinstance(extent, int):
        return MAX_THREADS
    return min(MAX_THREADS, max(WARP, -(-extent // WARP) * WARP))


class RowReduction(GPURule):
    def schedule(self, sch, infos, target):
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None or len(infos) != 1 or not infos[0].is_reduction():
            return None
        info = infos[0]
        kind = info.dom_kind()
        spatial = len(kind) - len(kind.lstrip("S"))
        if spatial == len(kind) or kind[spatial:] != "R" * (len(kind) - spatial):
            return None  # reduced axes must be the trailing ones
        block = info.block_rv
        loops = sch.get_loops(block)
        if len(loops) != len(kind):
            return None
        row = sch.fuse(*loops[:spatial]) if spatial else sch.add_unit_loop(loops[0])
        red = sch.fuse(*loops[spatial:])
        # threads outside the serial loop: each sums a strided slice, then one tree reduction
        serial, tx = sch.split(red, [None, threads_for(get_extent(sch, red))])
        sch.reorder(tx, serial)
        sch.bind(row, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.annotate(serial, "pragma_auto_unroll_max_step", 64)
        sch.annotate(serial, "pragma_unroll_explicit", 1)
        return sch
