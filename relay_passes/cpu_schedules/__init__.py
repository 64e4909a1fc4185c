"""Schedule rules for CPU (llvm) kernels, in dlight's shape: one rule family per module,
tried in order, the first that applies schedules the PrimFunc.

TVM's default CPU pipeline schedules nothing (every kernel a serial naive loop, 15-95x
slower than torch eager on our models); dlight's CPU rules cover only GEMV and row
reductions. ``default_rules`` adds convolutions and a register-blocked matmul, parallel and
vectorized injective kernels and row reductions, and a parallel fallback.
"""

from __future__ import annotations

from ..schedule_rules import rule_for as first_rule
from .conv import Conv
from .elementwise import Elementwise
from .fallback import Fallback
from .matmul import Matmul
from .reduction import RowChain, RowReduction


def default_rules() -> list:
    """The rules, most specific first (dlight's Reduction would also claim a matmul)."""
    return [Conv(), Matmul(), Elementwise(), RowChain(), RowReduction(), Fallback()]


def rule_for(func, target) -> str | None:
    """The name of the rule that schedules ``func`` (None: no rule does)."""
    return first_rule(default_rules(), func, target)


def schedule_pass():
    """``dlight.ApplyDefaultSchedule`` with ``default_rules()``: a module pass."""
    from tvm.s_tir import dlight

    return dlight.ApplyDefaultSchedule(*default_rules())


__all__ = [
    "Conv",
    "Elementwise",
    "Fallback",
    "Matmul",
    "RowChain",
    "RowReduction",
    "default_rules",
    "rule_for",
    "schedule_pass",
]
