"""Error hierarchy shared by the passes and the user layer.

Pure Python (imports nothing from TVM) so that runtime-only deploy hosts can import it.
Every error carries a message that says what was wrong, where, and what to do about it.
``tvm_autochunk`` re-exports these classes; ``AutochunkError`` is *the* tvm_autochunk error.
"""

from __future__ import annotations


class AutochunkError(Exception):
    """Base class of every error raised by tvm_autochunk and relay_passes."""


class FrontendError(AutochunkError):
    """A model could not be imported (malformed file, unsupported op, bad example inputs)."""


class UnsupportedOpError(FrontendError):
    """The frontend met an operator it cannot import."""

    def __init__(self, op: str, frontend: str, detail: str = ""):
        self.op = op
        self.frontend = frontend
        msg = (
            f"the {frontend} frontend cannot import operator '{op}'"
            + (f": {detail}" if detail else "")
            + ". Remedy: replace or decompose this op in the model before export, "
            "or import the model through another frontend."
        )
        super().__init__(msg)


class BudgetError(AutochunkError, ValueError):
    """A memory budget was given in a form we do not accept."""


class BudgetInfeasibleError(AutochunkError):
    """The module cannot be made to fit the requested budget.

    ``unchunked_peak`` and ``best_peak`` (bytes) are set when known: the peak before chunking
    and the smallest peak the search reached.
    """

    def __init__(
        self,
        msg: str,
        *,
        unchunked_peak: int | None = None,
        best_peak: int | None = None,
        min_budget: int | None = None,
    ):
        super().__init__(msg)
        self.unchunked_peak = unchunked_peak
        self.best_peak = best_peak
        self.min_budget = min_budget  # the smallest budget consistent with best_peak


class SymbolicShapeError(AutochunkError):
    """A symbolic dimension has no upper bound, so memory cannot be bounded."""


class UnsupportedTargetError(AutochunkError, ValueError):
    """The target is not one we can build or estimate for."""


class BuildError(AutochunkError):
    """TVM failed to build the module."""


class ArtifactError(AutochunkError):
    """An exported artifact is missing, corrupted, or built for another TVM version."""


class PassContractError(AutochunkError):
    """A pass was run on a module that does not meet its preconditions."""


class InputError(AutochunkError, ValueError):
    """Arguments passed to a built model do not match its signature."""
