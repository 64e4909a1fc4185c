"""Helpers shared by the dim-flow rule families (shapes, axes, sources)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import tvm

from .. import _compat as C
from ..dimflow import Src, arg_leaves

Shape = tuple[int, ...]

# Relax ops with no rule on purpose (a barrier: regions stop there), with the reason.
DELIBERATE_BARRIERS: dict[str, str] = {
    "relax.einsum": (
        "the subscripts would need parsing to tell batch, free and contracted dims apart; "
        "decompose to matmul/permute_dims to chunk through it"
    ),
}


def static_shape(ty) -> Shape | None:
    """The static shape of a ``TensorType`` as ints; None for a non-tensor type.

    Raises ValueError for a tensor of unknown shape or with a symbolic dimension.
    """
    if not isinstance(ty, C.TensorType):
        return None
    dims = C.tensor_shape(ty)
    if dims is None:
        raise ValueError(
            f"tensor of type {ty} has no static shape (ndim={ty.ndim}); dim-flow rules need "
            "static shapes. Remedy: bind the symbolic dims (e.g. BoundSymbolicDims) first."
        )
    bad = [d for d in dims if not isinstance(d, int)]
    if bad:
        raise ValueError(
            f"tensor of type {ty} has symbolic dims {bad}; dim-flow rules need static shapes. "
            "Remedy: bind the symbolic dims to their upper bounds first."
        )
    return tuple(dims)


def arg_and_out_shapes(call) -> tuple[list[Shape | None], list[Shape]]:
    """``(arg_shapes, out_shapes)`` of a normalized call, in the form a rule takes.

    ``arg_shapes[i]`` is the static shape of argument leaf ``i`` (``dimflow.arg_leaves``: the
    args, an inline tuple of tensors flattened into its fields) when it is a tensor, else None
    (other tuples, shapes, prim values). ``out_shapes`` are the tensor leaves of ``call.ty`` in
    order (tuple outputs flattened). Raises ValueError on symbolic dims or an un-normalized call.
    """
    if type(call.ty) is tvm.ir.Type:
        raise ValueError(
            f"call to {C.op_name(call) or call.op} has no type yet. "
            "Remedy: normalize it first (relax.BlockBuilder().normalize(call))."
        )
    args = [static_shape(getattr(a, "ty", None)) for a in arg_leaves(call.args)]
    outs = [static_shape(t) for t in C.tensor_type_leaves(call.ty)]
    return args, outs


def barrier(call, arg_shapes, out_shapes) -> None:
    """A rule that never allows chunking (for ops a user wants to fence off explicitly)."""
    return None


# ------------------------------------------------------------------ helpers for the families


def norm_axis(axis, ndim: int) -> int:
    """``axis`` (possibly negative) as an index in ``[0, ndim)``."""
    a = int(axis)
    a = a + ndim if a < 0 else a
    if not 0 <= a < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    return a


def norm_axes(axes, ndim: int) -> tuple[int, ...]:
    """A normalized, sorted tuple of axes; ``None`` means every axis."""
    if axes is None:
        return tuple(range(ndim))
    return tuple(sorted({norm_axis(a, ndim) for a in axes}))


def const_ints(values: Iterable) -> tuple[int | None, ...]:
    """ints of a sequence of ints / IntImms; a symbolic entry becomes None."""
    out: list[int | None] = []
    for v in values:
        if isinstance(v, int):
            out.append(v)
        elif isinstance(v, C.IntImm):
            out.append(int(v))
        else:
            out.append(None)
    return tuple(out)


def tuple_arg_ints(expr) -> tuple[int | None, ...] | None:
    """The ints of a ``relax.Tuple`` argument of prim values, or None if it is not one."""
    fields = getattr(expr, "fields", None)
    return None if fields is None else const_ints(fields)


def same_dims(arg: int, ndim: int, skip: Sequence[int] = ()) -> list[tuple[Src, ...]]:
    """Per output dim ``j``: ``(Src(arg, j),)``, or no source for ``j`` in ``skip``."""
    return [() if j in skip else (Src(arg, j),) for j in range(ndim)]


def pairs(arg: int, dims: Iterable[int]) -> set[tuple[int, int]]:
    return {(arg, d) for d in dims}
