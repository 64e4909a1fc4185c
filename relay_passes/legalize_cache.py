"""CachedLegalizeOps: TVM's LegalizeOps with each op's lowering memoised (for the estimator).

The AutoChunk search estimates dozens of modules that differ only in a few bindings; most of
each estimate's time went into legalizing the same ops again (``bb.call_te``: a TE compute
and ``create_prim_func`` per binding). Here every op's registered ``FLegalize`` is wrapped:
the first call of an op with given attributes and argument types runs TVM's legalization;
when it yields one ``call_tir`` of a PrimFunc over the call's own arguments, that PrimFunc
is kept, and a later call with the same key gets the same PrimFunc called on its own arguments
(the PrimFunc has a GlobalVar of its own, and is added to the pass's result when it is done).

What is never memoised (TVM's legalization runs each time): calls with a non-static argument
or result shape, arguments that are tuples or other expressions holding variables, and any
legalization that emits other bindings, calls something else, or passes extra (symbolic)
arguments. So a cached result is exactly what TVM would produce, up to the PrimFunc's name
(and two structurally equal PrimFuncs may both be there, which TVM's builder would merge).
The key spells out shapes, dtypes and small constants' values; what it hashes (attrs, type
args) is compared structurally on every hit, since TVM's structural hash collides (``_key``).

``CachedFoldConstant`` does the same for GPU estimates' FoldConstant (its CPU builds).
``cpu_lowering`` is the estimator's CPU lowering: TVM's dispatch passes, each skipped when the
module has none of the ops it rewrites, then ``CachedLegalizeOps``.

Used by ``lowering.estimate_passes`` only; builds use TVM's own ``LegalizeOps`` and
``FoldConstant``.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from . import _compat as C
from . import caches

_CALL_TIR = C.Op.get("relax.call_tir")
_MAX_ENTRIES = 4096
# The tables live in the build's ``caches``: ``legalize`` maps a key to (PrimFunc, its own
# GlobalVar (None until the first hit), per call_tir argument the index of the op's argument,
# TVM's call_tir, the op call it was lowered from); ``target`` is the target in scope for the
# running pass (some lowerings depend on it); ``stats`` counts hits and misses.


def _key(call) -> tuple | None:
    """(target, op, attrs hash, argument signatures, type-args hash); None: uncacheable.

    Shapes, dtypes and small constants' values are spelled out exactly: TVM's structural hash
    is not collision-free on its own (R.Tensor((1, 20, 200)) and R.Tensor((1, 3, 18)) hash
    alike; found by fuzzing), so hashed parts (attrs, type args) are also compared
    structurally on every hit (``_same_call``).
    """
    h = tvm_ffi.structural_hash
    attrs = h(call.attrs) if call.attrs is not None else 0
    parts: list = [caches.current().target, str(call.op.name), attrs]
    args = list(call.args)
    for k, a in enumerate(args):
        if isinstance(a, (relax.Var, C.GenericConst)):
            shape = C.static_shape(a.ty) if isinstance(a.ty, C.TensorType) else None
            if shape is None:
                return None  # symbolic, or tuples, shapes, objects: may hold variables
            dtype = C.tensor_dtype(a.ty)
            if isinstance(a, C.GenericConst) and _small(a):
                # TVM inlines small constants (a scalar scale) into the PrimFunc: key by value
                parts.append(("c", shape, dtype, a.value.numpy().tobytes()))
                continue
            # which earlier argument is the same tensor: TVM lowers f(x, x) to a PrimFunc
            # with one input, f(x, y) to one with two
            same = next(i for i in range(k + 1) if args[i].same_as(a))
            parts.append(("t", shape, dtype, same))
        elif isinstance(a, relax.ShapeExpr):
            if not all(isinstance(v, tvm.tirx.IntImm) for v in a.values):
                return None  # symbolic
            parts.append(("s", tuple(int(v) for v in a.values)))
        elif isinstance(a, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
            parts.append(("p", str(a.ty), a.value))  # prim values are Relax exprs in 0.27
        elif isinstance(a, tvm.ir.StringImm):
            parts.append(("str", str(a.value)))
        else:
            return None
    parts.append(tuple(h(t) for t in call.ty_args))
    return tuple(parts)


def _same_call(call, first) -> bool:
    """The hashed parts of two calls with one key are really equal (attrs, type args)."""
    eq = tvm_ffi.structural_equal
    if (call.attrs is None) != (first.attrs is None):
        return False
    if call.attrs is not None and not eq(call.attrs, first.attrs):
        return False
    return len(call.ty_args) == len(first.ty_args) and all(
        eq(a, b) for a, b in zip(call.ty_args, first.ty_args)
    )


def _record(bb, call, res) -> tuple | None:
    """(PrimFunc, name, argument map) when ``res`` is one call_tir over ``call``'s arguments."""
    if not isinstance(res, C.Call) or not res.op.same_as(_CALL_TIR) or len(res.args) != 2:
        return None
    gv, args = res.args
    if not isinstance(gv, tvm.ir.GlobalVar) or not isinstance(args, relax.Tuple):
        return None
    if any(C.static_shape(t) is None for t in _leaves(res.ty_args)):
        return None
    idx = []
    for a in args.fields:
        i = next((k for k, b in enumerate(call.args) if b.same_as(a)), None)
        if i is None:
            return None  # an argument the legalization made: not ours to replay
        idx.append(i)
    for k, b in enumerate(call.args):
        if isinstance(b, C.GenericConst) and not _small(b) and k not in idx:
            return None  # a constant keyed by type only was inlined, not passed: not reusable
    func = bb.get()[gv]
    if not isinstance(func, C.PrimFunc):
        return None
    return func, None, tuple(idx), res, call


