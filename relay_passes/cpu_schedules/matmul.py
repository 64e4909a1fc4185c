"""Register-blocked schedule for matmul-like kernels (matmul, batched matmul, conv2d).

One reduction block whose last two spatial axes are (i, j): a tile of ``rows`` x ``cols``
outputs is accumulated over the whole reduction, ``cols`` vector lanes wide and vectorized,
``rows`` unrolled; the loops outside the tile run in parallel. Injective producers (a conv's
padding) are inlined into the reduction.

When the right operand's rows are 1 KiB apart or more, the column panel a tile reads is
strided by that much and its lines fall into a few cache sets (GPT's 1024-wide weight: 4 KiB
apart, 2x slower). Then the column panels are the outer loop, and each is first copied into a
contiguous k x cols buffer (kernel workspace, which the estimator counts: ``pack_bytes``).

Sizes the tile does not divide (ViT's 1025 tokens, a chunk's odd row count) would put a
predicate on the vector loop, which LLVM then runs scalar (8x slower measured on a 1025 x
1025 attention score). Rows are padded to the tile instead, per tile (``_pad_rows``; also
for rows known only at run time). Where the columns are not divided either, i and j are
partitioned into a part the tile divides and the few rows or columns left; the divided part
is tiled, the rest runs plainly in parallel.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from .common import (
    NO_VECTORS,
    CPURule,
    contraction,
    dtype_bits,
    parallel,
    static_extent,
    vector_lanes,
)

# unrolled rows of a tile, in order of preference among those that divide the rows: rows x
# 2 vectors of accumulators plus the loads must fit 16 vector registers (AVX2, NEON's 32 too)
ROWS = (4, 6, 5, 3, 2)
PACK_MIN_STRIDE = 1024  # bytes between the right operand's rows from which panels are packed
PACK_MIN_DEPTH = 64  # shorter reductions re-read too little of a panel to pay for the copy
PACK_MIN_ROWS = 16  # a panel is copied once per call and re-read by every row


def tile_rows(ni: int) -> int:
    return next((r for r in ROWS if ni % r == 0), min(ROWS[0], ni))


def tile_cols(nj: int, lanes: int) -> int | None:
    """The tile width: two vectors, one, a half or a quarter of one (at least 4 lanes), the
    widest that divides ``nj``, else the widest not over it (the rest is partitioned off)."""
    widths = [c for c in (2 * lanes, lanes, lanes // 2, lanes // 4) if 4 <= c <= nj]
    return next((c for c in widths if nj % c == 0), widths[0] if widths else None)


class Matmul(CPURule):
    def schedule(self, sch, infos, target):
        found = contraction(sch, infos, 2)
        if found is None:
            return None
        block, loops, n_s = found
        lanes = vector_lanes(target, dtype_bits(sch, block))
        ni, nj = (static_extent(sch, x) for x in loops[n_s - 2 : n_s])
        if ni is None and nj is not None:  # rows known at run time (a symbolic length)
            cols = tile_cols(nj, lanes)
            if cols is None or nj % cols:
                return None
            # panels are packed whatever the rows turn out to be (the estimator lowers symbolic
            # matmuls and reads the kernel's workspace)
            panel = _panel_operand(sch, block, n_s)
            if panel is not None and not _packs(PACK_MIN_ROWS, panel[1], dtype_bits(sch, block)):
                panel = None
            _pad_rows(sch, block, n_s, ROWS[0], cols, panel and panel[0])
            return sch
        cols = tile_cols(nj, lanes) if nj is not None and ni is not None else None
        if cols is None:
            return None  # under 4 columns: the fallback schedules it
        rows = tile_rows(ni)
        if nj % cols == 0:
            panel = _panel_operand(sch, block, n_s)
            if panel is not None and not _packs(ni, panel[1], dtype_bits(sch, block)):
                panel = None
            if ni % rows == 0:
                self._tile(sch, block, n_s, rows, cols, local=True, panel=panel and panel[0])
                return sch
            padded = sch.copy()  # pad_einsum takes plain index patterns only
            try:
                _pad_rows(padded, padded.get_sblock(sch.get(block).name_hint), n_s, rows,
                          cols, panel and panel[0])
                return padded
            except tvm.s_tir.ScheduleError:
                pass
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
    def _tile(
        sch, block, n_s: int, rows: int, cols: int, *, local: bool, panel=None, layout=None
    ):
        """``panel``: the right operand's buffer, copied per column panel (``layout``: an index
        map that puts its column axis last, when it is not). Returns the loop that runs once
        per tile (where copies made per tile go)."""
        loops = sch.get_loops(block)
        *outer, i, j = loops[:n_s]
        red = loops[n_s:]
        io, ii = sch.split(i, factors=[None, rows])
        jo, ji = sch.split(j, factors=[None, cols])
        if panel is not None:  # column panels outermost: each packed once, then every row tile
            sch.reorder(*outer, jo, io, *red, ii, ji)
            par, at = [*outer, jo], io
        else:
            sch.reorder(*outer, io, jo, *red, ii, ji)
            one_row = static_extent(sch, io) == 1
            par = [*outer, io, jo] if one_row else [*outer, io]
            at = None if one_row else jo
        # the parallel loop first: a local accumulator must be made inside it
        fused = sch.fuse(*par) if len(par) > 1 else par[0]
        parallel(sch, block, fused)
        acc = None
        if local:
            acc = sch.cache_write(block, 0, "local")
            sch.reverse_compute_at(acc, at or fused, preserve_unit_loops=True)
        if panel is not None:
            # by position: two parameters may share a name (matmul(b, b))
            index = next(n for n, r in enumerate(sch.get(block).reads) if r.source.same_as(panel))
            copy = sch.cache_read(block, index, "global")
            if layout is not None:
                sch.transform_layout(copy, ("write", 0), layout)
            sch.compute_at(copy, fused, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(copy)[-1])
        sch.vectorize(ji)  # before decompose_reduction (it needs a complete block)
        if rows > 1:
            sch.unroll(ii)
        init = sch.decompose_reduction(block, red[0])
        sch.vectorize(sch.get_loops(init)[-1])
        if acc is not None:
            sch.vectorize(sch.get_loops(acc)[-1])
        return at or fused


def _pad_rows(sch, block, n_s: int, rows: int, cols: int, panel) -> None:
    """Tile a contraction whose rows the tile does not divide, or that are known at run time
    only. The rows are padded to the tile (``pad_einsum``), and the padded copies are made per
    tile: before it, the left operand's rows (zeros past the end); after it, the accumulator's
    rows that exist, written back. The accumulator is a tile, and so stays in registers. (A
    row predicate would make it the whole output, in memory: 3x slower measured. In "local"
    scope it would be workspace memory, which LLVM cannot tell apart from the padded rows it
    reads, so it stores every update: 2.7x slower; a small global buffer goes on the stack.)"""
    name = sch.get(block).name_hint
    n_red = len(sch.get_loops(block)) - n_s
    sch.pad_einsum(block, [1] * (n_s - 2) + [rows, 1] + [1] * n_red)
    block = sch.get_sblock(name)
    producers = [b for b in sch.get_producers(block) if sch.get(b).name_hint.endswith("_pad")]
    (writeback,) = sch.get_consumers(block)
    at = Matmul._tile(sch, block, n_s, rows, cols, local=False, panel=panel)
    for b in producers:
        sch.compute_at(b, at, preserve_unit_loops=True)
        _, vec = sch.split(sch.get_loops(b)[-1], factors=[None, cols])
        sch.vectorize(vec)
    sch.reverse_compute_at(writeback, at, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(writeback)[-1])


def pad_bytes(out_shape, b_shape, dtype: str, target) -> tuple[int, ...]:
    """The buffers (bytes, in program order) ``_pad_rows`` adds for a static matmul the tile
    does not divide by rows: the accumulator tile and the left operand's padded rows (read
    by ``_compat.kept_matmul_workspace`` beside ``pack_bytes``)."""
    if len(out_shape) < 2 or len(b_shape) < 2 or dtype in NO_VECTORS or 1 in out_shape[-2:]:
        return ()
    bits = tvm.DataType(dtype).bits
    ni, nj = out_shape[-2:]
    cols = tile_cols(nj, vector_lanes(target, bits))
    if cols is None or nj % cols or ni % tile_rows(ni) == 0:
        return ()
    return (ROWS[0] * cols * bits // 8, ROWS[0] * b_shape[-2] * bits // 8)


def pack_bytes(out_shape, b_shape, dtype: str, target) -> int:
    """The workspace bytes this rule allocates for TVM's lowering of ``relax.matmul`` with this
    static output and right operand shape (the estimator leaves matmuls unlowered: its walk
    asks here): one column panel. Mirrors ``schedule``'s choices; tests/test_cpu_schedules.py
    checks it against the scheduled kernels' workspace on random shapes."""
    if len(out_shape) < 2 or len(b_shape) < 2 or dtype in NO_VECTORS or 1 in out_shape[-2:]:
        return 0  # (a unit row or column axis is normalized away: not this rule's kernel)
    bits = tvm.DataType(dtype).bits
    ni, nj = out_shape[-2:]
    cols = tile_cols(nj, vector_lanes(target, bits))
    if cols is None or nj % cols or not _packs(ni, b_shape, bits):
        return 0
    return b_shape[-2] * cols * bits // 8


