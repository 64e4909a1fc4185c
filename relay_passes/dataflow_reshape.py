"""Which ``call_tir`` TVM's ``RewriteDataflowReshape`` would turn into a reshape (a view), for
the frame walk that makes that pass's rewrites itself (``liveness``, analysis only)."""

from __future__ import annotations

from tvm import relax

from . import _compat as C
from . import caches
from .frame import call_args, element_count


class DataflowReshapeUnknown(Exception):
    """A reshape-pattern PrimFunc called with several arguments (see ``reshape_source``)."""


def reshape_source(mod, var, args: tuple):
    """The argument that TVM's ``RewriteDataflowReshape`` would reshape in place of the
    ``call_tir`` bound to ``var`` (``args``: the call's arguments; rewrite_dataflow_reshape.cc,
    TVM 0.27), else None: a binding of a DataflowVar (in a dataflow block: the caller checks),
    calling a PrimFunc with a reshape pattern (``has_reshape_pattern``, memoised per PrimFunc)
    on one tensor of the result's dtype and element count. TVM's pass reshapes the one argument
    the PrimFunc reads when it has several (fused functions, not made on CPU): met here,
    ``DataflowReshapeUnknown`` makes the estimator run TVM's pass instead."""
    if not isinstance(var, relax.DataflowVar):
        return None
    gv = args[0]
    func = mod[gv] if isinstance(gv, C.GlobalVar) and gv in mod.functions else None
    if not isinstance(func, C.PrimFunc):
        return None
    args = call_args(args)
    if len(args) != 1:
        # TVM reshapes the one argument such a PrimFunc reads
        if _has_reshape_pattern(func):
            raise DataflowReshapeUnknown(str(gv.name_hint))
        return None
    # TVM tests the pattern first; the cheap tests come first here (the same answer)
    arg = args[0]
    src, res = arg.ty, var.ty
    if not isinstance(src, C.TensorType) or not isinstance(res, C.TensorType):
        return None
    s_shape, r_shape = C.tensor_shape(src), C.tensor_shape(res)
    s_dtype, r_dtype = C.tensor_dtype(src), C.tensor_dtype(res)
    if s_dtype in ("", "void") or s_dtype != r_dtype or s_shape is None or r_shape is None:
        return None
    a, b = element_count(s_shape), element_count(r_shape)
    if isinstance(a, int) and isinstance(b, int):
        same = a == b
    else:
        import tvm.sym  # TVM 0.27: tvm.arith moved here

        same = tvm.sym.Analyzer().can_prove_equal(a, b)
    return arg if same and _has_reshape_pattern(func) else None


def _has_reshape_pattern(func) -> bool:
    # memoised per PrimFunc object: the estimator's lowering hands back the same ones
    pattern = relax.analysis.has_reshape_pattern
    return C.identity_memo(caches.current().reshape, None, func, lambda: bool(pattern(func)), 16384)
