"""Fold layout changes of weights into the weights: ``permute_dims`` and ``reshape`` of a
constant become a constant, once, at build time.

torch's ``Linear`` imports as ``matmul(x, permute_dims(W))``: TVM's default CPU pipeline runs no
constant folding, so every call copied every weight into its transposed layout, and those
copies were activations (GPT-1024, one layer: 3 MiB of its chunked floor of 13.3 MiB, alive
through the chunk loop). TVM's CUDA pipeline folds them after legalization (``FoldConstant``);
folding them before the estimate makes CPU and GPU builds plan the same tensors. Only pure data
movement is folded (numpy's transpose and reshape are exact): no op is evaluated, so masks built
from ``arange`` stay computed, and no S x S constant is ever made.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import _compat as C

LAYOUT_OPS = ("relax.permute_dims", "relax.reshape")


def _folded(call):
    """The constant a layout op of a constant gives, or None."""
    name = C.op_name(call)
    if name not in LAYOUT_OPS or not isinstance(call.args[0], C.GenericConst):
        return None
    try:
        data = call.args[0].value.numpy()
    except Exception:  # a dtype numpy cannot hold (bfloat16 without ml_dtypes): leave it
        return None
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        out = data.transpose(None if axes is None else [int(a) for a in axes])
    else:
        shape = C.tensor_shape(call.ty)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        out = data.reshape(shape)
    return relax.const(np.ascontiguousarray(out), str(out.dtype))


@mutator
class _Fold(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        const = _folded(call)
        if const is None:
            return call
        self.count += 1
        return const

    # a variable bound to a folded constant is replaced by it: chains fold, and the binding dies
    def visit_var_(self, var):
        bound = self.lookup_binding(var)
        return bound if isinstance(bound, C.GenericConst) else super().visit_var_(var)

    def visit_dataflow_var_(self, var):
        bound = self.lookup_binding(var)
        return bound if isinstance(bound, C.GenericConst) else super().visit_dataflow_var_(var)


def fold_weight_layouts(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with weight layout changes folded (``mod`` itself when there is none)."""
    m = _Fold(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(func))
    if not m.count:
        return mod
    out = m.builder_.get()
    for gv, func in out.functions.items():  # the folded bindings are unused now
        if isinstance(func, relax.Function):
            out[gv] = relax.analysis.remove_all_unused(func)
    return out


@tvm.transform.module_pass(opt_level=0, name="FoldWeightLayouts")
def FoldWeightLayouts(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``fold_weight_layouts`` as a module pass, for any TVM pipeline."""
    return fold_weight_layouts(mod)
