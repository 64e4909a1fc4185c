"""Liveness and static-plan simulation of one Relax function frame (analysis only).

Input: a Relax function at call_tir level (after legalization; see ``lowering.estimate_passes``).
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
* the liveness timeline (a tensor lives from its binding to its last use) gives the peak site.

Nothing here mutates IR; results are plain data (``plan.py``).
"""

from __future__ import annotations

import re

from tvm import relax

from . import _compat as C
from . import legalize_cache as LC
from .alias import buffer_params_of, returned_params
from .dataflow_reshape import reshape_source
from .errors import SymbolicShapeError
from .frame import Event, FrameAnalysis, Proto, Storage, TokenAllocator1D, call_args, nested
from .ir_index import call_info, call_vars
from .plan import FrameMemory


def _per_var(table: dict, expr, missing):
    """``table``'s entry (keyed by var handle) for ``expr``, through tuples and their fields
    (a tuple of entries for a tuple); ``missing`` for anything else."""
    if isinstance(expr, relax.Var):
        return table.get(expr.__chandle__(), missing)
    if isinstance(expr, relax.Tuple):
        return tuple(_per_var(table, f, missing) for f in expr.fields)
    if isinstance(expr, relax.TupleGetItem):
        t = _per_var(table, expr.tuple_value, missing)
        return t[expr.index] if isinstance(t, tuple) else missing
    return missing


