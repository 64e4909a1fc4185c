"""Register-blocked schedule for matmul-like kernels (matmul, batched matmul, conv2d).

One reduction block whose last two spatial axes are (i, j): a tile of ``rows`` x ``cols``
outputs is accumulated over the whole reduction, ``cols`` vector lanes wide and vectorized,
``rows`` unrolled; the loops outside the tile run in parallel. Injective producers (a conv's
padding) are inlined into the reduction.

Sizes the tile does not divide (ViT's 1025 tokens, a chunk's odd row count) would put a
predicate on the vector loop, which LLVM then runs scalar (8x slower measured on a 1025 x
1025 attention score). So i and j are first partitioned into a part the tile divides and the
few rows or columns left; the divided part is tiled, the rest runs plainly in parallel.
"""

from __future__ import annotations

from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

from .common import CPURule, dtype_bits, parallel, static_extent, vector_lanes, vectorizable

ROWS = 4  # unrolled rows of a tile: 4 x (2 vectors) accumulators fit the vector registers


def _cols(nj: int, lanes: int) -> int | None:
    """The tile width: two vectors, one, a half or a quarter of one (at least 4 lanes), the
    widest that divides ``nj``, else the widest not over it (the rest is partitioned off)."""
    widths = [c for c in (2 * lanes, lanes, lanes // 2, lanes // 4) if 4 <= c <= nj]
    return next((c for c in widths if nj % c == 0), widths[0] if widths else None)


class Matmul(CPURule):
    def schedule(self, sch, infos, target):
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None or len(infos) != 1:
            return None
        kind = infos[0].dom_kind()
        n_s = len(kind) - len(kind.lstrip("S"))
        if n_s < 2 or not kind[n_s:] or set(kind[n_s:]) != {"R"}:
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        if len(loops) != len(kind):
            return None
        if not vectorizable(sch, block):
            return None
        lanes = vector_lanes(target, dtype_bits(sch, block))
        ni, nj = (static_extent(sch, x) for x in loops[n_s - 2 : n_s])
        cols = _cols(nj, lanes) if nj is not None and ni is not None else None
        if cols is None:
            return None  # under 4 columns: the fallback schedules it
        rows = min(ROWS, ni)
        if ni % rows == 0 and nj % cols == 0:
            self._tile(sch, block, n_s, rows, cols, local=True)
            return sch
        # i and j outermost, then cut off the rows and columns the tile does not divide. A cut
        # loop's parts must own the loops below it, so j is cut above i in the rows' main part
        name = sch.get(block).name_hint
        *outer, i, j = loops[:n_s]
        sch.reorder(i, j, *outer, *loops[n_s:])
        if ni % rows:
            sch.loop_partition(i, factors=[ni // rows * rows])
        swapped = set()  # names of the blocks whose first two loops are (j, i)
        if nj % cols:  # in the rows the tile divides (the larger part)
            main = max(_leaves(sch, name), key=lambda b: static_extent(sch, sch.get_loops(b)[0]))
            li, lj, *rest = sch.get_loops(main)
            before = {sch.get(b).name_hint for b in _leaves(sch, name)} - {sch.get(main).name_hint}
            sch.reorder(lj, li, *rest)
            sch.loop_partition(lj, factors=[nj // cols * cols])
            swapped = {sch.get(b).name_hint for b in _leaves(sch, name)} - before
        for b in _leaves(sch, name):
            first, second, *rest = sch.get_loops(b)
            li, lj = (second, first) if sch.get(b).name_hint in swapped else (first, second)
            sch.reorder(*rest[: n_s - 2], li, lj, *rest[n_s - 2 :])
            if static_extent(sch, li) % rows == 0 and static_extent(sch, lj) % cols == 0:
                # no accumulator buffer here: the partitioned blocks' access regions are the
                # whole tensor, so a cache would be too
                self._tile(sch, b, n_s, rows, cols, local=False)
            else:  # a few rows or columns: in parallel over its first loop (loops of a
                # partition's tail start past 0, so they are not fused)
                parallel(sch, b, sch.get_loops(b)[0])
        return sch

    @staticmethod
    def _tile(sch, block, n_s: int, rows: int, cols: int, *, local: bool) -> None:
        loops = sch.get_loops(block)
        *outer, i, j = loops[:n_s]
        red = loops[n_s:]
        io, ii = sch.split(i, factors=[None, rows])
        jo, ji = sch.split(j, factors=[None, cols])
        sch.reorder(*outer, io, jo, *red, ii, ji)
        # the parallel loop first: a local accumulator must be made inside it
        one_row = static_extent(sch, io) == 1
        par = [*outer, io, jo] if one_row else [*outer, io]
        fused = sch.fuse(*par) if len(par) > 1 else par[0]
        parallel(sch, block, fused)
        acc = None
        if local:
            acc = sch.cache_write(block, 0, "local")
            sch.reverse_compute_at(acc, fused if one_row else jo, preserve_unit_loops=True)
        sch.vectorize(ji)  # before decompose_reduction (it needs a complete block)
        if rows > 1:
            sch.unroll(ii)
        init = sch.decompose_reduction(block, red[0])
        sch.vectorize(sch.get_loops(init)[-1])
        if acc is not None:
            sch.vectorize(sch.get_loops(acc)[-1])


def _leaves(sch, name: str) -> list:
    """The blocks made from the block ``name`` (its partitions), leaves of the block tree."""
    out, todo = [], list(sch.get_child_blocks(sch.get_sblock("root")))
    while todo:
        b = todo.pop()
        kids = sch.get_child_blocks(b)
        if kids:
            todo.extend(kids)
        elif sch.get(b).name_hint.startswith(name):
            out.append(b)
    return out