def _small(const) -> bool:
    shape = C.static_shape(const.ty)
    return shape is not None and C.prod(shape) <= 64


def _leaves(tys) -> list:
    out = []
    for t in tys:
        if isinstance(t, C.TupleType):
            out.extend(_leaves(t.fields))
        else:
            out.append(t)
    return out


# names of memoised PrimFuncs' GlobalVars: TVM's own names never end so
SUFFIX = "_acmemo"


def _call_key(call):
    # keyed once per Call object and target: the search's chunked modules share most calls
    c = caches.current()
    return C.identity_memo(c.legalize_keys, c.target, call, lambda: _key(call), 4 * _MAX_ENTRIES)


def _own_global_var(func, name: str) -> tvm.ir.GlobalVar:
    """A GlobalVar of its own for a memoised PrimFunc (typed as ``bb.add_func`` types it),
    named ``<name>_acmemo<k>``: unique in any module, whatever TVM names its new PrimFuncs."""
    return relax.BlockBuilder().add_func(func, f"{name}{SUFFIX}{next(caches.current().serial)}")


def _legalize_ops(mod, lmap) -> tvm.IRModule:
    """LegalizeOps with the memoised lowerings; each memoised PrimFunc it calls is added to
    the result afterwards under its own GlobalVar (added through the pass's BlockBuilder,
    every hit would cost a structural hash of the PrimFunc: the builder deduplicates)."""
    # the memoised PrimFuncs the running pass called, {GlobalVar: PrimFunc}
    pending = caches.current().legalize_pending
    pending.clear()
    try:
        out = relax.transform.LegalizeOps(lmap)(mod)
        if pending:
            out.update(dict(pending))  # the pass's own result: no one else holds it
        return out
    finally:
        pending.clear()  # do not hold the functions