# names of memoised PrimFuncs (fused functions on GPUs carry them inside their names)
_MEMO_NAME = re.compile(re.escape(LC.SUFFIX) + r"\d+")

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
_ALLOC_TENSOR = C.Op.get("relax.builtin.alloc_tensor")
_MATMUL = C.Op.get("relax.matmul")
_DPS_OPS = (_CALL_TIR, _CALL_DPS_PACKED)
_VIEW_OPS = tuple(
    C.Op.get(n) for n in ("relax.reshape", "relax.memory.view", "relax.memory.ensure_zero_offset")
)


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
        # var handle -> True (a tensor in the caller's storage: a parameter, or a callee's
        # result that is one written in place) or a tuple of such flags, per field
        self._caller: dict = {p.__chandle__(): True for p in func.params}
        self.fname = fname
        self.bounds = bounds
        self.op_names = op_names or {}
        self.workspace_of = workspace_of or (lambda gv, bounds: ())
        # relax.Var (by handle: hashing a Var wrapper is cheap, comparing two is not) -> tokens
        self.tokens: dict = {}
        self.protos: list[Proto] = []
        self.events: list[Event] = []
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
        return _per_var(self.tokens, expr, None)

    def _caller_of(self, expr):
        """``self._caller``'s flag(s) for ``expr``; False when it is not the caller's."""
        return _per_var(self._caller, expr, False)

    def _discard(self, tokens) -> None:
        for p in nested(tokens):
            p.planned = False

    def _use_in_primfunc(self, expr, ev: Event) -> None:
        for p in nested(self._tokens_of(expr)):
            if p.block != self._block:
                p.planned = False
            p.refs += 1
            ev.uses.append(p)

    def _set_workspace(self, ev: Event, gv) -> None:  # gv: a PrimFunc, or a kept op's call
        if isinstance(gv, (C.GlobalVar, relax.Call)):
            ev.ws_allocs = tuple(self.workspace_of(gv, self.bounds))
            ev.workspace = sum(ev.ws_allocs)

    def _op_label(self, name: str, fallback: str) -> str:
        label = self.op_names.get(name)
        if label is not None:
            return label
        # a PrimFunc the estimator's memoised lowering named (legalize_cache): TVM's name
        return _MEMO_NAME.sub("", fallback) if LC.SUFFIX in fallback else fallback

    # ---------------------------------------------------------------- walk
    def run(self) -> FrameAnalysis:
        body = self.func.body
        self._visit_seq(body, top=True)
        n = self._index
        for p in nested(self._tokens_of(body.body)):
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
            vs = call_vars(expr)
            if vs is None:
                vs = relax.analysis.free_vars(expr) if not isinstance(expr, relax.Var) else [expr]
            handles = [v.__chandle__() for v in vs]
        tokens = self.tokens
        for h in handles:
            for p in nested(tokens.get(h)):
                p.last_use = max(p.last_use, index)

    def _visit_binding(self, b) -> None:
        var, value = b.var, b.value
        name = str(var.name)
        idx = self._index
        if isinstance(value, C.Call):
            args, handles = call_info(value)
        else:
            args, handles = None, None
        self._record_uses(value, idx, handles)
        ev = Event(idx, name, "")
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
            if caller := self._caller_of(value):
                self._caller[var.__chandle__()] = caller
            ev.op = type(value).__name__.lower()
        else:
            self.tokens[var.__chandle__()] = None
            ev.op = type(value).__name__
        self.events.append(ev)
        self._index = max(self._index, idx) + 1

    def _visit_call(self, var, call, ev: Event, args: tuple, handles=None) -> None:
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
            ev.op = self._op_label(name, LC.kernel_name(op))
            if kept == "compute":  # (the CPU matmul kernel may pack an operand: workspace)
                self._dps_call(var, name, ev, args)
                return self._set_workspace(ev, call) if op.same_as(_MATMUL) else None
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
            self._dps_call(var, name, ev, call_args(args))
            self._set_workspace(ev, gv)
            return
        if isinstance(op, C.Op) and op.same_as(_CALL_TIR_INPLACE):
            gv = args[0]
            ev.op = self._op_label(name, str(gv.name_hint))
            args = call_args(args)
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
        if isinstance(op, C.Op) and op.same_as(_ALLOC_TENSOR):
            # a chunk loop's output buffer (rewrite): planned like a kernel's output, unwritten
            ev.op = self._op_label(name, "alloc_tensor")
            outs = self._protos_for_type(var.ty, name, ev.op)
            ev.allocs.extend(nested(outs))
            self.tokens[var.__chandle__()] = outs
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
            ev.allocs.extend(nested(outs))
            self.tokens[var.__chandle__()] = outs
            return
        info = self._callee(op) if isinstance(op, C.GlobalVar) else None
        if info is not None and info[3]:
            # a chunk function or loop: chunk_calls keeps its arguments in TVM's plan (used
            # as a kernel's are) and its result is its buffer arguments
            for a in args:
                self._use_in_primfunc(a, ev)
        # Any other call: a Relax function or an op the planner does not look into. Its
        # arguments escape (the planner discards their tokens) and its tensor results are
        # allocated at run time by the callee.
        elif handles is not None:  # the variables it reads (call_info): the same tokens
            tokens = self.tokens
            for h in handles:
                for p in nested(tokens.get(h)):
                    p.planned = False
        else:
            for a in args:
                self._discard(self._tokens_of(a))
        per_leaf = None
        if info is not None:
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
            self.tokens[var.__chandle__()] = shared[0]
            leaves = shared[0]
            self._caller[var.__chandle__()] = (
                tuple(x is None for x in leaves) if isinstance(leaves, tuple) else leaves is None
            )
            return
        outs = self._protos_for_type(
            var.ty, name, ev.op, runtime=True, planned=False, from_callee=ev.callee is not None
        )
        ev.allocs.extend(nested(outs))
        self.tokens[var.__chandle__()] = outs

    def _callee(self, gv) -> tuple:
        """(name, is a Relax function, its ``returned_params``, returns its buffers)."""
        info = self._callee_info.get(gv.__chandle__())
        if info is None:
            callee = self.mod[gv] if gv in self.mod.functions else None
            is_fn = isinstance(callee, relax.Function)
            bufs = buffer_params_of(callee) is not None
            info = (str(gv.name_hint), is_fn, returned_params(self.mod, gv) if is_fn else None,
                    bufs)
            self._callee_info[gv.__chandle__()] = info
        return info

    def _dps_call(self, var, name: str, ev: Event, inputs) -> None:
        """A kernel called in destination-passing style: it reads ``inputs`` and writes
        ``var``'s fresh output tensors, allocated by the caller."""
        for a in inputs:
            self._use_in_primfunc(a, ev)
        outs = self._protos_for_type(var.ty, name, ev.op)
        for p in nested(outs):
            p.refs += 1  # the DPS output argument
            ev.allocs.append(p)
            ev.uses.append(p)
        self.tokens[var.__chandle__()] = outs

    def _dataflow_reshape_arg(self, var, call, args: tuple):
        """``dataflow_reshape.reshape_source`` here (only inside a dataflow block)."""
        if not self._in_dataflow:
            return None
        return reshape_source(self.mod, var, args)

    def _returned_args(self, per_leaf, args: tuple, ty):
        """The tokens of the arguments a Relax callee returns, leaf for leaf, when every leaf
        of its result is one argument's storage; else None (the result is the callee's).
        ``per_leaf``: the callee's ``alias.returned_params``. Wrapped in a 1-tuple: a leaf
        that is this frame's parameter has no token (None)."""
        tys = list(ty.fields) if isinstance(ty, C.TupleType) else [ty]
        if per_leaf is None or len(per_leaf) != len(tys) or len(args) == 0:
            return None
        leaves = []
        for ps, t in zip(per_leaf, tys):
            arg = args[ps[0]] if len(ps) == 1 else None
            tok = self._tokens_of(arg) if arg is not None else None
            own = isinstance(tok, Proto)  # else this frame's parameter: the caller's storage
            if not isinstance(t, C.TensorType) or not (own or self._caller_of(arg) is True):
                return None
            leaves.append(tok if own else None)
        return (tuple(leaves) if isinstance(ty, C.TupleType) else leaves[0],)

    # ---------------------------------------------------------------- plan
    def _finish(self, n: int) -> FrameAnalysis:
        alloc = TokenAllocator1D()
        assigned: dict[int, Storage] = {}
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
