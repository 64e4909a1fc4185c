"""Dimension flow: which output dims of an op come from which input dims (analysis data).

A rule, registered per Relax op name, looks at one call and returns an ``OpFlow``:

* ``outputs[o][j]`` lists the sources of dim ``j`` of tensor output ``o``:
  ``Src(arg, dim, scale)`` means output index ``t`` along ``j`` reads input ``arg`` at index
  ``t / scale`` along ``dim``, one to one (``scale`` > 1 when a reshape merges ``dim`` with
  faster dims to its right, < 1 when it splits it). So slicing the input along ``dim`` by
  ``[off, off+C)`` gives exactly the output slice ``[off*scale, (off+C)*scale)`` along ``j``.
  A broadcast input dim of size 1 is *not* a source (the input stays whole).
* ``reduced`` holds ``(arg, dim)`` pairs the op reduces, contracts or otherwise mixes (matmul's
  K, softmax's axis, a conv's spatial window, a strided_slice along that dim ...). Chunking
  such an input dim is illegal.

Outputs are the tensor leaves of the call's type in order (a Tensor: one; a Tuple: each
field). ``arg`` indexes the call's *argument leaves* (``arg_leaves``): ``call.args`` in order,
with an inline ``relax.Tuple`` of tensors replaced by its fields (``concat((a, b))``: ``a`` is
leaf 0, ``b`` leaf 1). For a call without such a tuple the leaves are ``call.args``. Every
place that maps ``Src.arg`` (or ``ArgSlice.arg``) to an expression goes through
``arg_leaves``/``leaf_slots``/``map_leaf``. An op with no rule is a *barrier*: regions
stop there; the analysis never crashes on it. Users extend or override with
``register_dim_rule``. The built-in rules are registered by importing ``dimflow_rules`` (the
analyses do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from tvm import relax

from . import _compat as C

ONE = Fraction(1)


@dataclass(frozen=True)
class Src:
    arg: int
    dim: int
    scale: Fraction = ONE


@dataclass(frozen=True)
class OpFlow:
    outputs: tuple[tuple[tuple[Src, ...], ...], ...]
    reduced: frozenset[tuple[int, int]] = field(default_factory=frozenset)


# rule(call, arg_shapes, out_shapes) -> OpFlow | None. ``arg_shapes[i]``: the shape of argument
# leaf ``i`` (``arg_leaves``), a tuple of ints (static dims), or None for a non-tensor leaf.
# None from a rule means "not chunkable here" (a barrier).
DimRule = Callable[..., "OpFlow | None"]

_BUILTIN: dict[str, DimRule] = {}  # registered by dimflow_rules when it is imported
_USER: dict[str, DimRule] = {}  # registered by users; wins over a built-in rule


def register_dim_rule(op_name: str, rule: DimRule | None = None, *, override: bool = False):
    """Register ``rule`` for ``op_name`` (``"relax.add"``); usable as a decorator."""

    def deco(fn: DimRule) -> DimRule:
        if (op_name in _USER or op_name in _BUILTIN) and not override:
            raise ValueError(f"a dim-flow rule for {op_name} exists; pass override=True")
        _USER[op_name] = fn
        return fn

    return deco(rule) if rule is not None else deco


def builtin_rule(op_name: str, rule: DimRule | None = None):
    """Register a built-in rule (``dimflow_rules``); a user's rule for the op stays first."""

    def deco(fn: DimRule) -> DimRule:
        _BUILTIN[op_name] = fn
        return fn

    return deco(rule) if rule is not None else deco


def get_dim_rule(op_name: str) -> DimRule | None:
    return _USER.get(op_name) or _BUILTIN.get(op_name)


def registered_ops() -> list[str]:
    return sorted({*_BUILTIN, *_USER})


def identity_flow(ndim: int, args: tuple[int, ...], arg_shapes, out_shape) -> OpFlow:
    """Elementwise with numpy broadcasting: output dim j <- each arg's aligned dim of equal size."""
    dims = []
    for j in range(ndim):
        srcs = []
        for a in args:
            shp = arg_shapes[a]
            if shp is None:
                continue
            k = j - (ndim - len(shp))
            if k >= 0 and shp[k] == out_shape[j]:
                srcs.append(Src(a, k))
        dims.append(tuple(srcs))
    return OpFlow((tuple(dims),))


# ------------------------------------------------------------------ argument leaves


def _is_tensor_tuple(a) -> bool:
    """An inline tuple whose fields are all tensors (concat's operands); a tuple of prim
    values (strided_slice's axes) or of tuples stays one leaf."""
    if not isinstance(a, relax.Tuple):
        return False
    fields = a.fields
    return len(fields) > 0 and all(isinstance(f.ty, C.TensorType) for f in fields)


def leaf_slots(args) -> tuple[tuple[int, int | None], ...]:
    """Where each argument leaf of a (normalized) call's ``args`` sits: ``(i, None)`` for the
    argument ``args[i]`` itself, ``(i, k)`` for field ``k`` of the inline tuple ``args[i]``."""
    out: list[tuple[int, int | None]] = []
    for i, a in enumerate(args):
        if _is_tensor_tuple(a):
            out.extend((i, k) for k in range(len(a.fields)))
        else:
            out.append((i, None))
    return tuple(out)


def arg_leaves(args) -> tuple:
    """The argument leaves ``Src.arg`` indexes (see the module docstring), in ``leaf_slots``
    order."""
    out: list = []
    for a in args:
        if _is_tensor_tuple(a):
            out.extend(a.fields)
        else:
            out.append(a)
    return tuple(out)


def map_leaf(args: list, slot: tuple[int, int | None], fn) -> None:
    """Replace the leaf at ``slot`` (``leaf_slots`` of the original args) of the argument list
    ``args`` by ``fn(leaf)``, in place; an inline tuple is rebuilt around the new field."""
    i, k = slot
    if k is None:
        args[i] = fn(args[i])
    else:
        fields = list(args[i].fields)
        fields[k] = fn(fields[k])
        args[i] = relax.Tuple(fields)
