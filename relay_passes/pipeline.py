"""The ``autochunk`` pipeline, registered with ``relax.get_pipeline``.

``relax.get_pipeline("autochunk", budget_bytes=N)`` is the build driver
(``driver.AutochunkPipeline``): AutoChunk, then TVM's Relax pipeline for the target in scope,
with TVM's plan held to the budget. ``tvm_autochunk.build`` runs the same pass, so both pick
the same plan, make the same checks and raise the same errors. Without a budget it is TVM's
pipeline, with the plan read.
"""

from __future__ import annotations

import tvm

from .driver import AutochunkPipeline
from .lowering import as_target


def autochunk_pipeline(target=None, budget_bytes: int | None = None, **kw) -> AutochunkPipeline:
    """The build pipeline as one module pass (what ``tvm.compile(relax_pipeline=...)`` takes).
    ``kw``: ``entry``, ``chunk_plan``, ``options``, ``progress`` (see ``AutochunkPipeline``)."""
    return AutochunkPipeline(
        as_target(target) if target is not None else None, budget_bytes, **kw
    )


def _factory(budget_bytes: int | None = None, target=None, **kw) -> tvm.transform.Pass:
    return autochunk_pipeline(target, None if budget_bytes is None else int(budget_bytes), **kw)


def register_autochunk_pipeline() -> None:
    """Register ``"autochunk"`` with ``relax.get_pipeline`` (idempotent)."""
    from tvm.relax import pipeline as rp

    if "autochunk" not in rp.PIPELINE_MAP:
        rp.register_pipeline("autochunk")(_factory)


register_autochunk_pipeline()
