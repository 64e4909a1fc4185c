"""BoundSymbolicDims: give symbolic dims of a function signature an upper bound.

Sets (merges into) the ``tir_var_upper_bound`` attribute that ``StaticPlanBlockMemory`` and our
estimator read. Use it when a model was imported with unbounded dynamic dims.
"""

from __future__ import annotations

import tvm
from tvm import relax

from . import _compat as C
from .errors import PassContractError


@tvm.transform.module_pass(opt_level=0, name="BoundSymbolicDims")
class BoundSymbolicDims:
    def __init__(self, bounds: dict[str, int], entry: str = "main"):
        for k, v in bounds.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PassContractError(f"bound for '{k}' must be a positive int, got {v!r}")
        self.bounds = dict(bounds)
        self.entry = entry

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod[self.entry]
        if not isinstance(func, relax.Function):
            raise PassContractError(f"'{self.entry}' is not a Relax function")
        present = set()
        for p in func.params:
            shape = C.tensor_shape(p.ty) or []
            present.update(str(v.name) for v in C.free_tir_vars(shape))
        unknown = sorted(set(self.bounds) - present)
        if unknown:
            raise PassContractError(
                f"no symbolic dim named {unknown} in the signature of '{self.entry}' "
                f"(symbolic dims: {sorted(present) or 'none'})"
            )
        merged = C.upper_bounds_of(func)
        merged.update(self.bounds)
        new = func.with_attr("tir_var_upper_bound", {k: int(v) for k, v in merged.items()})
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out[self.entry] = new
        return out
