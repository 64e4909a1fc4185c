"""Find softmax attention in a Relax function: ``matmul(softmax(matmul(A, Bt) [+ M]), V)``.

An analysis: it returns plain data (``Attention``) and changes nothing. torch's SDPA imports
as this chain with reshapes and identity ``broadcast_to`` between the ops; its causal mask is
``where(arange_k - arange_q <= 0, 0, -inf)`` (``torch_decomp``). A mask of that form is read
as a diagonal offset (``diag``: key ``j`` seen by row ``i`` iff ``j <= i + diag``), including
a chunk function's, whose query ``arange`` starts at the chunk's offset and whose key
``arange`` arrives as a parameter (resolved at the function's call sites). Any other additive
mask is a bias the kernel reads with broadcasting. The scores, the softmax and every tensor
between them must have no other use: otherwise the Sq x Sk tensor stays and fusing would only
compute it twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import tvm
from tvm import relax

from .. import _compat as C
from .kernel_cpu import AttentionShape

SOFTMAX, MATMUL = "relax.nn.softmax", "relax.matmul"
PASS_THROUGH = ("relax.reshape", "relax.broadcast_to")


@dataclass(frozen=True)
class Attention:
    """One match, by variable: ``out = softmax(a @ bt + bias, causal at diag) @ v``.

    ``shape``: what the kernel computes (``kernel_cpu.AttentionShape``: the batch rows are the
    product of the scores' leading dims); ``diag``: the causal diagonal (None: not causal);
    ``bias``: the mask read as a bias (None: no bias; its broadcast is ``shape.bias``)."""

    out: relax.Var
    a: relax.Expr
    bt: relax.Expr
    v: relax.Expr
    shape: AttentionShape
    diag: tvm.tirx.PrimExpr | None = None
    bias: relax.Expr | None = None


def dims(ty) -> tuple | None:
    """A tensor type's shape as a tuple of ints, with a symbolic dim as its text (``"s27"``):
    comparable with ``==``, which PrimExprs are not. None for an unknown shape."""
    if not isinstance(ty, C.TensorType):
        return None
    shape = C.tensor_shape(ty)
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else str(d) for d in shape)


def _shape(e):
    return dims(e.ty) if isinstance(getattr(e, "ty", None), C.TensorType) else None


class _Function:
    """Bindings and use counts of one function; ``module`` finds its call sites."""

    def __init__(self, func: relax.Function, module: Module | None = None, name: str = ""):
        self.func, self.module, self.name = func, module, name
        self.value: dict = {}
        self.uses: Counter = Counter()
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.value[b.var] = b.value
                    self._count(b.value)
        self._count(func.body.body)

    def _count(self, e):
        if isinstance(e, relax.Var):
            self.uses[e] += 1
        elif isinstance(e, relax.Call):
            for a in e.args:
                self._count(a)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                self._count(f)
        elif isinstance(e, relax.TupleGetItem):
            self._count(e.tuple_value)

    @property
    def callers(self) -> list:
        """``[(caller _Function, call)]``: where the module calls this function."""
        return self.module.callers(self.name) if self.module is not None else []

    def bound(self, e):
        """``e``, or the constant bound to it when ``e`` is a variable bound to one."""
        v = self.value.get(e) if isinstance(e, relax.Var) else None
        return v if isinstance(v, C.GenericConst) else e

    def call(self, var, name: str | None = None):
        """The call bound to ``var`` (of op ``name`` if given), else None."""
        v = self.value.get(var) if isinstance(var, relax.Var) else None
        if isinstance(v, relax.Call) and (name is None or C.op_name(v) == name):
            return v
        return None

    def through(self, var, *, single_use: bool = True):
        """``var`` followed back through reshapes and identity broadcasts (each used once)."""
        while True:
            v = self.call(var)
            if v is None or C.op_name(v) not in PASS_THROUGH:
                return var
            if single_use and self.uses[var] != 1:
                return var
            src = v.args[0]
            if C.op_name(v) == "relax.broadcast_to" and _shape(src) != _shape(var):
                return var
            var = src


# ------------------------------------------------------------------ the causal mask


@dataclass(frozen=True)
class _Affine:
    """An integer tensor whose element at (..., i, j) is ``const + row * i + col * j``."""

    const: tvm.tirx.PrimExpr
    row: int = 0
    col: int = 0


def _prim(e):
    if isinstance(getattr(e, "ty", None), tvm.ir.PrimType):  # TVM 0.27: prims are Relax exprs
        return e
    if isinstance(e, C.GenericConst) and not _shape(e):
        return tvm.tirx.IntImm("int64", int(e.value.numpy()))
    return None


def _affine(fn: _Function, e, depth: int = 0):
    """``e`` as an ``_Affine`` over its two trailing axes, or None."""
    if depth > 16:
        return None
    if isinstance(e, relax.Var) and e not in fn.value:
        return _param_affine(fn, e, depth)
    call = fn.call(e)
    name = C.op_name(call)
    if name == "relax.arange":
        start, _end, step = (_prim(fn.bound(a)) for a in call.args)
        if start is None or not (isinstance(step, tvm.tirx.IntImm) and int(step) == 1):
            return None
        return _Affine(start, 0, 1)
    if name == "relax.expand_dims" and len(_shape(call.args[0]) or (0, 0)) == 1:
        x = _affine(fn, call.args[0], depth + 1)
        axis = [int(a) for a in call.attrs.axis]
        if x is None or len(axis) != 1:
            return None
        return _Affine(x.const, x.col, 0) if axis[0] in (-1, 1) else x
    if name in ("relax.subtract", "relax.add"):
        x, y = (_affine(fn, a, depth + 1) for a in call.args)
        if x is None or y is None:
            return None
        sign = -1 if name == "relax.subtract" else 1
        return _Affine(x.const + sign * y.const, x.row + sign * y.row, x.col + sign * y.col)
    return None


def _param_affine(fn: _Function, param, depth: int):
    """A parameter's affine form, the same constant one at every call site, else None."""
    params = list(fn.func.params)
    if param not in params or not fn.callers:
        return None
    i = params.index(param)
    found = None
    for caller, call in fn.callers:
        if caller.name == fn.name and call.args[i].same_as(param):
            continue  # a loop passing it on to its next iteration unchanged
        got = _affine(caller, call.args[i], depth + 1)
        if got is None or not isinstance(got.const, tvm.tirx.IntImm):
            return None
        key = (int(got.const), got.row, got.col)
        if found is not None and key != found:
            return None
        found = key
    return _Affine(tvm.tirx.IntImm("int64", found[0]), found[1], found[2])


def _is_const(fn: _Function, e, value, depth: int = 0) -> bool:
    """``e`` is a scalar constant ``value``, inline or bound to a variable (torch's export
    binds some, e.g. at S=1024 but not S=64), or a parameter every call site passes it to (a
    chunk function gets the mask's 0 and -inf from its caller)."""
    if isinstance(e, relax.Var) and e not in fn.value:
        params = list(fn.func.params)
        if e not in params or not fn.callers or depth > 16:
            return False
        i = params.index(e)
        args = [
            (caller, call.args[i]) for caller, call in fn.callers
            if not (caller.name == fn.name and call.args[i].same_as(e))  # a loop passing it on
        ]
        return bool(args) and all(_is_const(c, a, value, depth + 1) for c, a in args)
    e = fn.bound(e)
    if not isinstance(e, C.GenericConst) or _shape(e):
        return False
    return float(e.value.numpy()) == value


def causal_diag(fn: _Function, mask):
    """``diag`` if ``mask`` is ``where(col - row + c0 <= c, 0, -inf)`` (key j seen by row i iff
    ``j <= i + c - c0``), else None."""
    where = fn.call(mask, "relax.where")
    if where is None or not (
        _is_const(fn, where.args[1], 0.0) and _is_const(fn, where.args[2], float("-inf"))
    ):
        return None
    cond = fn.call(where.args[0])
    if C.op_name(cond) == "relax.logical_and":  # torch ANDs the test with an all-true full()
        a, b = cond.args
        full_a, full_b = fn.call(a, "relax.full"), fn.call(b, "relax.full")
        full, cond = (full_a, fn.call(b)) if full_a is not None else (full_b, fn.call(a))
        if full is None or not _is_const(fn, full.args[1], 1.0):
            return None
    if C.op_name(cond) != "relax.less_equal":
        return None
    lim = _prim(fn.bound(cond.args[1]))
    aff = _affine(fn, cond.args[0])
    if lim is None or aff is None or (aff.row, aff.col) != (-1, 1):
        return None
    diag = tvm.tirx.Cast("int64", lim) - tvm.tirx.Cast("int64", aff.const)
    return tvm.sym.Analyzer().simplify(diag)


# ------------------------------------------------------------------ the chain


def _bias(mask_shape, scores_shape):
    """``(rows, bq, bk, div)`` reading a mask of ``mask_shape`` broadcast to ``scores_shape``,
    or None when its broadcast batch dims are not one contiguous run."""
    if mask_shape is None or len(mask_shape) > len(scores_shape):
        return None
    m = (1,) * (len(scores_shape) - len(mask_shape)) + tuple(mask_shape)
    *mb, bq, bk = m
    *sb, sq, sk = scores_shape
    if bq not in (1, sq) or bk not in (1, sk) or any(x not in (1, y) for x, y in zip(mb, sb)):
        return None
    full = [i for i, (x, y) in enumerate(zip(mb, sb)) if x == y and y > 1]
    if full and full != list(range(full[0], full[-1] + 1)):
        return None
    rows = C.prod(sb[i] for i in full)
    div = C.prod(sb[full[-1] + 1:]) if full else 1
    return rows, bq, bk, div


def _match(fn: _Function, out, call):
    """The ``Attention`` computing ``out = call`` (a matmul), or None."""
    p2, v = call.args
    p = fn.through(p2)
    soft = fn.call(p, SOFTMAX)
    if soft is None or fn.uses[p] != 1:
        return None
    x = soft.args[0]
    xs = _shape(x)
    if xs is None or len(xs) < 2 or int(soft.attrs.axis) not in (-1, len(xs) - 1):
        return None
    if fn.uses[x] != 1:
        return None
    mask, scores = None, x
    add = fn.call(x, "relax.add")
    if add is not None:
        for s, m in (add.args, reversed(add.args)):
            if fn.call(fn.through(s), MATMUL) is not None and _shape(s) == xs:
                scores, mask = s, m
                break
        else:
            return None
    s3 = fn.through(scores)
    qk = fn.call(s3, MATMUL)
    if qk is None or (scores is not s3 and fn.uses[scores] != 1) or fn.uses[s3] != 1:
        return None
    a, bt = qk.args
    shapes = [_shape(e) for e in (a, bt, v, s3, p2, out)]
    if any(s is None or len(s) < 2 for s in shapes):
        return None
    sa, sbt, sv, ss, sp, so = shapes
    *batch, sq, h = sa
    sk, hv = sv[-2], sv[-1]
    if not all(isinstance(d, int) for d in (*batch, h, hv)):
        return None  # only the lengths may be symbolic
    same_batch = all(tuple(s[:-2]) == tuple(batch) for s in (sbt, sv, ss, sp, so))
    if not same_batch or sbt[-2:] != (h, sk) or ss[-2:] != (sq, sk) or sp != ss:
        return None
    if xs[-2:] != (sq, sk) or C.prod(xs[:-2]) != C.prod(batch) or so[-2:] != (sq, hv):
        return None
    dtypes = {C.tensor_dtype(e.ty) for e in (a, bt, v, s3, x, out)}
    if dtypes != {"float32"}:
        return None
    diag, bias, broadcast = None, None, None
    if mask is not None:
        diag = causal_diag(fn, mask)
        if diag is None:
            if C.tensor_dtype(mask.ty) != "float32":
                return None
            broadcast = _bias(_shape(mask), xs)
            if broadcast is None:
                return None
            bias = mask
    shape = AttentionShape(C.prod(batch), sq, sk, h, hv, "float32", diag is not None, broadcast)
    return Attention(out, a, bt, v, shape, diag, bias)


class Module:
    """The functions of a module, indexed once: bindings, uses and call sites."""

    def __init__(self, mod: tvm.IRModule):
        self.funcs = {
            gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, relax.Function)
        }
        self._index: dict = {}
        self._sites: dict | None = None

    def function(self, name: str) -> _Function:
        got = self._index.get(name)
        if got is None:
            got = self._index[name] = _Function(self.funcs[name], self, name)
        return got

    def callers(self, name: str) -> list:
        if self._sites is None:
            self._sites = {}
            for caller, func in self.funcs.items():
                todo = [func.body]  # a chunk loop calls from inside its If branches
                while todo:
                    seq = todo.pop()
                    for block in seq.blocks:
                        for b in block.bindings:
                            v = b.value
                            if isinstance(v, relax.Call) and isinstance(v.op, C.GlobalVar):
                                self._sites.setdefault(v.op.name_hint, []).append((caller, v))
                            elif isinstance(v, relax.If):
                                todo.extend(br for br in (v.true_branch, v.false_branch)
                                            if isinstance(br, relax.SeqExpr))
        return [(self.function(c), call) for c, call in self._sites.get(name, [])]


def find_attention(module: Module, name: str) -> list[Attention]:
    """Every fusable attention in function ``name`` of ``module``."""
    fn = module.function(name)
    found = []
    for var in list(fn.value):
        call = fn.call(var, MATMUL)
        if call is not None and (m := _match(fn, var, call)) is not None:
            found.append(m)
    return found
