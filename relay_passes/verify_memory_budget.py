"""VerifyMemoryBudget: after ``StaticPlanBlockMemory``, hold TVM's own plan to the budget.

Where it belongs: right after ``StaticPlanBlockMemory`` (it reads ``memory.alloc_storage``).
It never changes the module. It reads the plan (``planned_memory.read_plan``), hands it to
``on_plan`` (so callers can report it) and raises ``BudgetInfeasibleError`` when the planned
peak exceeds ``budget_bytes``: "estimate early, verify late" - a build never silently exceeds
its budget.
"""

from __future__ import annotations

import tvm

from .errors import BudgetInfeasibleError
from .lowering import as_target, is_gpu
from .planned_memory import read_plan


def plan_refusal(plan, entry: str, budget: int, target, runtime_peak: int | None = None):
    """The refusal of TVM's ``plan`` over ``budget``, naming its parts; with the simulated
    run-time peak when that is counted too (the driver checks the larger of the two)."""
    f = plan.frame(entry)
    static = int(plan.peak_bytes)
    parts = {} if runtime_peak is None else {"static plan": static}
    parts |= {
        "storage": f.storage_bytes,
        "run-time allocations": f.unplanned_bytes,
        "largest callee": f.callee_bytes,
        "kernel workspace": plan.workspace_bytes,
    }
    if runtime_peak is not None:
        parts["simulated run-time peak"] = runtime_peak
    return BudgetInfeasibleError(
        budget=budget,
        planned_peak=max(static, runtime_peak or 0),
        plan_parts=parts,
        gpu=is_gpu(as_target(target)),
    )


@tvm.transform.module_pass(opt_level=0, name="VerifyMemoryBudget")
class VerifyMemoryBudget:
    def __init__(self, budget_bytes: int | None, target, *, entry: str = "main", on_plan=None):
        self.budget_bytes = budget_bytes
        self.target = target
        self.entry = entry
        self.on_plan = on_plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        plan = read_plan(mod, self.entry, self.target)
        if self.on_plan is not None:
            self.on_plan(plan)
        if self.budget_bytes is not None and plan.peak_bytes > self.budget_bytes:
            raise plan_refusal(plan, self.entry, self.budget_bytes, self.target)
        return mod
