"""Every TVM-version-sensitive import and attribute access lives here.

Pinned to apache-tvm 0.27 (Relax shares its IR with tirx; StructInfo became Type: ``expr.ty``;
``relax.Var.name``; constants are ``tvm.ir.GenericConst``). See ../shared/notes/tvm-0.27.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import tvm
import tvm_ffi
from tvm import relax

from . import caches, errors

TVM_VERSION = tvm.__version__


def _register_errors() -> None:
    """Our error classes keep their type through TVM's FFI (a pass that raises one inside
    ``tvm.compile``); only the message crosses, the fields do not."""
    todo = [errors.AutochunkError]
    while todo:
        cls = todo.pop()
        tvm_ffi.error.register_error(cls)
        todo.extend(cls.__subclasses__())


_register_errors()

IntImm = tvm.tirx.IntImm
TirVar = tvm.tirx.Var
GenericConst = tvm.ir.GenericConst
Call = tvm.ir.Call
Op = tvm.ir.Op
GlobalVar = tvm.ir.GlobalVar
PrimFunc = tvm.tirx.PrimFunc
ExternFunc = relax.ExternFunc
TensorType = relax.TensorType
TupleType = relax.TupleType


def op_name(call) -> str | None:
    """The registered op name of ``call`` (e.g. ``"relax.matmul"``), or None."""
    if isinstance(call, Call) and isinstance(call.op, Op):
        return str(call.op.name)
    return None


@functools.lru_cache(maxsize=256)
def dtype_bytes(dtype: str) -> int:
    """Bytes per element as TVM's planner counts them (bool is one byte)."""
    dt = tvm.runtime.DataType(str(dtype))
    return max(1, (int(dt.bits) + 7) // 8) * int(dt.lanes)


def tensor_shape(ty) -> list | None:
    """The shape of a TensorType as a list of ints / PrimExprs, or None if unknown.

    Cached by the type's handle in the build's caches (types are immutable; the entry holds
    the type, so its handle is not reused meanwhile): the search reads the same shapes
    thousands of times, and each read through the FFI costs microseconds.
    """
    hit = _shape_entry(ty)
    return None if hit is None or hit[1] is None else list(hit[1])


def static_shape(ty) -> tuple[int, ...] | None:
    """The shape of a TensorType when every dim is a known int, else None (cached)."""
    hit = _shape_entry(ty)
    return None if hit is None else hit[2]


def _shape_entry(ty):
    if not isinstance(ty, TensorType):
        return None
    h = ty.__chandle__()
    cache = caches.current().shapes
    hit = cache.get(h)
    if hit is None:
        vals = None if ty.shape is None else getattr(ty.shape, "values", None)
        shape = None
        if vals is not None:
            shape = tuple(int(d) if isinstance(d, IntImm) else d for d in vals)
        static = shape if shape is not None and all(isinstance(d, int) for d in shape) else None
        nbytes = prod(static) * dtype_bytes(str(ty.dtype)) if static else 0
        if len(cache) >= 100_000:
            cache.clear()
        hit = cache[h] = (ty, shape, static, nbytes)
    return hit


def tensor_type_leaves(ty) -> list:
    """The TensorTypes of ``ty``, tuples flattened in order (other leaves dropped)."""
    if isinstance(ty, TensorType):
        return [ty]
    if isinstance(ty, TupleType):
        return [leaf for f in ty.fields for leaf in tensor_type_leaves(f)]
    return []


def tensor_dtype(ty) -> str:
    return str(ty.dtype)


def free_tir_vars(exprs: Iterable) -> list:
    """The tirx.Vars used by a list of PrimExprs (dims), in first-seen order."""
    seen: dict[str, object] = {}
    for e in exprs:
        if isinstance(e, int):
            continue

        def cb(node, vis, _seen=seen):
            _seen.setdefault(str(node.name), node)
            return vis.default_visit(node)

        if isinstance(e, TirVar):
            seen.setdefault(str(e.name), e)
        else:
            tvm_ffi.structural_visit(e, [(TirVar, cb)])
    return list(seen.values())


def upper_bounds_of(func) -> dict[str, int]:
    """``tir_var_upper_bound`` attribute of a Relax function as {name: int}."""
    return _bounds_attr(func, "tir_var_upper_bound")


def lower_bounds_of(func) -> dict[str, int]:
    """``tir_var_lower_bound`` attribute of a Relax function as {name: int}."""
    return _bounds_attr(func, "tir_var_lower_bound")


def _bounds_attr(func, key: str) -> dict[str, int]:
    attrs = func.attrs
    if attrs is None or key not in attrs:
        return {}
    return {str(k): int(v) for k, v in attrs[key].items()}


def eval_upper(expr, bounds: dict[str, int]) -> int | None:
    """Upper bound of a PrimExpr given {var name: upper bound} (vars range over [0, ub]).

    Mirrors StaticPlanBlockMemory's GetUpperBoundShape. Returns None when unbounded.
    """
    if isinstance(expr, int):
        return expr
    if isinstance(expr, IntImm):
        return int(expr)
    ana = tvm.sym.Analyzer()
    for v in free_tir_vars([expr]):
        ub = bounds.get(str(v.name))
        if ub is not None:
            ana.bind(v, tvm.ir.Range.from_min_extent(0, ub + 1))
    b = ana.const_int_bound(expr)
    if b.max_value >= (1 << 62):
        return None
    return int(b.max_value)


def prod(xs: Iterable[int]) -> int:
    return math.prod(xs)


def static_nbytes(ty) -> int:
    """Bytes of a statically shaped tensor type; 0 for anything else (tuples, symbolic)."""
    hit = _shape_entry(ty)
    return 0 if hit is None else hit[3]


def _lower_for_workspace(pf, target):
    """The start of TVM's TIR pipeline, through StorageRewrite (which merges buffers)."""
    from tvm import s_tir, tirx

    passes = [
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerCrossThreadReduction(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(),
        s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
        tirx.transform.NarrowDataType(32),
        tirx.transform.VectorizeLoop(True),
        tirx.transform.StorageRewrite(),
    ]
    with target:
        return tvm.transform.Sequential(passes)(tvm.IRModule({"f": pf}))["f"]


def prim_func_workspace(pf, target, bounds: dict[str, int] | None = None) -> tuple[int, ...]:
    """The run-time workspace allocations (bytes, in program order) of one CPU PrimFunc.

    Global buffers a kernel allocates internally (softmax's exp buffer, an unfused chain's
    temporaries) are requested from TVM's workspace pool at run time; they are counted after
    ``StorageRewrite`` has merged what it can, as the built kernel will really ask for them.
    Symbolic extents are evaluated at ``bounds`` (the calling function's ``tir_var_upper_bound``,
    matched by variable name); an extent that stays unbounded raises ``SymbolicShapeError``.
    """
    bounds = bounds or {}
    # the whole target: the CPU schedules depend on its vector width
    key = (str(target), tuple(sorted(bounds.items())))
    # the same PrimFunc object (the estimator's memoised legalization hands the same ones back
    # estimate after estimate) is answered without a structural hash, which is slow
    cache = caches.current()
    return identity_memo(
        cache.workspace_by_object,
        key,
        pf,
        lambda: structural_memo(cache.workspace, key, pf, lambda: _workspace(pf, target, bounds)),
        16384,
    )


def identity_memo(cache: dict, key, obj, compute, max_entries: int | None = None):
    """``compute()``, memoised in ``cache`` by ``key`` and the identity of the TVM object
    ``obj`` (its handle, checked with ``same_as``; the entry holds ``obj``, so its handle is not
    reused meanwhile): no structural hash, for objects handed back again and again (the
    estimator's memoised legalization returns the same PrimFuncs estimate after estimate).
    ``max_entries``: the cache is cleared when it holds that many keys."""
    ident = (obj.__chandle__(), key)
    known = cache.get(ident)
    if known is not None and known[0].same_as(obj):
        return known[1]
    value = compute()
    if max_entries is not None and len(cache) >= max_entries:
        cache.clear()
    cache[ident] = (obj, value)
    return value


def structural_memo(cache: dict, key, obj, compute, max_entries: int | None = None):
    """``compute()``, memoised in ``cache`` by ``key`` and the structure of ``obj``.

    TVM's structural hash collides (``R.Tensor((1, 20, 200))`` and ``R.Tensor((1, 3, 18))``
    hash alike), so a hit must also be structurally equal; colliding objects share a bucket.
    ``max_entries``: the cache is cleared when it holds that many keys.
    """
    full = (tvm_ffi.structural_hash(obj), key)
    for other, value in cache.get(full, ()):
        if tvm_ffi.structural_equal(other, obj):
            return value
    value = compute()
    if max_entries is not None and len(cache) >= max_entries:
        cache.clear()
    cache.setdefault(full, []).append((obj, value))
    return value


# TVM keeps a kernel's buffers this small on the stack (kMaxStackAlloca), not the workspace
STACK_BYTES = 1024


def kept_matmul_workspace(call, target) -> tuple[int, ...]:
    """The workspace requests of the CPU kernel TVM lowers a static ``relax.matmul`` to."""
    from .cpu_schedules.matmul import pack_bytes, pad_bytes

    out, b = static_shape(call.ty), static_shape(call.args[1].ty)
    if out is None or b is None:
        return ()
    dtype = str(call.ty.dtype)
    sizes = (pack_bytes(out, b, dtype, target), *pad_bytes(out, b, dtype, target))
    return tuple(n for n in sizes if n > STACK_BYTES)


def _workspace(pf, target, bounds: dict[str, int]) -> tuple[int, ...]:
    if not _has_global_alloc(pf) and not (target.kind.name == "llvm" and _has_contraction(pf)):
        # the schedule rules add a global buffer only to a matmul or conv (a packed panel);
        # scheduling every softmax and norm too was a third of the search's time
        return ()
    scheduled = pf.attrs is not None and "tirx.is_scheduled" in pf.attrs
    if target.kind.name == "llvm" and not scheduled:
        pf = schedule_cpu(pf, target)  # as the build will (lowering.lowering_passes)
    lowered = _lower_for_workspace(pf, target)
    sizes: list[int] = []

    def on_alloc(node, vis):
        buf = node.buffer
        scope = buf.scope() if hasattr(buf, "scope") else "global"
        if scope in ("global", ""):
            n = 1
            for s in buf.shape:
                ub = eval_upper(s, bounds)
                if ub is None:
                    from .errors import SymbolicShapeError

                    raise SymbolicShapeError(
                        f"a kernel workspace buffer '{buf.name}' has extent {s} with no upper "
                        "bound, so its memory cannot be bounded. Remedy: bound the symbolic dims "
                        "of the model's inputs (tir_var_upper_bound)."
                    )
                n *= ub
            b = n * dtype_bytes(str(buf.dtype))
            if b > STACK_BYTES:
                sizes.append(b)
        return vis.default_visit(node)

    tvm_ffi.structural_visit(lowered.body, [(tvm.tirx.stmt.AllocBuffer, on_alloc)])
    return tuple(sizes)


def schedule_cpu(pf, target):
    """``pf`` as the CPU pipeline schedules it (``cpu_schedules.schedule_pass``)."""
    from . import cpu_schedules

    mod = tvm.IRModule({"main": pf})
    with target:
        return cpu_schedules.schedule_pass()(mod)["main"]


def _has_contraction(pf) -> bool:
    """Whether a PrimFunc (sblock TIR) has a reduction block reading two or more buffers
    besides the one it writes (a matmul, a conv; not a row sum or max)."""
    found = False

    def on_block(b, vis):
        nonlocal found
        if any(int(iv.iter_type) == 2 for iv in b.iter_vars):  # kCommReduce
            out = [w.source for w in b.writes]
            ins = []
            for r in b.reads:
                if not any(r.source.same_as(x) for x in out + ins):
                    ins.append(r.source)
            found = found or len(ins) >= 2
        return vis.default_visit(b)

    tvm_ffi.structural_visit(pf.body, [(tvm.s_tir.stmt.SBlock, on_block)])
    return found


def _has_global_alloc(pf) -> bool:
    """Whether a PrimFunc (un-lowered sblock TIR) allocates any global-scope buffer."""
    found = False

    def on_block(b, vis):
        nonlocal found
        if any(buf.scope() in ("global", "") for buf in b.alloc_buffers):
            found = True
        return vis.default_visit(b)

    tvm_ffi.structural_visit(pf.body, [(tvm.s_tir.stmt.SBlock, on_block)])
    return found
