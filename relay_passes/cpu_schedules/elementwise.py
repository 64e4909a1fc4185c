"""Injective kernels (elementwise ops, layout copies, slices, concat, split, ...): producers
inlined into their consumers; each block left (one, or one per output of a split) has its
outer loops fused and run in parallel and its innermost loop vectorized."""

from __future__ import annotations

from tvm.s_tir.dlight.base import try_inline

from .common import CPURule, dtype_bits, parallel_vectorize, vector_lanes


class Elementwise(CPURule):
    def schedule(self, sch, infos, target):
        if not all(info.is_injective() for info in infos):
            return None
        if any(sch.get(info.block_rv).init is not None for info in infos):
            # a reduction over unit axes reads as injective, and inlining its epilogue into it
            # ran the epilogue on the running sum (rms_norm over a size-1 axis gave NaN)
            return None
        for info in try_inline(sch, infos):
            block = info.block_rv
            parallel_vectorize(sch, block, vector_lanes(target, dtype_bits(sch, block)))
        return sch
