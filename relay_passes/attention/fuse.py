"""FuseAttention: softmax attention becomes one call of a flash-style kernel (llvm targets).

Runs in the CPU lowering pipeline before ``LegalizeOps`` (``lowering.legalize_passes``), so
the memory estimator, the search and the build all see the fused module: the Sq x Sk scores,
their softmax and the mask built from ``arange`` are gone, in chunk functions as in ``main``.
Matching is ``match.find_attention``; what does not match (another dtype, a mask whose
broadcast the kernel cannot read, a scores tensor used twice) stays as it was and is lowered
by TVM as before, and so does a module marked by ``leave_unfused``. A symbolic length (query
or key) is a symbolic extent of the kernel, built once for every length. GPU targets are not
fused yet (``docs/design.md``, "Fused attention").
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .. import _compat as C
from .. import caches
from .kernel_cpu import AttentionShape, cpu_kernel
from .match import Attention, Module, dims, find_attention


def _kernel(shape: AttentionShape):
    # one PrimFunc object per shape in a build: the estimator's memos key on the object
    c = caches.current()
    got = c.kernels.get(shape)
    if got is None:
        got = c.kernels[shape] = cpu_kernel(shape)
    return got


@mutator
class _Fuse(PyExprMutator):
    def __init__(self, mod, found: dict):
        super().__init__(mod)
        self.found = found  # output var -> Attention
        self.gvs: dict = {}  # AttentionShape -> GlobalVar
        self.analyzer = tvm.sym.Analyzer()
        self.syms: dict = {}  # symbolic dim name -> its PrimExpr at the site being fused

    def _as(self, e, shape: tuple, name: str):
        e = self.visit_expr(e)
        if dims(e.ty) == tuple(shape):
            return e
        # named after the output: the same module fuses to the same names, whatever the
        # order the functions are visited in
        return self.builder_.emit(relax.op.reshape(e, self._exprs(shape)), name)

    def _exprs(self, shape: tuple) -> relax.ShapeExpr:
        """``shape`` (ints, symbolic dims by name: ``match.dims``) as a ShapeExpr of this site."""
        return relax.ShapeExpr([self.syms[d] if isinstance(d, str) else d for d in shape])

    def visit_var_binding_(self, binding):
        m: Attention | None = self.found.get(binding.var)
        if m is None:
            return super().visit_var_binding_(binding)
        sh, name = m.shape, binding.var.name
        self.syms = {  # the symbolic lengths as this function writes them
            str(d): d for e in (m.a, m.v) for d in C.tensor_shape(e.ty)
            if not isinstance(d, (int, tvm.tirx.IntImm))
        }
        gv = self.gvs.get(sh)
        if gv is None:
            gv = self.gvs[sh] = self.builder_.add_func(_kernel(sh), "attention_cpu")
        if m.bias is None:
            b3 = relax.const(np.zeros((1, 1, 1), sh.dtype))
        else:
            b3 = self._as(m.bias, sh.bias[:3], f"{name}_bias")
        diag = tvm.tirx.IntImm("int64", 0) if m.diag is None else self.analyzer.simplify(m.diag)
        args = [
            self._as(m.a, (sh.batch, sh.sq, sh.h), f"{name}_a"),
            self._as(m.bt, (sh.batch, sh.h, sh.sk), f"{name}_bt"),
            self._as(m.v, (sh.batch, sh.sk, sh.hv), f"{name}_v"),
            b3,
            diag,
        ]
        out_ty = relax.TensorType(self._exprs((sh.batch, sh.sq, sh.hv)).values, sh.dtype)
        res = relax.call_tir(gv, args, out_ty)
        if dims(binding.var.ty) != (sh.batch, sh.sq, sh.hv):
            o = self.builder_.emit(res, f"{name}_o")
            res = relax.op.reshape(o, relax.ShapeExpr(C.tensor_shape(binding.var.ty)))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(res)))


# a module attribute: attention left unfused (``leave_unfused``)
UNFUSED_ATTR = "autochunk_unfused_attention"


def leave_unfused(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` marked so that ``FuseAttention`` leaves it as it is, in every pipeline that
    lowers it (estimate, search, build): the scores exist again, and chunking is what lowers
    their memory (A/B comparisons, and tests of the search on attention-bound graphs)."""
    return mod.with_attr(UNFUSED_ATTR, True)


def fuse_attention(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every matched attention fused (``mod`` itself when none matched, or when
    it is marked by ``leave_unfused``)."""
    attrs = mod.attrs
    if attrs is not None and UNFUSED_ATTR in attrs and bool(attrs[UNFUSED_ATTR]):
        return mod
    # by name: the same module fuses to the same names whatever its function order
    funcs = sorted(
        ((gv, f) for gv, f in mod.functions.items() if _has_softmax(f)),
        key=lambda kv: kv[0].name_hint,
    )
    if not funcs:
        return mod
    module, found = Module(mod), {}
    for gv, _func in funcs:
        for m in find_attention(module, gv.name_hint):
            found[m.out] = m
    if not found:
        return mod
    fuser = _Fuse(mod, found)
    for gv, func in funcs:
        fuser.builder_.update_func(gv, fuser.visit_expr(func))
    out = fuser.builder_.get()
    for gv, func in out.functions.items():  # the scores, softmax and mask are unused now
        if isinstance(func, relax.Function):
            out[gv] = relax.analysis.remove_all_unused(func)
    return out


def _has_softmax(func) -> bool:
    if not isinstance(func, relax.Function):
        return False
    return any(
        C.op_name(b.value) == "relax.nn.softmax"
        for block in func.body.blocks
        for b in block.bindings
    )


@tvm.transform.module_pass(opt_level=0, name="FuseAttention")
def FuseAttention(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``fuse_attention`` as a module pass, for any TVM pipeline with an llvm target."""
    return fuse_attention(mod)
