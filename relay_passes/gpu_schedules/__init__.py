"""Schedule rules for GPU kernels: dlight's GPU rules, with two rules of ours before its
``Fallback``, so that ``Fallback`` is left only kernels nothing understands.

dlight's ``Reduction`` takes only sums and ``GeneralReduction`` only chains that end in an
injective block, so a lone max/min row reduction (``any``, ``amax``) fell to ``Fallback``: one
thread per row, each row serial, a latency every chunk pays in full. ``RowReduction`` gives it a
tree reduction. ``Injective`` maps elementwise and layout kernels to threads the way
``Fallback`` does; naming it lets a test assert that ``Fallback`` schedules no kernel at all.
"""

from __future__ import annotations

from ..schedule_rules import rule_for as first_rule
from .injective import Injective
from .reduction import RowReduction


def default_rules() -> list:
    """dlight's CUDA rules (``tvm.relax.backend.cuda.pipeline``) with ours before Fallback."""
    from tvm.s_tir import dlight as dl

    return [
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        RowReduction(),
        Injective(),
        dl.gpu.Fallback(),
    ]


def rule_for(func, target) -> str | None:
    """The name of the rule that schedules ``func`` (None: no rule does)."""
    return first_rule(default_rules(), func, target)


def schedule_pass():
    """``dlight.ApplyDefaultSchedule`` with ``default_rules()``: a module pass."""
    from tvm.s_tir import dlight

    return dlight.ApplyDefaultSchedule(*default_rules())


__all__ = ["Injective", "RowReduction", "default_rules", "rule_for", "schedule_pass"]
