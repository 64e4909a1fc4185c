"""relay_passes: the Relax IR passes of tvm_autochunk.

Named "relay_passes" at the user's request; TVM 0.27 has no Relay, these are **Relax** passes.
Analyses return frozen plain data (``plan.py``); exactly one rewriter changes IR. Each pass is
usable on its own inside any TVM pipeline. Dependencies run one way: tvm_autochunk ->
relay_passes -> tvm; nothing here imports tvm_autochunk. Budgets arrive as integer bytes.

Names load lazily so that ``relay_passes.errors`` / ``relay_passes.plan`` import on deploy
hosts that have only the TVM runtime.
"""

from __future__ import annotations

from .errors import AutochunkError

_LAZY = {
    "BoundSymbolicDims": "bound_symbolic_dims",
    "estimate_memory": "estimate_memory",
    "AutochunkPipeline": "driver",
    "autochunk_pipeline": "pipeline",
    "format_bytes": "plan",
    "FrameMemory": "plan",
    "MemoryProfile": "plan",
    "PlannedMemory": "plan",
    "TensorRecord": "plan",
    "TimelineEntry": "plan",
    "planned_memory": "planned_memory",
    "read_plan": "planned_memory",
    "VerifyMemoryBudget": "verify_memory_budget",
    "ChunkPlan": "plan",
    "ChunkRegion": "plan",
    "ApplyChunkPlan": "rewrite",
    "PlanChunkCalls": "chunk_calls",
    "RestoreChunkCalls": "chunk_calls",
    "analyze_region": "chunk_region",
    "legal_dims": "chunk_region",
    "LowerBound": "lower_bound",
    "reusable_inputs": "alias",
    "register_dim_rule": "dimflow_rules",
    "AutoChunk": "auto_chunk",
    "auto_chunk": "auto_chunk",
    "register_autochunk_pipeline": "pipeline",
    "get_dim_rule": "dimflow_rules",
    "FuseAttention": "attention",
    "fuse_attention": "attention",
    "leave_unfused": "attention",
}

__all__ = ["AutochunkError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'relay_passes' has no attribute {name!r}")