def _wrapper(op_name: str, default):
    def legalize(bb, call):
        c = caches.current()
        # {op Call handle: (the Call, target, its call_tir, GlobalVar, PrimFunc)}: an unchanged
        # binding's call gets the very call_tir it got before (the walk then meets the same
        # Call objects too: ir_index.call_info)
        lowered, memo, stats = c.lowered, c.legalize, c.stats
        done = lowered.get(call.__chandle__())
        if done is not None and done[1] == c.target:
            stats["hits"] += 1
            c.legalize_pending[done[3]] = done[4]
            return done[2]
        key = _call_key(call)
        hit = memo.get(key) if key is not None else None
        if hit is not None and not hit[4].same_as(call) and not _same_call(call, hit[4]):
            hit = None  # a hash collision in attrs or type args: lower it, keep the first
            key = None
        if hit is not None:
            func, gv, idx, res, _ = hit
            stats["hits"] += 1
            if gv is None:  # the first hit: most entries (a chunk size tried once) have none
                gv = _own_global_var(func, res.args[0].name_hint)
                memo[key] = (func, gv, *hit[2:])
            c.legalize_pending[gv] = func
            args = relax.Tuple([call.args[i] for i in idx])
            out = relax.Call(res.op, [gv, args], res.attrs, res.ty_args)
            if len(lowered) >= 4 * _MAX_ENTRIES:
                lowered.clear()
            lowered[call.__chandle__()] = (call, c.target, out, gv, func)
            return out
        res = default(bb, call)
        if key is None:
            stats["uncached"] += 1
            return res
        stats["misses"] += 1
        rec = _record(bb, call, res)
        if rec is not None:
            if len(memo) >= _MAX_ENTRIES:
                memo.clear()
            memo[key] = rec
        return res

    return legalize


def _ops_in(mod) -> set[str]:
    names: set[str] = set()
    for _, f in mod.functions_items():
        if isinstance(f, relax.Function) and isinstance(f.body, relax.SeqExpr):
            for block in f.body.blocks:
                for b in block.bindings:
                    n = C.op_name(b.value)
                    if n:
                        names.add(n)
    return names


def legalize_map(mod, ops: set[str] | None = None) -> dict:
    """{op name: memoising legalization} for the ops of ``mod`` (or ``ops``, its op names) that
    TVM can legalize."""
    out = {}
    wrappers = caches.current().legalize_wrappers
    for name in sorted(_ops_in(mod) if ops is None else ops):
        w = wrappers.get(name)
        if w is None:
            default = C.Op.get(name).get_attr("FLegalize")
            if default is None:
                continue
            w = wrappers[name] = _wrapper(name, default)
        out[name] = w
    return out


def _enter_target() -> None:
    tgt = tvm.target.Target.current()
    caches.current().target = "" if tgt is None else str(tgt)