def _packs(ni: int, shape, bits: int) -> bool:
    """Whether the right operand (``shape``, (.., k, j)) is packed: its rows are strided by
    ``PACK_MIN_STRIDE`` or more, and the panel is re-read by enough rows (``ni``) over a long
    enough reduction to pay for the copy."""
    return (
        shape[-1] * bits // 8 >= PACK_MIN_STRIDE
        and shape[-2] >= PACK_MIN_DEPTH
        and ni >= PACK_MIN_ROWS
    )


def _panel_operand(sch, block, n_s: int):
    """(buffer, buffer shape) of the operand read at (.., k, j) whose indices are the block's
    own iter vars and do not involve i; None if no read has that form."""
    stmt = sch.get(block)
    ivars = [iv.var for iv in stmt.iter_vars]
    i_var, j_var, k_vars = ivars[n_s - 2], ivars[n_s - 1], ivars[n_s:]
    if len(k_vars) != 1:
        return None
    for region in stmt.reads:
        shape = (
            [int(x) for x in region.source.shape]
            if all(isinstance(x, tirx.IntImm) for x in region.source.shape)
            else None
        )
        if shape is None or len(shape) < 2 or region.source.same_as(stmt.writes[0].source):
            continue
        idx = [rng.min for rng in region.region]
        if not all(isinstance(e, (tirx.Var, tirx.IntImm)) for e in idx):
            continue
        if any(isinstance(e, tirx.Var) and e.same_as(i_var) for e in idx):
            continue
        pos = {
            ("j" if e.same_as(j_var) else "k"): a
            for a, e in enumerate(idx)
            if isinstance(e, tirx.Var) and (e.same_as(j_var) or e.same_as(k_vars[0]))
        }
        if pos == {"k": len(idx) - 2, "j": len(idx) - 1}:
            return region.source, shape
    return None


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
