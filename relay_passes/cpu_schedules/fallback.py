"""Whatever no other rule takes (pooling, resize, gathers, odd reductions): each block's
outermost spatial loop runs in parallel. Never fails: a block it cannot touch stays serial."""

from __future__ import annotations

from tvm import s_tir

from .common import CPURule, parallel, static_extent


class Fallback(CPURule):
    def schedule(self, sch, infos, target):
        for info in infos:
            kind = info.dom_kind()
            if not kind or kind[0] != "S":
                continue
            loops = sch.get_loops(info.block_rv)
            if not loops or len(loops) != len(kind):
                continue
            n = static_extent(sch, loops[0])
            if n is None or n > 1:
                try:
                    parallel(sch, info.block_rv, loops[0])
                except s_tir.ScheduleError:  # a loop shared with another block: serial
                    continue
        return sch
