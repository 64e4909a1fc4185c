"""Keep the tensors a chunk loop reads in TVM's memory plan (``PlanChunkCalls``).

``StaticPlanBlockMemory`` discards the storage tokens of every argument of a call to a Relax
function, since the callee might keep them: the region's inputs read whole (x, K, V, a norm's
output) and the in-place buffers then become run-time allocations, outside the plan. It keeps
the tokens of an ``ExternFunc`` call's arguments, assuming the callee keeps nothing. Our chunk
functions and loops keep nothing and return their buffer parameters, written in place, by
construction (``alias.buffer_params_of``). So each call of one becomes an ``ExternFunc`` call of
the same function, and its result is bound to the buffer arguments themselves: the planner
keeps the buffers live while the result is used and frees every argument after its last use.

``RestoreChunkCalls``, right after the planner, makes the calls plain calls again: the VM's
code generator would declare an ``ExternFunc`` target a packed function (and not find it).
``PlanChunkCalls`` runs after ``CallTIRRewrite`` (out of dataflow form, where no pass removes
the callees any more), right before ``StaticPlanBlockMemory``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import _compat as C
from .alias import buffer_params_of
from .errors import PassContractError


def buffer_params(mod: tvm.IRModule) -> dict[str, list[int]]:
    """Name -> buffer parameter indices of the functions that return their buffers."""
    found = ((str(gv.name_hint), buffer_params_of(f)) for gv, f in mod.functions_items())
    return {name: bufs for name, bufs in found if bufs is not None}


@mutator
class _ToExtern(PyExprMutator):
    """``y = f(args)`` -> ``y_call = ExternFunc(f)(args); y = <f's buffer arguments>``."""

    def __init__(self, mod, targets):
        super().__init__(mod)
        self.mod_ = mod
        self.targets = targets

    def visit_var_binding_(self, binding):
        value = binding.value
        idx = None
        if isinstance(value, C.Call) and isinstance(value.op, C.GlobalVar):
            idx = self.targets.get(str(value.op.name_hint))
        if idx is None:
            return super().visit_var_binding_(binding)
        name = str(value.op.name_hint)
        args = [self.visit_expr(a) for a in value.args]
        fn = relax.ExternFunc(name, self.mod_[value.op].ty)
        self.builder_.emit(relax.Call(fn, args), f"{binding.var.name}_call")
        bufs = [args[i] for i in idx]
        alias = relax.Tuple(bufs) if isinstance(binding.var.ty, C.TupleType) else bufs[0]
        self.builder_.emit_normalized(relax.VarBinding(binding.var, alias))


@mutator
class _FromExtern(PyExprMutator):
    """The inverse, once planned: ``y = f(args)`` again, so that the VM frees the call's
    result register with ``y`` (an unused ``y_call`` would hold the buffers to the end)."""

    def __init__(self, mod, targets):
        super().__init__(mod)
        self.mod_ = mod
        self.targets = targets
        self.pending = None  # the call of the binding before, waiting for its alias binding

    def visit_var_binding_(self, binding):
        value = binding.value
        if self.pending is not None:
            call, self.pending = self.pending, None
            if not isinstance(value, C.Call):  # the alias _ToExtern wrote (var, tuple, const)
                call = self.builder_.normalize(call)
                return self.builder_.emit_normalized(relax.VarBinding(binding.var, call))
            raise PassContractError(f"RestoreChunkCalls: no result binding after {call.op}")
        op = value.op if isinstance(value, C.Call) else None
        if isinstance(op, C.ExternFunc) and str(op.global_symbol) in self.targets:
            gv = self.mod_.get_global_var(str(op.global_symbol))
            self.pending = relax.Call(gv, [self.visit_expr(a) for a in value.args])
            return None
        return super().visit_var_binding_(binding)


def _transform(mutator_cls, mod: tvm.IRModule) -> tvm.IRModule:
    targets = buffer_params(mod)
    if not targets:
        return mod
    m = mutator_cls(mod, targets)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(f))
            if getattr(m, "pending", None) is not None:  # a call was last in its function
                raise PassContractError(f"RestoreChunkCalls: no result binding after "
                                        f"{m.pending.op} in {gv.name_hint}")
    return m.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="PlanChunkCalls")
def PlanChunkCalls(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return _transform(_ToExtern, mod)


@tvm.transform.module_pass(opt_level=0, name="RestoreChunkCalls")
def RestoreChunkCalls(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return _transform(_FromExtern, mod)
