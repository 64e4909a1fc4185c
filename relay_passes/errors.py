"""Error hierarchy shared by the passes and the user layer.

Pure Python (imports nothing from TVM) so that runtime-only deploy hosts can import it.
Every error carries a message that says what was wrong, where, and what to do about it.
``tvm_autochunk`` re-exports these classes; ``AutochunkError`` is *the* tvm_autochunk error.
"""

from __future__ import annotations

from .plan import format_bytes


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

    The fields say why; the message is written from them, once. Bytes are ints, None where
    unknown. A refusal of the search has ``best_peak`` (the smallest peak reached after
    ``stages`` chunk regions, at ``peak_site``), ``blockers`` (what stops chunking further),
    ``floor`` (what the smallest peak consists of, when chunking cannot lower it) and
    ``min_budget`` (a budget that builds; ``aimed``: (budget, peak) when a search aiming at
    the first suggestion reached only that peak), ``lower_bound`` (no chunking the search can
    build peaks lower; ``lower_bound_note`` says where, and what is whole there). A refusal
    of TVM's plan has ``planned_peak`` and ``plan_parts`` ({part: bytes}). An error rebuilt
    from its message alone (it crossed TVM's FFI, which keeps the type and the text) has the
    message and no fields.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        budget: int | None = None,
        unchunked_peak: int | None = None,
        best_peak: int | None = None,
        min_budget: int | None = None,
        stages: int = 0,
        peak_site: str = "",
        blockers: tuple[str, ...] = (),
        floor: str = "",
        remedies: tuple[str, ...] = (),
        aimed: tuple[int, int] | None = None,
        planned_peak: int | None = None,
        plan_parts: dict | None = None,
        gpu: bool = False,
        lower_bound: int | None = None,
        lower_bound_note: str = "",
    ):
        self.budget = budget
        self.unchunked_peak = unchunked_peak
        self.best_peak = best_peak
        self.min_budget = min_budget
        self.stages = stages
        self.peak_site = peak_site
        self.blockers = tuple(blockers)
        self.floor = floor
        self.remedies = tuple(remedies)
        self.aimed = aimed
        self.planned_peak = planned_peak
        self.plan_parts = dict(plan_parts or {})
        self.gpu = gpu
        self.lower_bound = lower_bound
        self.lower_bound_note = lower_bound_note
        super().__init__(message if message is not None else self._message())

    def fields(self) -> dict:
        """The fields, for comparing two refusals (the registered pipeline and ``build``)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def _message(self) -> str:
        fb = format_bytes
        b = self.budget
        budget = f"the budget of {fb(b)} ({b} bytes)" if b is not None else "the budget"
        gpu = (
            " (On a GPU, device allocations of 1 MiB or more count in whole 2 MiB pages.)"
            if self.gpu else ""
        )
        if self.planned_peak is not None:
            parts = ", ".join(f"{k} {fb(v)}" for k, v in self.plan_parts.items())
            return (
                f"TVM's memory plan needs {fb(self.planned_peak)} ({self.planned_peak} bytes) "
                f"per call, over {budget}" + (f": {parts}" if parts else "") + ". Remedy: "
                "raise the budget" + (
                    f" to at least {self.min_budget} bytes" if self.min_budget else ""
                ) + f".{gpu}"
            )
        head = f"cannot fit {budget}"
        if self.unchunked_peak is not None and self.best_peak is not None:
            head += (
                f": the unchunked module needs {fb(self.unchunked_peak)} and the smallest peak "
                f"reached is {fb(self.best_peak)} ({self.best_peak} bytes) after "
                f"{self.stages} chunk region(s)"
            )
        if self.peak_site:
            head += f"; the peak is now after binding {self.peak_site}"
        blocked = "; ".join(self.blockers) or "nothing left to chunk"
        floor = f" {self.floor}." if self.floor else ""
        if self.lower_bound_note:
            floor += f" No chunking the search can build peaks under {self.lower_bound_note}."
        fixes = []
        if self.min_budget is not None:
            fix = f"raise the budget to at least {self.min_budget} bytes"
            if self.aimed is not None:
                fix += (
                    " (the search is greedy and its path depends on the budget: aiming at "
                    f"{self.aimed[0]} bytes it reaches only {self.aimed[1]} bytes)"
                )
            fixes.append(fix)
        else:
            fixes.append("raise the budget")
        # a floor set by outputs or weights is not about the input's length
        fixes += list(self.remedies) or ["shorten the input"]
        return (
            f"{head}. Blocked by: {blocked}.{floor} Remedy: {', or '.join(fixes)}.{gpu}"
        )


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


class InputError(ArtifactError, ValueError):
    """Arguments passed to a built model do not match its signature (or a symbolic dim is
    outside the bounds it was built for): an ``ArtifactError`` of the call."""
