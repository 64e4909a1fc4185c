"""tvm_autochunk: run long-sequence models in limited memory, inside Apache TVM.

``build(model, target, budget)`` imports a model into Relax, estimates its peak memory, and
builds it with TVM so that one call stays within the budget; ``estimate`` reports the peak and
where it is; ``load`` brings an exported artifact back (TVM runtime only).

Compiler-side names (``build``, ``estimate``, frontends) import the TVM compiler lazily, so
``import tvm_autochunk`` and ``load`` work on runtime-only deploy hosts.
"""

from __future__ import annotations

from relay_passes.errors import (
    ArtifactError,
    AutochunkError,
    BudgetError,
    BudgetInfeasibleError,
    BuildError,
    FrontendError,
    InputError,
    PassContractError,
    SymbolicShapeError,
    UnsupportedOpError,
    UnsupportedTargetError,
)

from .artifact import Artifact, load, read_metadata
from .budget import format_bytes, parse_budget
from .threads import prepare_pool

prepare_pool()  # before TVM makes its thread pool (see threads.py)

__version__ = "0.1.0"

_LAZY = {
    "build": ("api", "build"),
    "estimate": ("api", "estimate"),
    "bound_dims": ("api", "bound_dims"),
    "MemoryReport": ("report", "MemoryReport"),
    "resolve_target": ("targets", "resolve_target"),
    "from_torch": ("frontends", "from_torch"),
    "from_onnx": ("frontends", "from_onnx"),
    "from_pt2": ("frontends", "from_pt2"),
    "from_exported_program": ("frontends", "from_exported_program"),
    "load_model": ("frontends", "load_model"),
    "measure_peak": ("measure", "measure_peak"),
    "ChunkPlan": ("api", "ChunkPlan"),
    "ChunkRegion": ("api", "ChunkRegion"),
    "legal_dims": ("api", "legal_dims"),
    "set_threads": ("threads", "set_threads"),
}

__all__ = [
    "Artifact",
    "ArtifactError",
    "AutochunkError",
    "BudgetError",
    "BudgetInfeasibleError",
    "BuildError",
    "FrontendError",
    "InputError",
    "PassContractError",
    "SymbolicShapeError",
    "UnsupportedOpError",
    "UnsupportedTargetError",
    "__version__",
    "format_bytes",
    "load",
    "parse_budget",
    "read_metadata",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tvm_autochunk' has no attribute {name!r}")
