"""Layout, reshaping, slicing, indexing and creation ops.

* ``permute_dims``/``expand_dims``/``squeeze``/``broadcast_to``: pure dim bookkeeping.
* ``reshape``/``flatten``: dims are grouped by equal prefix products (size-1 dims ignored).
  A 1:1 group maps with scale 1; a merge of input dims ``[k..k2]`` into output ``j`` has the
  single source ``Src(0, k, prod(in[k+1..k2]))``; a split of input ``k`` into ``[j..j2]`` gives
  output ``j`` the source ``Src(0, k, 1/prod(out[j+1..j2]))``. Many-to-many groups are
  ambiguous: no source. Non-unit input dims left without an output are reduced.
* ``strided_slice``/``split``/``take`` need the sliced, split or indexed axis whole: reduced.
* ``concat``: its operands are argument leaves 0..n-1 (the inline tuple, ``dimflow.arg_leaves``).
  Every dim but ``axis`` comes 1:1 from the same dim of each operand; ``axis`` is reduced in
  every operand (a chunk of the output along it is not one chunk of each input). A tuple that
  is a variable, not inline, or ``axis=None`` (flatten first): barrier.
* ``*_like`` creation ops read only their argument's shape: each output dim comes from the
  same dim of argument 0. ``full``/``zeros``/``ones``/``arange`` have no tensor sources.
* ``tril``/``triu`` mask by (row, col) position: the last two dims are reduced.
"""

from __future__ import annotations

import math
from fractions import Fraction

from ..dimflow import OpFlow, Src, builtin_rule, identity_flow
from .common import norm_axes, norm_axis, pairs, same_dims, tuple_arg_ints


def _flow(dims, reduced=()) -> OpFlow:
    return OpFlow((tuple(tuple(d) for d in dims),), frozenset(reduced))


# ---------------------------------------------------------------------------- layout


@builtin_rule("relax.permute_dims")
def permute_dims(call, arg_shapes, out_shapes) -> OpFlow:
    nd = len(arg_shapes[0])
    axes = call.attrs.axes
    perm = list(reversed(range(nd))) if axes is None else [norm_axis(a, nd) for a in axes]
    return _flow([(Src(0, k),) for k in perm])


@builtin_rule("relax.expand_dims")
def expand_dims(call, arg_shapes, out_shapes) -> OpFlow:
    nd_out = len(out_shapes[0])
    inserted = set(norm_axes(call.attrs.axis, nd_out))
    kept = [j for j in range(nd_out) if j not in inserted]
    dims: list[tuple[Src, ...]] = [() for _ in range(nd_out)]
    for k, j in enumerate(kept):
        dims[j] = (Src(0, k),)
    return _flow(dims)


@builtin_rule("relax.squeeze")
def squeeze(call, arg_shapes, out_shapes) -> OpFlow:
    shape = arg_shapes[0]
    axis = call.attrs.axis
    if axis is None:
        removed = {k for k, n in enumerate(shape) if n == 1}
    else:
        removed = set(norm_axes(axis, len(shape)))
    kept = [k for k in range(len(shape)) if k not in removed]
    return _flow([(Src(0, k),) for k in kept])


@builtin_rule("relax.broadcast_to")
def broadcast_to(call, arg_shapes, out_shapes) -> OpFlow:
    out = out_shapes[0]
    return identity_flow(len(out), (0,), arg_shapes, out)


# ------------------------------------------------------------------------ reshaping


def reshape_flow(in_shape, out_shape) -> OpFlow:
    """Dim flow of a reshape from ``in_shape`` to ``out_shape`` (argument 0)."""
    ins = [k for k, n in enumerate(in_shape) if n != 1]
    outs = [j for j, n in enumerate(out_shape) if n != 1]
    dims: list[tuple[Src, ...]] = [() for _ in out_shape]
    mapped: set[int] = set()
    a = b = 0
    while a < len(ins) and b < len(outs):
        ga, gb = [ins[a]], [outs[b]]
        pa, pb = in_shape[ins[a]], out_shape[outs[b]]
        a, b = a + 1, b + 1
        while pa != pb:
            if pa < pb and a < len(ins):
                ga.append(ins[a])
                pa, a = pa * in_shape[ins[a]], a + 1
            elif pb < pa and b < len(outs):
                gb.append(outs[b])
                pb, b = pb * out_shape[outs[b]], b + 1
            else:
                break  # sizes disagree: not a valid reshape, leave the rest unmapped
        if pa != pb:
            break
        k, j = ga[0], gb[0]
        if len(ga) == 1 and len(gb) == 1:
            dims[j] = (Src(0, k),)
        elif len(gb) == 1:  # merge in[k..k2] -> out[j]
            dims[j] = (Src(0, k, Fraction(math.prod(in_shape[i] for i in ga[1:]))),)
        elif len(ga) == 1:  # split in[k] -> out[j..j2]
            dims[j] = (Src(0, k, Fraction(1, math.prod(out_shape[i] for i in gb[1:]))),)
        else:  # many-to-many: ambiguous
            continue
        mapped.add(k)
    return _flow(dims, pairs(0, (k for k in ins if k not in mapped)))


