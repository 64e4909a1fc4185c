"""EstimateMemory: what one call of a Relax module will allocate, and where the peak is.

Analysis only (never mutates the caller's module). Where it belongs: on a high-level Relax
module (as imported) or on any module before ``StaticPlanBlockMemory``; it runs the target's
legalization (``lowering.estimate_passes``) on a copy and walks the result with
``liveness.FrameWalker``, which reproduces TVM's static planner. Symbolic dims are evaluated
at their ``tir_var_upper_bound``; an unbounded one raises ``SymbolicShapeError``.

Not handled: dynamic (data-dependent) shapes without bounds; memory of external libraries
(cuBLAS workspaces etc.), which the default pipelines do not use.
"""

from __future__ import annotations

import tvm
from tvm import relax

from . import _compat as C
from . import caches
from .dataflow_reshape import DataflowReshapeUnknown
from .errors import PassContractError, SymbolicShapeError
from .frame import FrameAnalysis
from .liveness import FrameWalker
from .lowering import as_target, estimate_passes, is_gpu, run_passes
from .plan import FrameMemory, MemoryProfile, TensorRecord, fold_callees
from .runtime_memory import Footprint, live_records, runtime_footprint, timeline


def _check_module(mod, entry: str) -> relax.Function:
    if not isinstance(mod, tvm.IRModule):
        raise PassContractError(
            f"expected a tvm.IRModule, got {type(mod).__name__}. Remedy: import the model first "
            "(tvm_autochunk.from_torch / from_onnx)."
        )
    names = [gv.name_hint for gv in mod.functions]
    if entry not in names:
        raise PassContractError(
            f"the module has no function '{entry}' (functions: {sorted(names)}). Remedy: name "
            "the entry function 'main' or pass entry=..."
        )
    func = mod[entry]
    if not isinstance(func, relax.Function):
        raise PassContractError(f"'{entry}' is a {type(func).__name__}, not a Relax function")
    return func


def num_inputs(func: relax.Function) -> int:
    """Parameters beyond ``num_input`` (relax.frontend.nn / detach_params style) are weights."""
    attrs = func.attrs
    if attrs is not None and "num_input" in attrs:
        return int(attrs["num_input"])
    return len(func.params)


def check_bounds(func: relax.Function, name: str = "main") -> dict[str, int]:
    """{symbolic dim: upper bound} for the entry's signature; error for an unbounded dim."""
    bounds = C.upper_bounds_of(func)
    for p in func.params:
        shape = C.tensor_shape(p.ty)
        if shape is None:
            if isinstance(p.ty, C.TensorType):
                raise SymbolicShapeError(
                    f"input '{p.name}' of '{name}' has an unknown shape (ndim only). Remedy: "
                    "export with concrete or bounded symbolic shapes."
                )
            continue
        for v in C.free_tir_vars(shape):
            if str(v.name) not in bounds:
                raise SymbolicShapeError(
                    f"dimension '{v.name}' of input '{p.name}' has no upper bound, so peak memory "
                    "cannot be bounded. Remedy: bound it, e.g. torch.export.Dim("
                    f"'{v.name}', max=N) when exporting, or tvm_autochunk.bound_dims(mod, "
                    f"{{'{v.name}': N}}) (sets the function's 'tir_var_upper_bound' attribute)."
                )
    return bounds


def _op_names(mod) -> dict[str, str]:
    """{binding var name: high-level op name} over every Relax function, for reports."""
    names: dict[str, str] = {}
    for _, f in mod.functions_items():
        if not isinstance(f, relax.Function):
            continue

        for block in f.body.blocks if isinstance(f.body, relax.SeqExpr) else []:
            for b in block.bindings:
                n = C.op_name(b.value)
                if n and n not in ("relax.call_tir", "relax.call_tir_inplace"):
                    names.setdefault(str(b.var.name), n.removeprefix("relax."))
    return names


