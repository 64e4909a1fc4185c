"""An index of one Relax function's bindings, shared by the analyses (read-only).

Reading IR through the FFI is slow (each access makes new wrappers), and the search analyses
hundreds of regions of one function: ``func_index`` reads a function's bindings, names, reads
and per-binding facts once, and keeps one Python object per variable so that sets and dicts
hit by identity. ``call_info`` does the same for one call's arguments. Both are memoised in
the build's ``caches``.
"""

from __future__ import annotations

import tvm
from tvm import relax

from . import _compat as C
from . import caches
from .dimflow import arg_leaves


def bindings_by_name(func: relax.Function) -> dict:
    """{binding var name: binding} over every top-level block of ``func``."""
    return dict(func_index(func).by_name)


class BindingFacts:
    """What analyze_region reads of one binding, read once through the FFI per function."""

    __slots__ = (
        "_flow",
        "arg_is_var",
        "arg_kind",
        "arg_shapes",
        "args",
        "is_op",
        "is_tensor",
        "kind",
        "name",
        "op",
        "out_shapes",
    )

    def __init__(self, b, canon: dict) -> None:
        value = b.value
        self.name = str(b.var.name)
        self.is_tensor = isinstance(b.var.ty, C.TensorType)
        self.op = C.op_name(value)
        call = isinstance(value, C.Call)
        # "match_cast", "alias" (a var, tuple or projection), "call", or "other"
        if isinstance(b, relax.MatchCast):
            self.kind = "match_cast"
        elif isinstance(value, (relax.Var, relax.TupleGetItem, relax.Tuple)):
            self.kind = "alias"
        else:
            self.kind = "call" if call else "other"
        self.is_op = call and isinstance(value.op, C.Op)
        # the argument leaves (``dimflow.arg_leaves``: concat's tuple opened), which the rules'
        # ``Src.arg`` and ``ArgSlice.arg`` index
        self.args = tuple(_canonical(a, canon) for a in arg_leaves(value.args)) if call else ()
        self.arg_is_var = tuple(isinstance(a, relax.Var) for a in self.args)
        # per argument: 1 a variable, 2 a tuple or projection (its spec is composed), 0 other
        # (a constant, shape or value: never chunked)
        self.arg_kind = tuple(
            1 if v else 2 if isinstance(a, (relax.Tuple, relax.TupleGetItem)) else 0
            for a, v in zip(self.args, self.arg_is_var)
        )
        self.arg_shapes = [C.static_shape(a.ty) if hasattr(a, "ty") else None for a in self.args]
        leaves = C.tensor_type_leaves(b.var.ty) if call else []
        self.out_shapes = [C.static_shape(t) for t in leaves]
        self._flow = None  # (rule, its flow for this binding)

    def flow(self, rule, value):
        """``rule(value, arg_shapes, out_shapes)``, memoised per rule (rules can be replaced)."""
        if self._flow is None or self._flow[0] is not rule:
            self._flow = (rule, rule(value, self.arg_shapes, self.out_shapes))
        return self._flow[1]


class _LazyFacts(dict):
    """{binding var: its ``BindingFacts``}, each made on first access (``facts[var]``; a var that is
    no binding's raises KeyError)."""

    def __init__(self, bindings: dict, canon: dict) -> None:
        super().__init__()
        self._bindings = bindings
        self._canon = canon

    def __missing__(self, v):
        f = self[v] = BindingFacts(self._bindings[v], self._canon)
        return f


def _reads_of(value, canon: dict) -> tuple:
    """The variables ``value`` reads, as canonical objects. A call's come from the estimator's
    per-Call record (``liveness.call_info``: the search estimated the module before analysing
    it, so a chunked module's hundreds of chunk calls are read through the FFI once, not
    again here); else from ``free_vars``."""
    if isinstance(value, C.Call):
        _, handles = call_info(value)
        if handles is not None and all(h in canon for h in handles):
            return tuple(canon[h] for h in dict.fromkeys(handles))
    return tuple(_canonical(x, canon) for x in relax.analysis.free_vars(value))


def _canonical(v, canon: dict):
    """The one Python object kept for a variable (see ``FuncIndex``)."""
    if isinstance(v, relax.Var):
        return canon.get(v.__chandle__(), v)
    return v


