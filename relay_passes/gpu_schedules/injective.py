"""Injective kernels (elementwise ops, layout copies, slices, concat, resize): producers inlined,
each remaining block's loops fused and split over blocks of ``max_threads_per_block`` threads.

The mapping is dlight ``Fallback``'s for spatial-only kernels; this rule declines any
reduction, so that whatever still reaches ``Fallback`` is a kernel no rule understands."""

from __future__ import annotations

from tvm.s_tir.dlight.base import max_threads_per_block, try_inline

from .common import GPURule


class Injective(GPURule):
    def schedule(self, sch, infos, target):
        if not infos or not all(info.is_injective() for info in infos):
            return None
        threads = max_threads_per_block(target)
        for info in try_inline(sch, infos):
            block = info.block_rv
            loops = sch.get_loops(block)
            if any(sch.get(loop).thread_binding is not None for loop in loops):
                return None  # it launches its own threads
            fused = sch.fuse(*loops) if loops else sch.add_unit_loop(block)
            bx, tx = sch.split(fused, [None, threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
        return sch