def _tensor_record(name, ty, bounds, kind) -> TensorRecord | None:
    shape = C.tensor_shape(ty)
    if shape is None:
        return None
    dims = tuple(int(C.eval_upper(d, bounds) or 0) for d in shape)
    dtype = C.tensor_dtype(ty)
    return TensorRecord(name, dims, dtype, C.prod(dims) * C.dtype_bytes(dtype), "", kind)


def _weights(mod, func: relax.Function, bounds) -> int:
    """Bytes of the constants used by any Relax function of ``mod`` (a chunk function may hold
    a weight its caller no longer reads), plus ``func``'s weight parameters."""
    seen: dict[int, int] = {}

    def cb(e):
        if isinstance(e, C.GenericConst) and isinstance(e.ty, C.TensorType):
            r = _tensor_record("const", e.ty, bounds, "weight")
            if r is not None:
                seen[hash(e)] = r.nbytes  # one entry per constant object

    def scan(e):
        # A-normal form: constants are call arguments or tuple fields; anything else nested
        # (If, SeqExpr, a local function) is visited whole
        if isinstance(e, C.GenericConst):
            cb(e)
        elif isinstance(e, C.Call):
            for a in e.args:
                scan(a)
        elif isinstance(e, relax.Tuple):
            for a in e.fields:
                scan(a)
        elif not isinstance(e, (relax.Var, tvm.ir.GlobalVar, C.Op, relax.TupleGetItem)):
            relax.analysis.post_order_visit(e, cb)

    for _, f in mod.functions_items():
        if not isinstance(f, relax.Function):
            continue
        if not isinstance(f.body, relax.SeqExpr):
            relax.analysis.post_order_visit(f, cb)
            continue
        for block in f.body.blocks:
            for b in block.bindings:
                scan(b.value)
        scan(f.body.body)
    extra = 0
    for p in func.params[num_inputs(func) :]:
        r = _tensor_record(str(p.name), p.ty, bounds, "weight")
        extra += r.nbytes if r else 0
    return sum(seen.values()) + extra


def analyze_frames(
    lowered, entry: str, target, op_names=None, *, dataflow_reshape: bool = False
) -> dict[str, FrameAnalysis]:
    """Walk ``entry`` and every Relax function it calls, transitively, on a lowered module.

    ``dataflow_reshape``: ``lowered`` has not been through ``RewriteDataflowReshape``; the walk
    treats the calls it would rewrite as the reshapes (views) they would become."""
    gpu = is_gpu(target)

    def workspace_of(gv, bounds) -> tuple[int, ...]:
        if isinstance(gv, relax.Call):  # a matmul the walk models (static shapes)
            return () if gpu else C.kept_matmul_workspace(gv, target)
        f = lowered[gv] if gv in lowered.functions else None
        if gpu or not isinstance(f, C.PrimFunc):
            return ()
        return C.prim_func_workspace(f, target, bounds)

    out: dict[str, FrameAnalysis] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        func = lowered[name]
        walker = FrameWalker(
            lowered,
            func,
            name,
            C.upper_bounds_of(func),
            op_names,
            workspace_of,
            dataflow_reshape=dataflow_reshape,
        )
        out[name] = walker.run()
        todo.extend(c for c in out[name].callees if c not in out)
    return out


def frame_totals(frames: dict[str, FrameAnalysis], entry: str) -> dict[str, FrameMemory]:
    """Each frame with its largest callee frame folded in (recursion counted once)."""
    return fold_callees(
        {n: fa.memory for n, fa in frames.items()},
        {n: list(fa.callees) for n, fa in frames.items()},
        entry,
    )