@builtin_rule("relax.reshape")
def reshape(call, arg_shapes, out_shapes) -> OpFlow:
    # arg 1 is the target ShapeExpr; the rewriter replaces it by the chunked shape.
    return reshape_flow(arg_shapes[0], out_shapes[0])


@builtin_rule("relax.flatten")
def flatten(call, arg_shapes, out_shapes) -> OpFlow:
    return reshape_flow(arg_shapes[0], out_shapes[0])


# -------------------------------------------------------------------------- slicing


@builtin_rule("relax.strided_slice")
def strided_slice(call, arg_shapes, out_shapes) -> OpFlow | None:
    in_shape, out = arg_shapes[0], out_shapes[0]
    axes = tuple_arg_ints(call.args[1])
    if axes is None or None in axes:
        return None
    strides = tuple_arg_ints(call.args[4]) if len(call.args) > 4 else (1,) * len(axes)
    if strides is None:
        return None
    reduced = set()
    for ax, st in zip(axes, strides):
        k = norm_axis(ax, len(in_shape))
        if not (st == 1 and out[k] == in_shape[k]):  # a real slice (or reversal) of dim k
            reduced.add(k)
    return _flow(same_dims(0, len(out), reduced), pairs(0, reduced))


@builtin_rule("relax.split")
def split(call, arg_shapes, out_shapes) -> OpFlow:
    nd = len(arg_shapes[0])
    axis = norm_axis(call.attrs.axis, nd)
    if len(out_shapes) == 1:  # one section: the input itself
        return _flow(same_dims(0, nd))
    per_out = tuple(tuple(same_dims(0, nd, (axis,))) for _ in out_shapes)
    return OpFlow(per_out, frozenset({(0, axis)}))


@builtin_rule("relax.concat")
def concat(call, arg_shapes, out_shapes) -> OpFlow | None:
    ops = [i for i, s in enumerate(arg_shapes) if s is not None]
    if call.attrs.axis is None or not ops:
        return None
    out = out_shapes[0]
    axis = norm_axis(call.attrs.axis, len(out))
    dims = [
        () if j == axis else tuple(Src(i, j) for i in ops if arg_shapes[i][j] == out[j])
        for j in range(len(out))
    ]
    return _flow(dims, {(i, axis) for i in ops})


@builtin_rule("relax.take")
def take(call, arg_shapes, out_shapes) -> OpFlow:
    data, idx = arg_shapes[0], arg_shapes[1]
    axis = 0 if call.attrs.axis is None else norm_axis(call.attrs.axis, len(data))
    dims = [(Src(0, k),) for k in range(axis)]
    dims += [(Src(1, i),) for i in range(len(idx))]
    dims += [(Src(0, k),) for k in range(axis + 1, len(data))]
    return _flow(dims, {(0, axis)})


@builtin_rule("relax.tril")
@builtin_rule("relax.triu")
def tril_triu(call, arg_shapes, out_shapes) -> OpFlow:
    nd = len(arg_shapes[0])
    last2 = tuple(range(max(nd - 2, 0), nd))
    return _flow(same_dims(0, nd, last2), pairs(0, last2))


# ------------------------------------------------------------------------- creation


def _like(call, arg_shapes, out_shapes) -> OpFlow:
    return _flow(same_dims(0, len(out_shapes[0])))


def _fresh(call, arg_shapes, out_shapes) -> OpFlow:
    return _flow([() for _ in out_shapes[0]])


for _name in ("full_like", "zeros_like", "ones_like"):
    builtin_rule(f"relax.{_name}", _like)
for _name in ("full", "zeros", "ones", "arange"):
    builtin_rule(f"relax.{_name}", _fresh)
