"""Row reductions: softmax, the norms, and single reductions (sum, mean, max over trailing
axes). The rows run in parallel; each reduction is split by ``rfactor`` into vector-wide
partial results (a vector accumulator, then one reduction over its lanes), since a scalar
accumulator chains every step on the one before (GPT's row max: 14.7 -> 1 ms)."""

from __future__ import annotations

from .common import (
    CPURule,
    dtype_bits,
    inputs,
    parallel,
    static_extent,
    vector_lanes,
    vectorizable,
)


def _leading_spatial(kind: str) -> int:
    return len(kind) - len(kind.lstrip("S"))


class RowChain(CPURule):
    """Blocks over shared leading spatial axes (the rows), at least one of them a reduction
    over trailing axes: each row's chain runs in one parallel iteration (dlight's CPU
    ``Reduction`` does the same with serial reductions)."""

    def schedule(self, sch, infos, target):
        if not any(not i.is_injective() for i in infos):
            return None
        if not all(vectorizable(sch, i.block_rv) for i in infos):
            return None  # the llvm codegen cannot store these dtypes as vectors
        if len(infos) == 1 and len(inputs(sch, infos[0].block_rv)) > 1:
            # a matmul too narrow for Matmul: summed in k order as Matmul does, so a chunked
            # build (where a chunk's columns may take either rule) equals the whole bit for bit
            return None
        kinds = [i.dom_kind() for i in infos]
        if any(not k or k[0] != "S" for k in kinds):
            return None
        for i, k in zip(infos, kinds, strict=True):
            n_s = _leading_spatial(k)
            if not i.is_injective() and set(k[n_s:]) != {"R"}:
                return None  # a reduction over a middle axis: not a row
            if len(sch.get_loops(i.block_rv)) != len(k):
                return None
        rows = min(_leading_spatial(k) for k in kinds)
        lanes = vector_lanes(target, dtype_bits(sch, infos[-1].block_rv))
        partials = []  # (name, factored axis) of each partial-results block
        for info, kind in zip(infos, kinds, strict=True):
            if not info.is_injective():
                rf = _rfactor(sch, info.block_rv, _leading_spatial(kind), lanes)
                if rf is not None:
                    partials.append((sch.get(rf).name_hint, _leading_spatial(kind)))
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        loops = sch.get_loops(blocks[-1])
        spatial = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
        parallel(sch, blocks[-1], spatial)
        for b in reversed(blocks[:-1]):
            sch.compute_at(b, spatial, preserve_unit_loops=True)
        rf_axis = dict(partials)
        for b in sch.get_child_blocks(spatial):
            name = sch.get(b).name_hint
            if name in rf_axis:
                _vectorize_partial(sch, b, rf_axis[name])
            elif _is_injective(sch, b):
                _vectorize_inner(sch, b, lanes)
        return sch


def _is_injective(sch, block) -> bool:
    return all(int(iv.iter_type) == 0 for iv in sch.get(block).iter_vars)


def _rfactor(sch, block, n_s: int, lanes: int):
    """Split the reduction (trailing loops, fused) by ``lanes`` and factor the lanes out: a
    block accumulating ``lanes`` partial results, then the original block reducing them.
    None (left serial) when the reduction is not a whole number of vectors."""
    loops = sch.get_loops(block)
    red = loops[n_s:]
    r = sch.fuse(*red) if len(red) > 1 else red[0]
    n = static_extent(sch, r)
    if n is None or n % lanes or n < 2 * lanes:
        return None
    _, ri = sch.split(r, factors=[None, lanes])
    return sch.rfactor(ri, factor_axis=n_s)


def _vectorize_partial(sch, rf, n_s: int) -> None:
    """The partial-results block under its row loop: its lanes loop innermost and vectorized,
    its accumulator initialized before the reduction loop."""
    stmt = sch.get(rf)
    lane_var = stmt.writes[0].region[n_s].min  # the factored axis indexes the partials
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    loops = sch.get_loops(rf)
    own = loops[len(loops) - len(kinds) :]  # compute_at made one loop per iter var, in order
    lane = next(lp for lp, iv in zip(own, stmt.iter_vars, strict=True) if iv.var.same_as(lane_var))
    red = [lp for lp, k in zip(own, kinds, strict=True) if k != 0]
    sch.reorder(*red, lane)
    sch.vectorize(lane)
    init = sch.decompose_reduction(rf, red[0])
    sch.vectorize(sch.get_loops(init)[-1])


def _vectorize_inner(sch, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return
    n = static_extent(sch, loops[-1])
    if n is None:
        return
    if n > lanes and n % lanes == 0:
        _, v = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(v)
    elif 2 <= n <= lanes:
        sch.vectorize(loops[-1])


class RowReduction(CPURule):
    """A single reduction RowChain left (one not a whole number of vectors long): the rows in
    parallel, the reduction split to vector-width steps and unrolled."""

    def schedule(self, sch, infos, target):
        if len(infos) != 1 or infos[0].is_injective():
            return None
        kind = infos[0].dom_kind()
        n_s = _leading_spatial(kind)
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
