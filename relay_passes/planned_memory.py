"""Ground truth: run TVM's real pipeline up to ``StaticPlanBlockMemory`` and read its plan.

``planned_memory(mod, target)`` sums, per Relax function, the ``memory.alloc_storage`` sizes
(planned storage) and the ``builtin.alloc_tensor`` sizes (run-time allocations the planner left,
outputs included); a frame's total adds its largest callee frame; the module's peak adds the
largest PrimFunc-internal global buffer (CPU kernels allocate those at run time; after dlight
on GPU they are gone). This is the number ``VerifyMemoryBudget`` and our tests hold the
estimator and the budget to.
"""

from __future__ import annotations

import tvm
from tvm import relax

from . import _compat as C
from . import caches
from .lowering import as_target, is_gpu, planning_passes, run_passes
from .plan import FrameMemory, PlannedMemory, fold_callees

_ALLOC_STORAGE = C.Op.get("relax.memory.alloc_storage")
_ALLOC_TENSOR = C.Op.get("relax.builtin.alloc_tensor")


def _frame(func: relax.Function, name: str, mod) -> tuple[FrameMemory, list[str]]:
    bounds = C.upper_bounds_of(func)
    storage = unplanned = n_storage = 0
    callees: list[str] = []
    alloc_vars: dict = {}
    alias: dict = {}

    def size_of(exprs) -> int:
        total = 1
        for d in exprs:
            ub = C.eval_upper(d, bounds)
            total *= int(ub) if ub is not None else 0
        return total

    def visit_binding(b):
        nonlocal storage, unplanned, n_storage
        v = b.value
        if isinstance(v, C.Call) and isinstance(v.op, C.Op):
            if v.op.same_as(_ALLOC_STORAGE):
                storage += size_of(v.args[0].values)
                n_storage += 1
            elif v.op.same_as(_ALLOC_TENSOR):
                nbytes = size_of(v.args[0].values) * C.dtype_bytes(str(v.ty.dtype))
                unplanned += nbytes
                alloc_vars[b.var] = nbytes
        elif isinstance(v, C.Call) and isinstance(v.op, C.GlobalVar):
            if isinstance(mod[v.op], relax.Function):
                callees.append(str(v.op.name_hint))
        elif isinstance(v, relax.Var):
            alias[b.var] = [v]
        elif isinstance(v, relax.Tuple):
            alias[b.var] = [f for f in v.fields if isinstance(f, relax.Var)]

    def walk_seq(seq):
        for block in seq.blocks:
            for b in block.bindings:
                if isinstance(b.value, relax.If):
                    walk_seq(b.value.true_branch)
                    walk_seq(b.value.false_branch)
                else:
                    visit_binding(b)

    walk_seq(func.body)
    out_bytes = 0
    ret = func.body.body
    todo = list(relax.analysis.free_vars(ret)) if not isinstance(ret, relax.Var) else [ret]
    seen: set = set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        out_bytes += alloc_vars.get(v, 0)
        todo.extend(alias.get(v, []))
    return FrameMemory(name, storage, n_storage, unplanned, out_bytes, 0, None), callees


def read_plan(planned: tvm.IRModule, entry: str, target) -> PlannedMemory:
    """Read the plan of an already planned module (after StaticPlanBlockMemory)."""
    frames: dict[str, FrameMemory] = {}
    calls: dict[str, list[str]] = {}
    for gv, f in planned.functions_items():
        if isinstance(f, relax.Function):
            frames[gv.name_hint], calls[gv.name_hint] = _frame(f, gv.name_hint, planned)

    folded = fold_callees(frames, calls, entry)
    ws, ws_func = 0, None
    gpu = is_gpu(target)
    if not gpu:
        bounds = C.upper_bounds_of(planned[entry])
        # the kernels the entry reaches (a module may hold other entries: main_short)
        called: set[str] = set()
        for name in folded:
            relax.analysis.post_order_visit(
                planned[name].body,
                lambda e: called.add(e.name_hint) if isinstance(e, C.GlobalVar) else None,
            )
        for gv, f in planned.functions_items():
            if isinstance(f, C.PrimFunc) and gv.name_hint in called:
                b = sum(C.prim_func_workspace(f, target, bounds))
                if b > ws:
                    ws, ws_func = b, str(gv.name_hint)
    reach = [folded[n] for n in sorted(folded)]
    return PlannedMemory(
        target=str(target.kind.name),
        peak_bytes=folded[entry].total_bytes + ws,
        frames=tuple(reach),
        workspace_bytes=ws,
        workspace_func=ws_func,
    )


@caches.scoped
def planned_memory(mod: tvm.IRModule, target="llvm", *, entry: str = "main") -> PlannedMemory:
    """Run TVM's pipeline for ``target`` up to StaticPlanBlockMemory and read the plan."""
    tgt = as_target(target)
    planned = run_passes(mod, planning_passes(tgt), tgt)
    return read_plan(planned, entry, tgt)
