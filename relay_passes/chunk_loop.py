"""A loop over chunks whose count is known only at run time (a symbolic extent).

Relax has no loop construct, so the loop is a private recursive function with ``R.If``:

    loop(ins..., bufs..., off, end):
        if off + C <= end: return loop(ins..., chunk(ins..., bufs..., off)..., off + C, end)
        elif off < end:    return tail(ins..., bufs..., off, end - off)
        else:              return bufs

``chunk`` is compiled for the static chunk size ``C``; ``tail`` takes its row count ``t`` as a
parameter (its kernels have one symbolic extent, compiled once). The IR stays the same size
whatever the extent; each level of the recursion holds only the in-place buffers.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .alias import BUFFER_PARAMS

_I64 = "int64"


def _prim(name: str) -> relax.Var:
    return relax.Var(name, tvm.ir.PrimType(_I64))


def build_loop(
    bb: relax.BlockBuilder,
    name: str,
    full_gv: tvm.ir.GlobalVar,
    tail_gv: tvm.ir.GlobalVar,
    in_tys: list,
    buf_tys: list,
    chunk: int,
) -> tvm.ir.GlobalVar:
    """Add the loop function ``name`` to ``bb`` and return its GlobalVar. ``full_gv`` and
    ``tail_gv`` take (ins..., bufs..., off[, t]) and return the buffers written in place
    (a tuple when there are several)."""
    multi = len(buf_tys) > 1
    ret_ty = relax.TupleType(list(buf_tys)) if multi else buf_tys[0]

    def params():
        ins = [relax.Var(f"in{i}", t) for i, t in enumerate(in_tys)]
        bufs = [relax.Var(f"buf{i}", t) for i, t in enumerate(buf_tys)]
        return ins, bufs, _prim("off"), _prim("end")

    def result(bufs):
        return relax.Tuple(bufs) if multi else bufs[0]

    # a placeholder first: the recursive call needs a typed GlobalVar. The attribute keeps
    # the builder from handing back another loop with the same signature.
    ins, bufs, off, end = params()
    holder = relax.Function([*ins, *bufs, off, end], result(bufs), ret_ty, is_pure=True)
    gv = bb.add_func(holder.with_attr("autochunk_loop", name), name)

    ins, bufs, off, end = params()
    step = []

    def bind(value, vname, ty):
        v = relax.Var(vname, ty)
        step.append(relax.VarBinding(v, value))
        return v

    r = bind(relax.Call(full_gv, [*ins, *bufs, off]), "chunk_res", ret_ty)
    parts = [r]
    if multi:
        parts = [bind(relax.TupleGetItem(r, k), f"part{k}", t) for k, t in enumerate(buf_tys)]
    again = bind(relax.Call(gv, [*ins, *parts, off + chunk, end]), "rest", ret_ty)
    full_branch = relax.SeqExpr([relax.BindingBlock(step)], again)
    step = []
    rows = relax.ShapeExpr([end - off])
    tail = bind(relax.Call(tail_gv, [*ins, *bufs, off, rows]), "tail_res", ret_ty)
    tail_branch = relax.SeqExpr([relax.BindingBlock(step)], tail)
    done = relax.SeqExpr([], result(bufs))
    # each If bound to a var (normal form), so the alias analysis reads through the branches
    step = []
    rest = bind(relax.If(relax.prim_value(off < end), tail_branch, done), "last", ret_ty)
    rest_branch = relax.SeqExpr([relax.BindingBlock(step)], rest)
    step = []
    res = bind(
        relax.If(relax.prim_value(off + chunk <= end), full_branch, rest_branch), "res", ret_ty
    )
    body = relax.SeqExpr([relax.BindingBlock(step)], res)
    func = relax.Function([*ins, *bufs, off, end], body, ret_ty, is_pure=True)
    func = func.with_attr("autochunk_loop", name).with_attr(
        BUFFER_PARAMS, [len(ins) + k for k in range(len(bufs))]
    )
    func = relax.utils.copy_with_new_vars(func)
    bb.update_func(gv, func)
    return gv
