"""The base of our GPU rules: dlight's GPU rule that declines on a schedule error."""

from __future__ import annotations

from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from ..schedule_rules import DeclinesOnError


class GPURule(DeclinesOnError, GPUScheduleRule):
    """A rule for GPU targets (``DeclinesOnError``: ``schedule`` or decline)."""
