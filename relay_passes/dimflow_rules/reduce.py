"""Reductions and scans: sum/mean/max/min/prod/variance/std, argmax/argmin, cumsum/cumprod.

The reduced axes (``axis`` attr; None = all) are reduced in argument 0. The other dims map
1:1 in order; with ``keepdims`` the reduced axes stay as size-1 output dims with no source.
A scan (cumsum/cumprod) keeps the shape but needs its ``axis`` whole; with ``axis=None`` it
flattens the input first, which no chunk survives: barrier.
"""

from __future__ import annotations

from ..dimflow import OpFlow, Src, builtin_rule
from .common import norm_axes, norm_axis, pairs, same_dims


def _reduce_over(nd: int, axes: tuple[int, ...], keepdims: bool) -> OpFlow:
    dims: list[tuple[Src, ...]] = []
    for k in range(nd):
        if k not in axes:
            dims.append((Src(0, k),))
        elif keepdims:
            dims.append(())
    return OpFlow((tuple(dims),), frozenset(pairs(0, axes)))


def _statistical(call, arg_shapes, out_shapes) -> OpFlow:
    nd = len(arg_shapes[0])
    return _reduce_over(nd, norm_axes(call.attrs.axis, nd), bool(call.attrs.keepdims))


def _arg_reduce(call, arg_shapes, out_shapes) -> OpFlow:
    nd = len(arg_shapes[0])
    axis = call.attrs.axis
    axes = tuple(range(nd)) if axis is None else (norm_axis(axis, nd),)
    return _reduce_over(nd, axes, bool(call.attrs.keepdims))


def _scan(call, arg_shapes, out_shapes) -> OpFlow | None:
    if call.attrs.axis is None:
        return None
    nd = len(arg_shapes[0])
    axis = norm_axis(call.attrs.axis, nd)
    return OpFlow((tuple(same_dims(0, nd, (axis,))),), frozenset({(0, axis)}))


for _name in ("sum", "mean", "max", "min", "prod", "variance", "std"):
    builtin_rule(f"relax.{_name}", _statistical)
for _name in ("argmax", "argmin"):
    builtin_rule(f"relax.{_name}", _arg_reduce)
for _name in ("cumsum", "cumprod"):
    builtin_rule(f"relax.{_name}", _scan)