@tvm.transform.module_pass(opt_level=0, name="CachedLegalizeOps")
@caches.scoped
def CachedLegalizeOps(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``relax.transform.LegalizeOps()`` with each op's legalization memoised."""
    _enter_target()
    return _legalize_ops(mod, legalize_map(mod))


# the ops TVM 0.27's dispatch passes rewrite (relax/backend/dispatch_*.py: each visits every
# call in Python and matches ``call.op.name`` against these; tests/test_legalize_cache.py
# checks the lists against TVM's source)
DISPATCHED_OPS = {
    "DispatchSampling": frozenset({"relax.multinomial_from_uniform"}),
    "DispatchSortScan": frozenset(
        {"relax.bucketize", "relax.sort", "relax.argsort", "relax.topk", "relax.cumprod",
         "relax.cumsum"}
    ),
}


def _static(ty) -> bool:
    return isinstance(ty, C.TensorType) and C.static_shape(ty) is not None


# Ops whose TVM legalization is one kernel over the call's own tensors that writes one fresh
# output of the op's type and allocates nothing inside (no workspace), and is never a reshape
# pattern (its body computes; it is not a load): elementwise arithmetic and matmul (one
# ``te.compute``, a reduction for matmul; relax/transform/legalize_ops: binary.py, unary.py,
# nn.py, linear_algebra.py). Left unlowered, the walk makes them such a kernel call
# (liveness.FrameWalker). tests/test_legalize_cache.py checks each on random shapes.
COMPUTE_OPS = frozenset(
    {
        "relax.add", "relax.subtract", "relax.multiply", "relax.divide",
        "relax.maximum", "relax.minimum",
        "relax.exp", "relax.log", "relax.sqrt", "relax.rsqrt", "relax.tanh",
        "relax.sigmoid", "relax.negative", "relax.abs", "relax.nn.relu",
        "relax.matmul",
    }
)


# Layout ops: TVM lowers each (static) to one copy kernel without workspace, whose PrimFunc has
# a reshape pattern exactly when ``layout_is_reshape`` says so (RewriteDataflowReshape then
# makes it a view). tests/test_legalize_cache.py checks that on random shapes and axes.
LAYOUT_OPS = frozenset({"relax.permute_dims", "relax.broadcast_to", "relax.expand_dims"})


def kernel_name(op) -> str:
    """The name TVM gives the kernel it lowers a kept op to (the walk labels the op so)."""
    name = str(op.name)
    return "transpose" if name == "relax.permute_dims" else name.removeprefix("relax.")


def layout_is_reshape(call) -> bool:
    """Whether TVM's lowering of a ``LAYOUT_OPS`` call on a static tensor has a reshape
    pattern: ``expand_dims`` always; ``permute_dims`` when it keeps the order of the dims
    longer than 1 (it moves unit dims only); ``broadcast_to`` when it adds no element (it adds
    or keeps unit dims only)."""
    op = str(call.op.name)
    if op == "relax.expand_dims":
        return True
    shape = C.static_shape(call.args[0].ty)
    if op == "relax.permute_dims":
        axes = call.attrs.axes
        order = [int(a) for a in axes] if axes is not None else list(range(len(shape)))[::-1]
        moved = [a for a in order if shape[a] != 1]
        return moved == sorted(moved)
    return C.prod(shape) == C.prod(C.static_shape(call.ty))  # relax.broadcast_to


def _scalar_identity(a) -> bool:
    """A scalar constant 0 or 1: TVM's legalization passes a scalar as a value, and its
    constant folding makes ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` a plain copy of x (a
    reshape pattern, which RewriteDataflowReshape turns into a view)."""
    if not isinstance(a, C.GenericConst) or not isinstance(a.ty, C.TensorType) or a.ty.ndim != 0:
        return False
    try:
        return a.value.numpy()[()].item() in (0, 1)
    except Exception:  # a dtype numpy cannot read: lowered as usual (TVM decides)
        return True


def _keep_for_the_walk(op_name: str, legalize):
    """The estimator's lowering of ``op_name``: calls the walk models as TVM lowers them are
    left as they are (``cpu_lowering``); others go to ``legalize``. A static ``reshape``; a
    ``strided_slice`` with a static result whose bounds hold variables (a chunk function's
    slice at its offset: TVM lowers it to one copy kernel, whose PrimFunc takes the offset, so
    it is never memoised); a ``LAYOUT_OPS`` call on a static tensor; a ``COMPUTE_OPS`` call on
    static tensors (none a scalar 0 or 1)."""

    def keep(bb, call):
        a = call.args[0]
        if op_name == "relax.reshape":
            shape = call.args[1]
            kept = (
                _static(a.ty)
                and isinstance(shape, relax.ShapeExpr)
                and all(isinstance(v, tvm.tirx.IntImm) for v in shape.values)
            )
        elif op_name == "relax.strided_slice":  # bounds with variables (a static slice of
            # the whole tensor is a copy TVM makes a view of; it is lowered as usual)
            bounds = [f for t in call.args[2:4] if isinstance(t, relax.Tuple) for f in t.fields]
            kept = (
                _static(a.ty)
                and _static(call.ty)
                and any(not isinstance(f, tvm.tirx.IntImm) for f in bounds)
            )
        elif op_name in LAYOUT_OPS:
            kept = _static(a.ty) and _static(call.ty)
        else:  # COMPUTE_OPS
            kept = _static(call.ty) and all(
                isinstance(x, (relax.Var, C.GenericConst))
                and _static(x.ty)
                and not _scalar_identity(x)
                for x in call.args
            )
        if kept:
            stats = caches.current().stats
            stats[f"kept {op_name}"] = stats.get(f"kept {op_name}", 0) + 1
            return call
        return legalize(bb, call)

    return keep


KEPT_OPS = (  # _keep_for_the_walk
    "relax.reshape", "relax.strided_slice", *sorted(LAYOUT_OPS), *sorted(COMPUTE_OPS)
)


def cpu_lowering(passes: list, *, keep_ops: bool = False) -> tvm.transform.Pass:
    """TVM's CPU lowering ``passes`` (DispatchSampling, DispatchSortScan, LegalizeOps) for the
    estimator: LegalizeOps memoised (``CachedLegalizeOps``), and a dispatch pass skipped when
    the module has none of the ops it rewrites (it would return the module unchanged: on a
    the search's estimates would pay Python visiting for nothing). Unknown passes run.

    ``keep_ops``: the calls ``_keep_for_the_walk`` keeps are left unlowered, and the
    estimator's walk models them as TVM lowers them (``liveness.FrameWalker`` with
    ``dataflow_reshape=True``): static reshapes, chunk functions' slices at their offsets,
    layout ops and elementwise ops and matmuls on static tensors. Each becomes one kernel
    without workspace; a static reshape, and a layout op whose kernel has a reshape pattern
    (``layout_is_reshape``), is turned back into a view by ``RewriteDataflowReshape`` inside
    dataflow blocks (elsewhere it stays a copy). A chunk function at a new size is all new
    shapes, and lowering them was most of an estimate. tests/test_legalize_cache.py checks
    what this relies on against TVM (each op's lowering on random shapes) and that the
    estimates equal those of TVM's lowering on the families, chunked modules and random
    graphs."""

    @tvm.transform.module_pass(opt_level=0, name="CachedCPULowering")
    @caches.scoped
    def lowering(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        ops = None  # the op names of mod, when known
        for p in passes:
            name = p.info.name
            ops = _ops_in(mod) if ops is None else ops
            if name in DISPATCHED_OPS and not ops & DISPATCHED_OPS[name]:
                continue
            if name == "LegalizeOps":
                _enter_target()
                lmap = legalize_map(mod, ops)
                for op in KEPT_OPS if keep_ops else ():
                    if op in lmap:
                        lmap[op] = _keep_for_the_walk(op, lmap[op])
                mod = _legalize_ops(mod, lmap)
            else:
                mod = p(mod)
            ops = None
        return mod

    return lowering


# ------------------------------------------------------------------ constant folding (GPU)

_MAX_BUILDS = 256


def _cached_build(orig):
    """``tirx.build`` memoised by the PrimFunc's structure (checked on a hit) and target."""

    def build(func, target):
        built = []

        def compute():
            built.append(True)
            return orig(func, target)

        c = caches.current()
        out = C.structural_memo(c.builds, str(target), func, compute, _MAX_BUILDS)
        if not built:
            stats = c.stats
            stats["fold_build_hits"] = stats.get("fold_build_hits", 0) + 1
        return out

    return build


@tvm.transform.module_pass(opt_level=0, name="CachedFoldConstant")
@caches.scoped
def CachedFoldConstant(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``relax.transform.FoldConstant()`` with the CPU builds of the PrimFuncs it evaluates
    memoised (each estimate of a GPU module folded the same weight transposes again, compiling
    them with LLVM each time: 80% of the estimate). The pass itself is TVM's: while it runs, the
    global ``tirx.build`` that it calls is replaced by a memoising wrapper, then restored."""
    orig = tvm_ffi.get_global_func("tirx.build")
    tvm_ffi.register_global_func("tirx.build", _cached_build(orig), override=True)
    try:
        return relax.transform.FoldConstant()(mod)
    finally:
        tvm_ffi.register_global_func("tirx.build", orig, override=True)
