"""What the CPU and GPU schedule rule families (``cpu_schedules``, ``gpu_schedules``) share."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target


class DeclinesOnError:
    """Mixin for a dlight ``ScheduleRule``: ``schedule(sch, infos, target)`` returns the
    schedule or None; a schedule error (an unexpected PrimFunc shape) makes the rule decline,
    so the next rule is tried."""

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


def rule_for(rules, func, target) -> str | None:
    """The name of the first of ``rules`` that schedules ``func``, as dlight's
    ``ApplyDefaultSchedule`` picks it (None: no rule does)."""
    for rule in rules:
        if rule.apply(func, target, False) is not None:
            return type(rule).__name__
    return None