def _callee_order(frames: dict[str, FrameAnalysis], entry: str) -> list[str]:
    """Functions in post-order (callees before callers), recursion cut."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        for c in frames[n].callees:
            visit(c)
        order.append(n)

    visit(entry)
    return order


def _lower_and_walk(mod, entry: str, tgt, op_names) -> dict[str, FrameAnalysis]:
    """The frames of ``mod`` lowered as the target's pipeline would. On CPU the walk makes
    RewriteDataflowReshape's rewrites itself (with its reshape-pattern test memoised per
    PrimFunc; the ops ``legalize_cache.cpu_lowering`` keeps are left unlowered for it);
    should it meet a call it cannot decide as TVM would, TVM's lowering and pass are run."""
    if is_gpu(tgt):
        return analyze_frames(run_passes(mod, estimate_passes(tgt), tgt), entry, tgt, op_names)
    lowered = run_passes(mod, estimate_passes(tgt, rewrite_reshape=False), tgt)
    try:
        return analyze_frames(lowered, entry, tgt, op_names, dataflow_reshape=True)
    except DataflowReshapeUnknown:
        # TVM's lowering whole (the kept ops lowered too), then its RewriteDataflowReshape
        lowered = run_passes(mod, estimate_passes(tgt), tgt)
        return analyze_frames(lowered, entry, tgt, op_names)


def weight_bytes(mod: tvm.IRModule, entry: str = "main") -> int:
    """``MemoryProfile.weight_bytes`` of ``mod`` alone (see ``estimate_memory``)."""
    func = _check_module(mod, entry)
    return _weights(mod, func, check_bounds(func, entry))


@caches.scoped
def estimate_memory(
    mod: tvm.IRModule, target="llvm", *, entry: str = "main", weights: bool = True
) -> MemoryProfile:
    """Estimate the memory one call of ``mod[entry]`` allocates when built for ``target``.

    ``weights=False`` leaves ``weight_bytes`` 0 (it scans every call's arguments; the
    AutoChunk search, which compares peaks only, skips it and fills it in at the end).
    """
    tgt = as_target(target)
    func = _check_module(mod, entry)
    bounds = check_bounds(func, entry)
    op_names = _op_names(mod)
    frames = _lower_and_walk(mod, entry, tgt, op_names)
    totals = frame_totals(frames, entry)
    main = frames[entry]
    frame = totals[entry]
    ws_items = [(ev.workspace, ev.op) for fa in frames.values() for ev in fa.events if ev.workspace]
    workspace, workspace_func = max(ws_items, default=(0, None))
    peak = frame.total_bytes + workspace

    transient = {n: t.total_bytes - t.output_bytes for n, t in totals.items()}
    rt_peaks: dict[str, Footprint] = {}
    gpu = is_gpu(tgt)
    for name in _callee_order(frames, entry):
        rt_peaks[name] = runtime_footprint(frames[name], rt_peaks, gpu)
    tl = timeline(main, transient)
    if tl:
        top = max(tl, key=lambda e: (e.live_bytes, -e.index))
    else:
        top = None
    inputs = tuple(
        r
        for p in func.params[: num_inputs(func)]
        if (r := _tensor_record(str(p.name), p.ty, bounds, "input")) is not None
    )
    outputs = tuple(
        TensorRecord(p.name, p.shape, p.dtype, p.nbytes, p.op, "output")
        for p in main.protos
        if p.output
    )
    notes = []
    if is_gpu(tgt):
        notes.append("GPU target: PrimFunc workspace taken as 0 (dlight-scheduled kernels); "
                     "the run-time peak counts device allocations of 1 MiB or more in whole "
                     "2 MiB pages")
    return MemoryProfile(
        target=str(tgt.kind.name),
        function=entry,
        peak_bytes=peak,
        runtime_peak_bytes=rt_peaks[entry].peak,
        frame=frame,
        workspace_bytes=workspace,
        workspace_func=workspace_func,
        live_peak_bytes=top.live_bytes if top else 0,
        peak_index=top.index if top else -1,
        peak_binding=top.name if top else "",
        peak_op=top.op if top else "",
        live_at_peak=tuple(live_records(main.protos, top.index)) if top else (),
        timeline=tuple(tl),
        weight_bytes=_weights(mod, func, bounds) if weights else 0,
        input_bytes=sum(r.nbytes for r in inputs),
        inputs=inputs,
        outputs=outputs,
        symbolic_bounds=tuple(sorted(bounds.items())),
        notes=tuple(notes),
    )
