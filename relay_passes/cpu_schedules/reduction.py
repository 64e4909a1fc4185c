"""Row reductions: softmax and the norms (dlight's CPU ``Reduction``: blocks under one
parallel loop over the leading spatial axes), and single reductions (sum, mean, max over
trailing axes): the spatial axes in parallel, the reduction split to vector-width steps."""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.cpu import Reduction as DlightReduction

from .common import NO_VECTORS, CPURule, dtype_bits, parallel, static_extent, vector_lanes


class RowsThenInjective(DlightReduction):
    """dlight's rule (softmax, layer_norm, rms_norm, ...), which vectorizes: not for the
    dtypes the llvm codegen cannot store as vectors."""

    def apply(self, func, target, tunable):
        if any(str(getattr(p.ty, "dtype", "")) in NO_VECTORS for p in func.params):
            return None
        try:
            return super().apply(func, target, tunable)
        except (s_tir.ScheduleError, ValueError):  # an unexpected shape: the next rule
            return None


class RowReduction(CPURule):
    def schedule(self, sch, infos, target):
        if len(infos) != 1 or infos[0].is_injective():
            return None
        kind = infos[0].dom_kind()
        n_s = len(kind) - len(kind.lstrip("S"))
        if n_s == 0 or set(kind[n_s:]) != {"R"}:
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        if len(loops) != len(kind):
            return None
        spatial = sch.fuse(*loops[:n_s]) if n_s > 1 else loops[0]
        parallel(sch, block, spatial)
        lanes = vector_lanes(target, dtype_bits(sch, block))
        inner = loops[-1]
        n = static_extent(sch, inner)
        if n is not None and n > lanes:
            _, step = sch.split(inner, factors=[None, lanes])
            sch.annotate(step, ann_key="pragma_auto_unroll_max_step", ann_val=lanes)
            sch.annotate(step, ann_key="pragma_unroll_explicit", ann_val=1)
        return sch