class FuncIndex:
    """One function's bindings, names, reads and per-binding facts, read through the FFI once.

    Every variable is one Python object here (each FFI access makes a new wrapper, and
    comparing two wrappers of one variable goes through ``Var.__eq__``, which is slow): sets
    and dicts keyed by these variables then hit by identity.
    """

    def __init__(self, func: relax.Function) -> None:
        self.blocks = [list(block.bindings) for block in func.body.blocks]
        canon = {p.__chandle__(): p for p in func.params}
        self.vars = [[b.var for b in bs] for bs in self.blocks]
        for vs in self.vars:
            for v in vs:
                canon[v.__chandle__()] = v
        self.names = [[str(v.name) for v in vs] for vs in self.vars]
        self.position = [{n: i for i, n in enumerate(ns)} for ns in self.names]
        self.by_name = {n: b for ns, bs in zip(self.names, self.blocks) for n, b in zip(ns, bs)}
        self.var_by_name = {n: v for ns, vs in zip(self.names, self.vars) for n, v in zip(ns, vs)}
        self.reads = [
            [
                (v, _reads_of(b.value, canon))
                for v, b in zip(vs, bs)
            ]
            for vs, bs in zip(self.vars, self.blocks)
        ]
        self.ret = tuple(_canonical(x, canon) for x in relax.analysis.free_vars(func.body.body))
        # {var: its BindingFacts}, made when first asked for: the walks read the bindings they
        # cover, not the hundreds of chunk calls of an earlier stage
        self.facts = _LazyFacts(
            {v: b for vs, bs in zip(self.vars, self.blocks) for v, b in zip(vs, bs)}, canon
        )
        # per block, each binding's op name (its value's type name when it is no op call):
        # repeated layers are found by matching these sequences
        self.op_keys = [
            [C.op_name(b.value) or type(b.value).__name__ for b in bs] for bs in self.blocks
        ]
        self.canon = canon
        self.walks: dict = {}  # (block, start, seed var, dim) -> _Walk (analyze_region)
        self._last_read: dict | None = None  # var -> (block, position) of its last reader
        self._read_dicts: dict = {}  # block -> {binding var: the vars it reads}

    def last_read(self) -> dict:
        """{var: (block, position) of the last binding that reads it}; a var the return
        value reads: (number of blocks, 0), after every binding."""
        if self._last_read is None:
            last: dict = {}
            for bi, block in enumerate(self.reads):
                for pos, (_, reads) in enumerate(block):
                    for v in reads:
                        last[v] = (bi, pos)  # blocks and positions only grow
            for v in self.ret:
                last[v] = (len(self.reads), 0)
            self._last_read = last
        return self._last_read

    def read_dict(self, bi: int) -> dict:
        """{binding var: the vars its value reads} for block ``bi``."""
        d = self._read_dicts.get(bi)
        if d is None:
            d = self._read_dicts[bi] = dict(self.reads[bi])
        return d

    def var(self, v):
        """The canonical object of variable ``v`` (``binding.var`` is a fresh wrapper)."""
        return _canonical(v, self.canon)


def func_index(func: relax.Function) -> FuncIndex:
    """The function's ``FuncIndex``, cached for the last few functions (the search analyses
    hundreds of regions of one function; the cache holds the function, so its identity
    cannot be reused meanwhile)."""
    cache = caches.current().index
    hit = cache.get(func)
    if hit is None:
        hit = FuncIndex(func)
        if len(cache) >= 8:
            cache.pop(next(iter(cache)))
        cache[func] = hit
    return hit


def reads_by_block(func: relax.Function):
    """Per block, [(binding var, vars its value reads)], and the vars the return value reads."""
    ix = func_index(func)
    return ix.reads, ix.ret


def block_layout(func: relax.Function, name: str) -> tuple[list[str], list[str]] | None:
    """(binding names, op keys) of the block of ``func`` holding binding ``name`` (cached)."""
    ix = func_index(func)
    for bi, pos in enumerate(ix.position):
        if name in pos:
            return ix.names[bi], ix.op_keys[bi]
    return None


def named_vars(func: relax.Function) -> dict:
    """{name: binding var} over every block of ``func`` (the last binding of a name wins)."""
    return func_index(func).var_by_name


def used_after(func: relax.Function, block_index: int, region_vars: set, end: int) -> set:
    """Region vars used after the region (later bindings, later blocks, the return value).
    ``end``: the position of the region's last binding in its block. (A region var is read
    only after its binding, so it is used after the region iff its last reader comes after
    ``end``: the index's last-reader map, not a scan of the rest of the function.)"""
    last = func_index(func).last_read()
    after = (block_index, end)
    used = {v for v in region_vars if last.get(v, after) > after}
    if isinstance(func.body.body, relax.Var) and func.body.body in region_vars:
        used.add(func.body.body)
    return used


# argument kinds that hold no Relax variable (prim values are TIR immediates in TVM 0.27)
_NO_VARS = (
    C.GenericConst,
    relax.ShapeExpr,
    tvm.tirx.IntImm,
    tvm.tirx.FloatImm,
    tvm.ir.StringImm,
    C.GlobalVar,
    C.Op,
    relax.ExternFunc,
)


def call_info(call) -> tuple[tuple, list | None]:
    """(the call's arguments, the handles of the variables it reads, or None when it holds
    anything but variables, tuples and constants: ``free_vars`` is asked then).

    Memoised per Call object: the search's estimates walk the same unchanged calls again and
    again. The entry holds the Call (its handle is not reused meanwhile); calls with a
    constant argument are not kept, so no weight is kept alive."""
    h = call.__chandle__()
    cache = caches.current().call_info
    hit = cache.get(h)
    if hit is None:
        args = tuple(call.args)
        vs = call_vars(call, args)
        hit = (call, args, None if vs is None else [v.__chandle__() for v in vs])
        leaves = [f for a in args for f in (a.fields if isinstance(a, relax.Tuple) else (a,))]
        if not any(isinstance(a, C.GenericConst) for a in leaves):
            if len(cache) >= 16384:
                cache.clear()
            cache[h] = hit
    return hit[1], hit[2]


def call_vars(expr, args=None) -> list | None:
    """The Relax variables a call in A-normal form reads (its op and arguments, tuples
    opened); None when it holds anything else (then ``free_vars`` is asked)."""
    if not isinstance(expr, C.Call):
        return None
    out: list = []
    todo = [expr.op, *(expr.args if args is None else args)]
    while todo:
        a = todo.pop()
        if isinstance(a, relax.Var):
            out.append(a)
        elif isinstance(a, relax.Tuple):
            todo.extend(a.fields)
        elif not isinstance(a, _NO_VARS):
            return None
    return out


def tensor_leaves(expr) -> list:
    """Vars and constants inside ``expr`` that may hold tensor storage (tuples flattened)."""
    if isinstance(expr, relax.Tuple):
        return [x for f in expr.fields for x in tensor_leaves(f)]
    if isinstance(expr, relax.TupleGetItem):
        return tensor_leaves(expr.tuple_value)
    if isinstance(expr, (relax.Var, C.GenericConst)):
        return [expr]
    return []


