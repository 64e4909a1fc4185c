"""PatchConvToMatmul: a non-overlapping conv2d (a ViT patch embedding) becomes one matmul.

Why: TVM legalizes a stride == kernel conv to a strided direct conv that our CPU rules run
slowly; as a matmul it gets the register-blocked GEMM (ViT-1024's patch conv, one thread:
34 ms -> 6.4 ms, layout ops included; a constant weight is transposed here, once).

Where: on a high-level Relax module, before legalization (it emits Relax ops); usable alone in
any pipeline. It rewrites ``relax.nn.conv2d(x, w)`` with x (N, C, H, W), w (O, C, kh, kw) when
strides == (kh, kw), padding 0, dilation 1, groups 1, layouts NCHW/OIHW/NCHW, H % kh == 0,
W % kw == 0 and every shape is static, into::

    p = reshape(x, (N, C, H', kh, W', kw)) -> permute (N, H', W', C, kh, kw) -> (N*H'*W', C*kh*kw)
    y = matmul(p, permute(reshape(w, (O, C*kh*kw)), [1, 0]), out_dtype) -> (N, H', W', O) -> NCHW

Every other conv (padding, overlapping strides, groups, dilation, other layouts, symbolic
shapes) is left as it is. The result is checked with ``relax.analysis.well_formed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import _compat as C
from .rewrite import check_well_formed

CONV2D = C.Op.get("relax.nn.conv2d")


@dataclass(frozen=True)
class PatchConv:
    """The static shapes of one matched conv; ``out_dtype`` None means the inputs' dtype."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    out_dtype: str | None

    @property
    def grid(self) -> tuple[int, int]:
        return self.h // self.kh, self.w // self.kw


def _out_dtype(attrs) -> str | None:
    dt = attrs.out_dtype
    # None, "" and "void" all mean "the inputs' dtype", as conv2d's type inference reads them
    return None if dt is None or str(dt) in ("", "void") else str(dt)


def match_patch_conv(call) -> PatchConv | None:
    """The shapes of ``call`` if it is a conv2d this pass rewrites, else None."""
    if not (isinstance(call, C.Call) and isinstance(call.op, C.Op) and call.op.same_as(CONV2D)):
        return None
    a = call.attrs
    xs, ws = (C.static_shape(arg.ty) for arg in call.args[:2])
    if xs is None or ws is None or len(xs) != 4 or len(ws) != 4:
        return None
    n, c, h, w = xs
    o, ci, kh, kw = ws
    ok = (
        (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) == ("NCHW", "OIHW", "NCHW")
        and int(a.groups) == 1
        and ci == c
        and [int(s) for s in a.strides] == [kh, kw]
        and all(int(p) == 0 for p in a.padding)
        and all(int(d) == 1 for d in a.dilation)
        and h % kh == 0
        and w % kw == 0
    )
    return PatchConv(n, c, h, w, o, kh, kw, _out_dtype(a)) if ok else None


def emit_patch_matmul(bb: relax.BlockBuilder, x, w, p: PatchConv):
    """Emit the patch matmul's bindings into ``bb``; returns the (N, O, H', W') result (unbound).

    A constant ``w`` (a model's weight) is transposed here, once, not in every call: the llvm
    build folds no constants (0.3 of ~6 ms for ViT-1024)."""
    op = relax.op
    gh, gw = p.grid
    k = p.c * p.kh * p.kw
    # the reshapes are free views after RewriteDataflowReshape; the permutes are the copies
    x6 = bb.emit(op.reshape(x, (p.n, p.c, gh, p.kh, gw, p.kw)), "patch_x6")
    xp = bb.emit(op.permute_dims(x6, [0, 2, 4, 1, 3, 5]), "patch_xp")
    rows = bb.emit(op.reshape(xp, (p.n * gh * gw, k)), "patch_rows")
    if isinstance(w, C.GenericConst):
        wt = relax.const(w.value.numpy().reshape(p.o, k).T.copy(), str(w.ty.dtype))
    else:
        wk = bb.emit(op.reshape(w, (p.o, k)), "patch_w")
        wt = bb.emit(op.permute_dims(wk, [1, 0]), "patch_wt")
    y = bb.emit(op.matmul(rows, wt, out_dtype=p.out_dtype), "patch_y")
    y4 = bb.emit(op.reshape(y, (p.n, gh, gw, p.o)), "patch_nhwc")
    return op.permute_dims(y4, [0, 3, 1, 2])


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)  # children first (a conv's input may be rewritten)
        p = match_patch_conv(call)
        if p is None:
            return call
        self.rewritten += 1
        return emit_patch_matmul(self.builder_, call.args[0], call.args[1], p)


@tvm.transform.module_pass(opt_level=0, name="PatchConvToMatmul")
class PatchConvToMatmul:
    """Rewrite every patch-embedding conv2d of every Relax function (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rw = _Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                new = rw.visit_expr(func)
                if not new.same_as(func):
                    rw.builder_.update_func(gv, new)
        if rw.rewritten == 0:
            return mod  # untouched, not a rebuilt copy
        out = rw.builder_.get()
        check_well_formed(out, f"PatchConvToMatmul ({rw.rewritten} conv2d)")
        return out
