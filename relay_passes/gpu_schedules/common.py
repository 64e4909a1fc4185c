"""What the GPU rules share: a rule that declines (returns None) on a schedule error."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target


class GPURule(GPUScheduleRule):
    """``schedule`` returns the schedule or None; a schedule error (a PrimFunc shape the rule
    did not foresee) makes the rule decline, so the next rule is tried."""

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            return self.schedule(sch, infos, target)
        except (s_tir.ScheduleError, ValueError, AssertionError):
            return None

    def schedule(self, sch, infos, target):  # pragma: no cover - abstract
        raise NotImplementedError
