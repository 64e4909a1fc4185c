"""Convolutions (NCHW, OIHW) as a matmul over output positions x output channels.

``Matmul`` would tile a conv over its output rows and columns and vectorize along the columns:
with a stride those lanes read the input s floats apart (ViT-1024's 16 x 16 patch conv, one
thread: 33 ms), and without one the weight is re-read for every output. Here the output
positions (y, x) are the rows of the tile and the output channels its vector columns; the
reduction (c, ry, rx) is one loop, the input is read one scalar at a time (broadcast to the
lanes), and each column panel of the weight is copied contiguous, channels last. One thread:
the patch conv 33 -> 4.1 ms; UNet-48's 3 x 3 convs 34 -> 12.5, 15 -> 6.3 and 5.4 -> 1.5 ms.
The Relax program is unchanged, so memory is too (the panel copy is kernel workspace).
"""

from __future__ import annotations

import tvm.sym
from tvm import tirx

from .common import CPURule, contraction, dtype_bits, inputs, static_extent, vector_lanes
from .matmul import Matmul, tile_cols, tile_rows

CONV_MAX_BITS = 256


class Conv(CPURule):
    def schedule(self, sch, infos, target):
        found = contraction(sch, infos, 3)
        if found is None:
            return None
        block, loops, n_s = found
        weight = _conv_weight(sch, block, n_s)
        if weight is None:
            return None
        *outer, o, y, x = loops[:n_s]
        red = loops[n_s:]
        no, nx = static_extent(sch, o), static_extent(sch, x)
        bits = dtype_bits(sch, block)
        # 256-bit vectors at most: with 512-bit ones (AVX-512) the same tile ran 6-17x slower
        # (rocketlake: ViT-1024's patch conv 2.3 -> 38.9 ms, UNet-48 26 -> 163 ms in all)
        cols = tile_cols(no, min(vector_lanes(target, bits), CONV_MAX_BITS // bits))
        rows = tile_rows(nx)
        # a tile of output positions within one output row: a tile across two rows would
        # write back its accumulator's bounding box, positions of other tiles included
        if cols is None or no % cols or nx % rows:
            return None
        sch.reorder(*outer, y, x, o, *red)
        sch.fuse(y, x)
        if len(red) > 1:
            sch.fuse(*red)
        n_w = len(weight.shape)
        Matmul._tile(
            sch,
            block,
            len(outer) + 2,
            rows,
            cols,
            local=True,
            panel=weight,
            layout=tirx.IndexMap.from_func(lambda *ax: (*ax[1:], ax[0]), ndim=n_w),
        )
        return sch


def _conv_weight(sch, block, n_s: int):
    """The weight buffer of a conv block (out[.., o, y, x] += data[.., x * s + ..] *
    weight[o, ...]), else None (a batched matmul has no operand indexed by o alone)."""
    stmt = sch.get(block)
    o_var, y_var, x_var = (iv.var for iv in stmt.iter_vars[n_s - 3 : n_s])
    ins = inputs(sch, block)
    if len(ins) != 2:
        return None
    weight = data = None
    for buf in ins:
        idx = [rng.min for rng in next(r for r in stmt.reads if r.source.same_as(buf)).region]
        used = [{v.name for v in tirx.analysis.undefined_vars(e)} for e in idx]
        if isinstance(idx[0], tirx.Var) and idx[0].same_as(o_var):
            if not any({y_var.name, x_var.name} & u for u in used):
                weight = buf
        elif idx and x_var.name in used[-1]:
            coef = tvm.sym.detect_linear_equation(idx[-1], [x_var])
            if len(coef) == 2 and isinstance(coef[0], tirx.IntImm) and int(coef[0]) >= 1:
                data = buf
    return weight if weight is not None and data is not None else None
