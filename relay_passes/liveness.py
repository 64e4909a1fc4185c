"""Liveness and static-plan simulation of one Relax function frame (analysis only).

Input: a Relax function at call_tir level (after legalization; see ``pipeline.estimate_passes``).
The walk mirrors how TVM will execute the frame:

* every tensor output of ``call_tir`` / ``call_dps_packed`` is one allocation (a *prototype*);
  ``reshape``/``memory.view`` and tuple projections alias, never allocate; so does a
  ``call_tir`` that TVM's ``RewriteDataflowReshape`` would turn into a reshape, when the walk
  is asked to make that pass's rewrites (``dataflow_reshape``: the CPU estimator skips the pass);
  ``call_tir_inplace`` writes into its argument;
* a prototype is *planned* by ``StaticPlanBlockMemory`` unless it escapes: returned, passed to a
  Relax function or any other non-PrimFunc call, used in another binding block or by an ``If``.
  Planned prototypes are packed into storages with TVM's own 1-D token allocator (pool keyed
  by (scope, dtype), best fit in [size/16, 16*size], smaller blocks grown), so the storage
  total is what the planner will emit; escaping ones are run-time allocations;
* the logical liveness timeline (a tensor is live from its binding to its last use) gives the
  peak site and what is live there.

Nothing here mutates IR; results are plain data (``plan.py``).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

import tvm
from tvm import relax

from . import _compat as C
from . import legalize_cache as LC
from .errors import SymbolicShapeError
from .plan import FrameMemory, TensorRecord, TimelineEntry

# legalize_cache._SUFFIX and its serial number (names of memoised PrimFuncs; fused functions
# on GPUs carry them inside their names)
_MEMO_NAME = re.compile(r"_acmemo\d+")

_CALL_TIR = C.Op.get("relax.call_tir")
_CALL_TIR_INPLACE = C.Op.get("relax.call_tir_inplace")
_CALL_DPS_PACKED = C.Op.get("relax.call_dps_packed")
# the ops the CPU estimator's lowering may leave for the walk (legalize_cache.KEPT_OPS), by
# handle (one dict lookup per call): what TVM would lower them to
_KEPT = {
    C.Op.get(n).__chandle__(): kind
    for kind, names in (
        ("reshape", ["relax.reshape"]),
        ("slice", ["relax.strided_slice"]),
        ("layout", LC.LAYOUT_OPS),
        ("compute", LC.COMPUTE_OPS),
    )
    for n in names
}
_CALL_PURE_PACKED = C.Op.get("relax.call_pure_packed")
_DPS_OPS = (_CALL_TIR, _CALL_DPS_PACKED)
_VIEW_OPS = tuple(
    C.Op.get(n) for n in ("relax.reshape", "relax.memory.view", "relax.memory.ensure_zero_offset")
)
_MATCH_RANGE = 16  # TokenAllocator1D::match_range_


@dataclass(eq=False)
class Proto:
    """One tensor allocation (a builtin.alloc_tensor after CallTIRRewrite)."""

    uid: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    op: str
    block: int
    born: int
    refs: int = 0
    planned: bool = True
    runtime: bool = False  # allocated by a packed function / callee, never plannable
    output: bool = False
    from_callee: bool = False  # returned by a Relax callee: counted in the callee's frame
    last_use: int = -1


@dataclass(eq=False)
class _Storage:
    sid: int
    nbytes: int
    dtype: str
    scope: str = "global"


class _TokenAllocator1D:
    """TVM's TokenAllocator1D (static_plan_block_memory.cc), same choices, same tie-breaks."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, str], list[tuple[int, int, _Storage]]] = {}
        self.storages: list[_Storage] = []
        self._seq = 0

    def request(self, p: Proto) -> _Storage:
        pool = self.pools.setdefault(("global", p.dtype), [])
        size = p.nbytes
        keys = [k for k, _, _ in pool]
        begin = bisect.bisect_left(keys, size // _MATCH_RANGE)
        mid = bisect.bisect_left(keys, size)
        end = bisect.bisect_right(keys, size * _MATCH_RANGE)
        if mid != end:  # smallest block >= size (earliest inserted among equals)
            return pool.pop(mid)[2]
        if mid != begin:  # largest block < size (latest inserted among equals), grown
            st = pool.pop(mid - 1)[2]
            st.nbytes = size
            return st
        st = _Storage(len(self.storages), size, p.dtype)
        self.storages.append(st)
        return st

    def release(self, st: _Storage) -> None:
        pool = self.pools.setdefault((st.scope, st.dtype), [])
        self._seq += 1
        # multimap::insert puts equal keys after the existing ones
        bisect.insort(pool, (st.nbytes, self._seq, st), key=lambda t: (t[0], t[1]))


@dataclass
class _Event:
    index: int
    name: str
    op: str
    allocs: list[Proto] = field(default_factory=list)
    uses: list[Proto] = field(default_factory=list)  # PrimFunc/extern call args (refcounted)
    workspace: int = 0  # bytes of kernel workspace this binding's PrimFunc requests
    ws_allocs: tuple[int, ...] = ()  # the individual requests, in program order
    callee: str | None = None


@dataclass(frozen=True)
class FrameAnalysis:
    """Everything the frame walk found (plain data, consumed by estimate_memory)."""

    memory: FrameMemory
    protos: tuple[Proto, ...]
    events: tuple[_Event, ...]
    callees: tuple[str, ...]
    workspace_by_index: dict  # binding index -> workspace requests (bytes) of its kernel
    num_bindings: int
    blocks: tuple[tuple[int, int, int], ...] = ()  # run-time allocations: (bytes, first, last)


def _nested(tokens):
    """Flatten a nested token structure (Proto | None | tuple) into a list of Protos."""
    if tokens is None:
        return []
    if isinstance(tokens, Proto):
        return [tokens]
    out = []
    for t in tokens:
        out.extend(_nested(t))
    return out


class FrameWalker:
    """Walk one Relax function at call_tir level; see the module docstring."""

    def __init__(
        self,
        mod,
        func,
        fname: str,
        bounds: dict[str, int],
        op_names: dict[str, str] | None = None,
        workspace_of=None,
        dataflow_reshape: bool = False,
    ) -> None:
        self.mod = mod
        # the module has not been through RewriteDataflowReshape: its rewrites are made here
        # (``_dataflow_reshape_arg``)
        self.dataflow_reshape = dataflow_reshape
        self._in_dataflow = False
        self.func = func
        self.fname = fname
        self.bounds = bounds
        self.op_names = op_names or {}
        self.workspace_of = workspace_of or (lambda gv, bounds: ())
        # relax.Var (by handle: hashing a Var wrapper is cheap, comparing two is not) -> tokens
        self.tokens: dict = {}
        self.protos: list[Proto] = []
        self.events: list[_Event] = []
        self.callees: list[str] = []
        self.var_uses: dict = {}
        self._block = -1
        self._index = 0
        # GlobalVar handle -> (name, a Relax function of the module?, returned_params): read
        # once per callee (a chunked module calls one function hundreds of times)
        self._callee_info: dict = {}

    # ---------------------------------------------------------------- shapes
    def _shape_bytes(self, ty, where: str) -> tuple[tuple[int, ...], str, int]:
        shape = C.tensor_shape(ty)
        dtype = C.tensor_dtype(ty)
        if shape is None:
            raise SymbolicShapeError(
                f"tensor '{where}' in function '{self.fname}' has an unknown shape, so its "
                "memory cannot be bounded. Remedy: give the model static shapes or bounded "
                "symbolic dims (torch.export.Dim(..., max=N))."
            )
        dims = []
        for d in shape:
            ub = C.eval_upper(d, self.bounds)
            if ub is None:
                names = ", ".join(str(v.name) for v in C.free_tir_vars([d])) or str(d)
                raise SymbolicShapeError(
                    f"dimension '{names}' of tensor '{where}' in function '{self.fname}' has no "
                    "upper bound, so peak memory cannot be bounded. Remedy: bound it, e.g. "
                    f"torch.export.Dim('{names}', max=N) when exporting, or "
                    f"tvm_autochunk.bound_dims(mod, {{'{names}': N}}) (sets the function's "
                    "'tir_var_upper_bound' attribute)."
                )
            dims.append(int(ub))
        return tuple(dims), dtype, C.prod(dims) * C.dtype_bytes(dtype)

    def _new_proto(self, ty, name: str, op: str, **kw) -> Proto:
        shape, dtype, nbytes = self._shape_bytes(ty, name)
        p = Proto(len(self.protos), name, shape, dtype, nbytes, op, self._block, self._index, **kw)
        self.protos.append(p)
        return p

    def _protos_for_type(self, ty, name: str, op: str, **kw):
        if isinstance(ty, C.TensorType):
            return self._new_proto(ty, name, op, **kw)
        if isinstance(ty, C.TupleType):
            return tuple(
                self._protos_for_type(f, f"{name}[{i}]", op, **kw) for i, f in enumerate(ty.fields)
            )
        return None

    # ---------------------------------------------------------------- tokens
    def _tokens_of(self, expr):
        if isinstance(expr, relax.Var):
            return self.tokens.get(expr.__chandle__())
        if isinstance(expr, relax.Tuple):
            return tuple(self._tokens_of(f) for f in expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            t = self._tokens_of(expr.tuple_value)
            return t[expr.index] if isinstance(t, tuple) else None
        return None

    def _discard(self, tokens) -> None:
        for p in _nested(tokens):
            p.planned = False

    def _use_in_primfunc(self, expr, ev: _Event) -> None:
        for p in _nested(self._tokens_of(expr)):
            if p.block != self._block:
                p.planned = False
            p.refs += 1
            ev.uses.append(p)

    def _set_workspace(self, ev: _Event, gv) -> None:
        if isinstance(gv, C.GlobalVar):
            ev.ws_allocs = tuple(self.workspace_of(gv, self.bounds))
            ev.workspace = sum(ev.ws_allocs)

    def _op_label(self, name: str, fallback: str) -> str:
        label = self.op_names.get(name)
        if label is not None:
            return label
        # a PrimFunc the estimator's memoised lowering named (legalize_cache): TVM's name
        return _MEMO_NAME.sub("", fallback) if "_acmemo" in fallback else fallback

    # ---------------------------------------------------------------- walk
    def run(self) -> FrameAnalysis:
        body = self.func.body
        self._visit_seq(body, top=True)
        n = self._index
        for p in _nested(self._tokens_of(body.body)):
            p.output = True
            p.planned = False
            p.last_use = n
        self._discard(self._tokens_of(body.body))
        return self._finish(n)

    def _visit_seq(self, seq, top: bool = False) -> None:
        outer = self._in_dataflow
        for block in seq.blocks:
            self._block += 1
            self._in_dataflow = isinstance(block, relax.DataflowBlock)
            for b in block.bindings:
                self._visit_binding(b)
        self._in_dataflow = outer
        if not top:
            self._record_uses(seq.body, self._index - 1)
            self._discard(self._tokens_of(seq.body))

    def _record_uses(self, expr, index: int, handles=None) -> None:
        """Uses at ``index`` of the variables ``expr`` reads (``handles``: their handles)."""
        if handles is None:
            vs = _call_vars(expr)
            if vs is None:
                vs = relax.analysis.free_vars(expr) if not isinstance(expr, relax.Var) else [expr]
            handles = [v.__chandle__() for v in vs]
        tokens = self.tokens
        for h in handles:
            for p in _nested(tokens.get(h)):
                p.last_use = max(p.last_use, index)

    def _visit_binding(self, b) -> None:
        var, value = b.var, b.value
        name = str(var.name)
        idx = self._index
        if isinstance(value, C.Call):
            args, handles = _call_info(value)
        else:
            args, handles = None, None
        self._record_uses(value, idx, handles)
        ev = _Event(idx, name, "")
        if isinstance(b, relax.MatchCast):
            self.tokens[var.__chandle__()] = self._tokens_of(value)
            ev.op = "match_cast"
        elif isinstance(value, C.Call):
            self._visit_call(var, value, ev, args, handles)
        elif isinstance(value, relax.If):
            ev.op = "if"
            self._discard(self._tokens_of(value.cond))
            self._index += 1
            self._visit_seq(value.true_branch)
            self._visit_seq(value.false_branch)
            idx = self._index
            ev.index = idx
            self.tokens[var.__chandle__()] = None
        elif isinstance(value, (relax.Var, relax.Tuple, relax.TupleGetItem)):
            self.tokens[var.__chandle__()] = self._tokens_of(value)
            ev.op = type(value).__name__.lower()
        else:
            self.tokens[var.__chandle__()] = None
            ev.op = type(value).__name__
        self.events.append(ev)
        self._index = max(self._index, idx) + 1

    def _visit_call(self, var, call, ev: _Event, args: tuple, handles=None) -> None:
        name = str(var.name)
        op = call.op
        if self.dataflow_reshape and isinstance(op, C.Op) and op.same_as(_CALL_TIR):
            src = self._dataflow_reshape_arg(var, call, args)
            if src is not None:  # RewriteDataflowReshape makes it relax.reshape: a view
                ev.op = self._op_label(name, "reshape")
                self.tokens[var.__chandle__()] = self._tokens_of(src)
                return
        kept = None
        if self.dataflow_reshape and isinstance(op, C.Op):
            kept = _KEPT.get(op.__chandle__())
        if kept is not None:
            # an op the estimator's lowering kept (legalize_cache.cpu_lowering), made here what
            # TVM lowers it to. Elementwise ops and matmul: one kernel over its tensors writing
            # a fresh output, without workspace. A static reshape, and a layout op whose kernel
            # has a reshape pattern (legalize_cache.layout_is_reshape): one tensor in, the same
            # dtype and element count out, which RewriteDataflowReshape makes a view of a
            # DataflowVar in a dataflow block (_dataflow_reshape_arg); elsewhere a copy. Other
            # layout ops, and a slice at a variable offset: one copy kernel without workspace
            ev.op = self._op_label(name, str(op.name).removeprefix("relax."))
            if kept == "compute":
                self._dps_call(var, name, ev, args)
                return
            view = kept == "reshape" or (kept == "layout" and LC.layout_is_reshape(call))
            if view and self._in_dataflow and isinstance(var, relax.DataflowVar):
                self.tokens[var.__chandle__()] = self._tokens_of(args[0])
                return
            self._dps_call(var, name, ev, args[:1])
            return
        if isinstance(op, C.Op) and (op.same_as(_CALL_TIR) or op.same_as(_CALL_DPS_PACKED)):
            gv = args[0]
            label = str(gv.name_hint) if isinstance(gv, C.GlobalVar) else str(gv)
            ev.op = self._op_label(name, label)
            self._dps_call(var, name, ev, _call_args(args))
            self._set_workspace(ev, gv)
            return
        if isinstance(op, C.Op) and op.same_as(_CALL_TIR_INPLACE):
            gv = args[0]
            ev.op = self._op_label(name, str(gv.name_hint))
            args = _call_args(args)
            for a in args:
                self._use_in_primfunc(a, ev)
            idxs = [int(i) for i in call.attrs.inplace_indices]
            tys = list(var.ty.fields) if isinstance(var.ty, C.TupleType) else [var.ty]
            outs = []
            for j, ty in enumerate(tys):
                if idxs[j] >= 0:
                    outs.append(self._tokens_of(args[idxs[j]]))
                else:
                    p = self._new_proto(ty, f"{name}[{j}]" if len(tys) > 1 else name, ev.op)
                    p.refs += 1
                    ev.allocs.append(p)
                    ev.uses.append(p)
                    outs.append(p)
            tok = tuple(outs) if isinstance(var.ty, C.TupleType) else outs[0]
            self.tokens[var.__chandle__()] = tok
            self._set_workspace(ev, gv)
            return
        if isinstance(op, C.Op) and any(op.same_as(v) for v in _VIEW_OPS):
            ev.op = self._op_label(name, str(op.name).removeprefix("relax."))
            self.tokens[var.__chandle__()] = self._tokens_of(args[0])
            return
        if (isinstance(op, C.Op) and op.same_as(_CALL_PURE_PACKED)) or isinstance(op, C.ExternFunc):
            fn = args[0] if isinstance(op, C.Op) else op
            args = list(args[1:]) if isinstance(op, C.Op) else list(args)
            ev.op = self._op_label(name, str(getattr(fn, "global_symbol", fn)))
            for a in args:
                self._use_in_primfunc(a, ev)
            outs = self._protos_for_type(var.ty, name, ev.op, runtime=True, planned=False)
            ev.allocs.extend(_nested(outs))
            self.tokens[var.__chandle__()] = outs
            return
        # Any other call: a Relax function or an op the planner does not look into. Its
        # arguments escape (the planner discards their tokens) and its tensor results are
        # allocated at run time by the callee.
        if handles is not None:  # the variables it reads (_call_info): the same tokens
            tokens = self.tokens
            for h in handles:
                for p in _nested(tokens.get(h)):
                    p.planned = False
        else:
            for a in args:
                self._discard(self._tokens_of(a))
        per_leaf = None
        if isinstance(op, C.GlobalVar):
            info = self._callee_info.get(op.__chandle__())
            if info is None:
                from .alias import returned_params

                callee = self.mod[op] if op in self.mod.functions else None
                is_fn = isinstance(callee, relax.Function)
                info = (str(op.name_hint), is_fn, returned_params(self.mod, op) if is_fn else None)
                self._callee_info[op.__chandle__()] = info
            ev.op = f"call {info[0]}"
            if info[1]:
                ev.callee = info[0]
                self.callees.append(ev.callee)
                per_leaf = info[2]
        else:
            ev.op = self._op_label(name, str(getattr(op, "name", op)).removeprefix("relax."))
        shared = self._returned_args(per_leaf, args, var.ty) if ev.callee is not None else None
        if shared is not None:
            # the callee returns (views of) its arguments, e.g. a chunk function its in-place
            # buffer: the result is that storage, which stays live while the result is used
            self.tokens[var.__chandle__()] = shared
            return
        outs = self._protos_for_type(
            var.ty, name, ev.op, runtime=True, planned=False, from_callee=ev.callee is not None
        )
        ev.allocs.extend(_nested(outs))
        self.tokens[var.__chandle__()] = outs

    def _dps_call(self, var, name: str, ev: _Event, inputs) -> None:
        """A kernel called in destination-passing style: it reads ``inputs`` and writes
        ``var``'s fresh output tensors, allocated by the caller."""
        for a in inputs:
            self._use_in_primfunc(a, ev)
        outs = self._protos_for_type(var.ty, name, ev.op)
        for p in _nested(outs):
            p.refs += 1  # the DPS output argument
            ev.allocs.append(p)
            ev.uses.append(p)
        self.tokens[var.__chandle__()] = outs

    def _dataflow_reshape_arg(self, var, call, args: tuple):
        """The argument that TVM's ``RewriteDataflowReshape`` would reshape in place of this
        ``call_tir`` (rewrite_dataflow_reshape.cc, TVM 0.27), else None: a binding of a
        DataflowVar in a dataflow block, calling a PrimFunc with a reshape pattern
        (``has_reshape_pattern``, memoised per PrimFunc) on one tensor of the result's dtype
        and element count. TVM's pass reshapes the one argument the PrimFunc reads when it
        has several (fused functions, not made on CPU): met here, ``DataflowReshapeUnknown``
        makes the estimator run TVM's pass instead."""
        if not self._in_dataflow or not isinstance(var, relax.DataflowVar):
            return None
        gv = args[0]
        func = self.mod[gv] if isinstance(gv, C.GlobalVar) and gv in self.mod.functions else None
        if not isinstance(func, C.PrimFunc):
            return None
        args = _call_args(args)
        if len(args) != 1:
            # TVM reshapes the one argument such a PrimFunc reads
            if _has_reshape_pattern(func):
                raise DataflowReshapeUnknown(str(gv.name_hint))
            return None
        # TVM tests the pattern first; the cheap tests come first here (the same answer)
        arg = args[0]
        src, res = arg.ty, var.ty
        if not isinstance(src, C.TensorType) or not isinstance(res, C.TensorType):
            return None
        s_shape, r_shape = C.tensor_shape(src), C.tensor_shape(res)
        s_dtype, r_dtype = C.tensor_dtype(src), C.tensor_dtype(res)
        if s_dtype in ("", "void") or s_dtype != r_dtype or s_shape is None or r_shape is None:
            return None
        a, b = _count(s_shape), _count(r_shape)
        if isinstance(a, int) and isinstance(b, int):
            same = a == b
        else:
            import tvm.sym  # TVM 0.27: tvm.arith moved here

            same = tvm.sym.Analyzer().can_prove_equal(a, b)
        return arg if same and _has_reshape_pattern(func) else None

    def _returned_args(self, per_leaf, args: tuple, ty):
        """The tokens of the arguments a Relax callee returns, leaf for leaf, when every leaf
        of its result is one argument's storage; else None (the result is the callee's).
        ``per_leaf``: the callee's ``alias.returned_params``."""
        tys = list(ty.fields) if isinstance(ty, C.TupleType) else [ty]
        if per_leaf is None or len(per_leaf) != len(tys) or len(args) == 0:
            return None
        leaves = []
        for ps, t in zip(per_leaf, tys):
            tok = self._tokens_of(args[ps[0]]) if len(ps) == 1 else None
            if not isinstance(t, C.TensorType) or not isinstance(tok, Proto):
                return None
            leaves.append(tok)
        return tuple(leaves) if isinstance(ty, C.TupleType) else leaves[0]

    # ---------------------------------------------------------------- plan
    def _finish(self, n: int) -> FrameAnalysis:
        alloc = _TokenAllocator1D()
        assigned: dict[int, _Storage] = {}
        refs = {p.uid: p.refs for p in self.protos}
        for ev in self.events:
            for p in ev.allocs:
                if p.planned and not p.runtime:
                    assigned[p.uid] = alloc.request(p)
            for p in ev.uses:
                if p.uid in assigned:
                    refs[p.uid] -= 1
                    if refs[p.uid] == 0:
                        alloc.release(assigned[p.uid])
        storage = sum(s.nbytes for s in alloc.storages)
        unplanned = 0
        outputs = 0
        for p in self.protos:
            if p.uid in assigned or p.from_callee:
                continue
            unplanned += p.nbytes
            if p.output:
                outputs += p.nbytes
        for p in self.protos:
            if p.last_use < p.born:
                p.last_use = p.born
        mem = FrameMemory(
            function=self.fname,
            storage_bytes=storage,
            num_storages=len(alloc.storages),
            unplanned_bytes=unplanned,
            output_bytes=outputs,
            callee_bytes=0,
            callee=None,
        )
        ws = {ev.index: ev.ws_allocs for ev in self.events if ev.ws_allocs}
        spans = {}  # storage id -> (size, first use, last use)
        for p in self.protos:
            st = assigned.get(p.uid)
            if st is None:
                continue
            size, lo, hi = spans.get(st.sid, (st.nbytes, p.born, p.last_use))
            spans[st.sid] = (size, min(lo, p.born), max(hi, p.last_use))
        blocks = list(spans.values())
        # a callee's fresh result is in the callee's frame during the call and stays live in
        # this frame until its last use (counted twice at the call itself: conservative)
        blocks += [(p.nbytes, p.born, p.last_use) for p in self.protos if p.uid not in assigned]
        return FrameAnalysis(
            mem,
            tuple(self.protos),
            tuple(self.events),
            tuple(self.callees),
            ws,
            n,
            tuple(blocks),
        )


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


# C.identity_memo-style cache: {Call handle: (Call, its arguments, handles of the variables it
# reads)}. A call's arguments are read through the FFI once per Call object (each read of
# ``call.args`` makes a new Array wrapper, one more per element): the search's estimates walk
# the same unchanged calls estimate after estimate (a chunked Evoformer's 256 chunk calls
# of 14 arguments each). The entry holds the Call, so its handle is not reused meanwhile;
# calls with a constant argument are not kept (it would keep a weight alive).
_CALL_INFO: dict = {}


def _call_info(call) -> tuple[tuple, list | None]:
    """(the call's arguments, the handles of the variables it reads, or None when it holds
    anything but variables, tuples and constants: ``free_vars`` is asked then)."""
    h = call.__chandle__()
    hit = _CALL_INFO.get(h)
    if hit is None:
        args = tuple(call.args)
        vs = _call_vars(call, args)
        hit = (call, args, None if vs is None else [v.__chandle__() for v in vs])
        leaves = [f for a in args for f in (a.fields if isinstance(a, relax.Tuple) else (a,))]
        if not any(isinstance(a, C.GenericConst) for a in leaves):
            if len(_CALL_INFO) >= 16384:
                _CALL_INFO.clear()
            _CALL_INFO[h] = hit
    return hit[1], hit[2]


def _call_vars(expr, args=None) -> list | None:
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


class DataflowReshapeUnknown(Exception):
    """A reshape-pattern PrimFunc called with several arguments (see ``_dataflow_reshape_arg``)."""


# C.identity_memo cache of has_reshape_pattern per PrimFunc: the estimator's memoised
# legalization hands back the same PrimFunc objects estimate after estimate; TVM's pass asked
# each call again (Evoformer, 120 calls: 11 ms per estimate)
_RESHAPE: dict = {}


def _has_reshape_pattern(func) -> bool:
    return C.identity_memo(
        _RESHAPE, None, func, lambda: bool(relax.analysis.has_reshape_pattern(func)), 16384
    )


def _count(shape):
    """The element count of a shape: an int when static, else a PrimExpr."""
    if all(isinstance(d, (int, tvm.tirx.IntImm)) for d in shape):
        return C.prod(int(d) for d in shape)
    out = tvm.tirx.const(1, "int64")
    for d in shape:
        out = out * d
    return out


def _call_args(call_args: tuple) -> list:
    """The tensor arguments of a call_tir-like call, from its arguments (callee, tuple)."""
    args = call_args[1]
    if isinstance(args, relax.Tuple):
        return list(args.fields)
    return [args]


def live_records(protos, index: int) -> list[TensorRecord]:
    """Tensors live right after binding ``index``."""
    out = []
    for p in protos:
        if p.born <= index <= p.last_use:
            kind = "output" if p.output else "intermediate"
            out.append(TensorRecord(p.name, p.shape, p.dtype, p.nbytes, p.op, kind))
    out.sort(key=lambda r: (-r.nbytes, r.name))
    return out


def timeline(analysis: FrameAnalysis, callee_transient: dict[str, int]) -> list[TimelineEntry]:
    """Live bytes after each binding, with that binding's workspace and callee frame.

    ``callee_transient`` maps a callee to the bytes its frame holds during the call beyond the
    results it returns (those are live in this frame from the call on).
    """
    n = analysis.num_bindings
    delta = [0] * (n + 2)
    for p in analysis.protos:
        delta[p.born] += p.nbytes
        delta[min(p.last_use, n) + 1] -= p.nbytes
    live = 0
    per_index = []
    for i in range(n + 1):
        live += delta[i]
        per_index.append(live)
    out = []
    for ev in analysis.events:
        extra = ev.workspace + (callee_transient.get(ev.callee, 0) if ev.callee else 0)
        out.append(TimelineEntry(ev.index, ev.name, ev.op, per_index[ev.index] + extra))
    return out


PAGE = 4096  # the VM's pooled allocator and the CPU workspace pool round to whole pages
# What one device allocation can take of a GPU's memory: the CUDA driver maps device memory in
# 2 MiB pages. On an H200, ViT-4096 chunked into storages of 0.01-9 MiB took 48 MiB of device
# memory where TVM's plan adds up to 39.9 MiB (benchmarks/results/gpu_second_run.jsonl). On GPU
# targets the run-time simulation charges new blocks whole pages (runtime_peak): with TVM's
# plan, it covers the 7 chunked builds measured on the H200 (README "GPU (H200)")
GPU_ALLOC_GRANULARITY = 2 * 2**20
GPU_SMALL_ALLOC = 2**20  # below this the driver packs allocations into shared pages


def _pages(n: int, page: int = PAGE) -> int:
    return max(page, -(-n // page) * page)


class _WorkspacePool:
    """TVM's CPU WorkspacePool: keeps freed blocks; a request takes the smallest free block
    that fits, else the largest free block is freed and re-allocated at the new size."""

    def __init__(self) -> None:
        self.free: list[int] = []
        self.total = 0

    def alloc(self, n: int) -> int:
        n = _pages(n)
        if not self.free:
            self.total += n
            return n
        if self.free[-1] >= n:
            j = bisect.bisect_left(self.free, n)
            return self.free.pop(j)
        old = self.free.pop()
        self.total += n - old
        return n

    def release(self, n: int) -> None:
        bisect.insort(self.free, n)


def runtime_peak(analysis: FrameAnalysis, callee_peak: dict[str, int], gpu: bool = False) -> int:
    """Simulate the run-time memory of one call of the frame.

    The VM allocates a storage at its first use and frees it after its last use into a pool
    that never shrinks and hands a freed block to the next request of the same (page-rounded)
    size; kernel workspace comes from TVM's workspace pool (``_WorkspacePool``). A callee's
    frame is taken from the storage pool for the duration of the call. The result is the
    high-water mark of both pools, i.e. what the process really touches.

    Pages are 4 KiB on CPUs. On GPUs (``gpu``), a new block of at least ``GPU_SMALL_ALLOC``
    (1 MiB) costs whole ``GPU_ALLOC_GRANULARITY`` (2 MiB) pages (smaller ones their size: the
    driver packs them into shared pages), and a callee's frame its size in whole pages; the
    pool still matches a request to a freed block by its 4 KiB-rounded size (so a freed 9 MiB
    block serves no 0.1 MiB request), and a callee's frame, which is several allocations of its
    own sizes, is reused only by calls of the same function. An H200 measured up to 4 MiB more
    than a simpler model (every block and frame matched by its 2 MiB-rounded size) predicted;
    this one covers the 7 chunked builds measured there (README "GPU (H200)").
    """
    page = GPU_ALLOC_GRANULARITY if gpu else PAGE
    n = analysis.num_bindings
    starts: dict[int, list[tuple]] = {}
    ends: dict[int, list[tuple]] = {}
    for size, lo, hi in analysis.blocks:
        # (pool key, bytes it costs): on GPUs blocks of 1 MiB and more in whole 2 MiB pages,
        # smaller ones packed (the CUDA driver sub-allocates them from shared pages)
        cost = _pages(size, page) if gpu and size >= GPU_SMALL_ALLOC else _pages(size)
        blk = ((None, _pages(size)), cost)
        starts.setdefault(lo, []).append(blk)
        ends.setdefault(min(hi, n), []).append(blk)
    for ev in analysis.events:
        if ev.callee and callee_peak.get(ev.callee):
            r = _pages(callee_peak[ev.callee], page)
            blk = ((ev.callee if gpu else None, r), r)
            starts.setdefault(ev.index, []).append(blk)
            ends.setdefault(ev.index, []).append(blk)
    free: dict[tuple, int] = {}
    wsp = _WorkspacePool()
    total = peak = 0
    for i in range(n + 1):
        for key, cost in sorted(starts.get(i, ()), key=lambda b: (b[1], b[0][1]), reverse=True):
            if free.get(key):
                free[key] -= 1
            else:
                total += cost
        taken = [wsp.alloc(b) for b in analysis.workspace_by_index.get(i, ())]
        peak = max(peak, total + wsp.total)
        for b in reversed(taken):
            wsp.release(b)
        for key, _cost in ends.get(i, ()):
            free[key] = free.get(key, 0) + 1
    return peak
