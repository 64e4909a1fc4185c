"""AutoChunk: find chunk regions and chunk sizes so that one call fits a memory budget.

Where it belongs: on a high-level Relax module, before legalization (the ``autochunk``
pipeline puts it first). It reads the module with the analyses (``estimate_memory``,
``candidates``), decides with the stage search (``stage_search``, plain Python), and changes
IR only through ``rewrite.apply_chunk_plan``. It raises ``BudgetInfeasibleError`` (the
unchunked peak, the best reached, where it is and what blocks going lower) when the budget
cannot be met. Search details: docs/design.md.

Not handled yet: regions inside callees; a full dynamic programme over stages.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from dataclasses import dataclass, field

import tvm

from . import caches
from .candidates import enumerate_candidates, layer_prefix, shorter_copy, with_copies
from .errors import BudgetInfeasibleError, PassContractError
from .estimate_memory import estimate_memory, weight_bytes
from .lowering import as_target, is_gpu
from .plan import ChunkPlan
from .rewrite import apply_chunk_plan, check_well_formed
from .search import Candidate, SearchOptions, rank_candidates
from .stage_search import StageRecord, State, search_stages

__all__ = ["AutoChunk", "AutoChunkResult", "StageRecord", "auto_chunk", "need_bytes"]


def need_bytes(prof) -> int:
    """What a budget is checked against: max(static plan, simulated run-time peak)."""
    return max(int(prof.peak_bytes), int(prof.runtime_peak_bytes))


def excess_bytes(prof, target: int) -> int:
    """Memory above ``target`` summed over the entry function's timeline (byte x bindings):
    a model whose peak is in several slightly different layers gets below it only when each
    one is chunked, so plans with the same peak differ here."""
    return sum(max(0, e.live_bytes - target) for e in prof.timeline)


@dataclass(frozen=True)
class AutoChunkResult:
    budget_bytes: int
    unchunked_peak: int
    final_peak: int
    stages: tuple[StageRecord, ...] = ()
    search_seconds: float = 0.0
    evaluations: int = 0
    notes: tuple[str, ...] = field(default=())
    # whose constants priced the stages (``cost``): the target kind and where they come from
    cost_model: str = ""
    # estimate_memory of the returned module (the search made it; no need to estimate again)
    profile: object = field(default=None, repr=False, compare=False)
    # the peak of the module the search chunked, when another one is built from its plan (a
    # symbolic module's loops, from a search at the bounds: driver._chunk_symbolic)
    searched_peak: int | None = field(default=None, compare=False)
    # ``lower_bound.LowerBound``: no chunking the search can build peaks lower (driver)
    lower_bound: object = field(default=None, repr=False, compare=False)

    @property
    def predicted_overhead_us(self) -> float:
        """The run time the stages add, as the cost model predicts it (microseconds)."""
        return sum(s.cost for s in self.stages)

    @property
    def plan(self) -> ChunkPlan:
        return ChunkPlan(tuple(r for s in self.stages for r in s.regions))

    def to_dict(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes,
            "unchunked_peak_bytes": self.unchunked_peak,
            "final_peak_bytes": self.final_peak,
            "search_seconds": round(self.search_seconds, 3),
            "evaluations": self.evaluations,
            "regions": [
                {
                    "stage": i,
                    "start": r.start,
                    "end": r.end,
                    "seed": r.seed,
                    "dim": r.dim,
                    "chunk": r.chunk,
                    "n_chunks": s.n_chunks,
                    "body_ops": s.body_ops,
                    "regions_in_stage": len(s.regions),
                    "peak_before_bytes": s.peak_before,
                    "peak_after_bytes": s.peak_after,
                    **({"refit_from_n_chunks": s.refit_from} if s.refit_from else {}),
                    # the stage's predicted added run time (all its regions), microseconds
                    "predicted_overhead_us": round(s.cost, 1),
                }
                for i, s in enumerate(self.stages)
                for r in s.regions
            ],
            "predicted_overhead_us": round(self.predicted_overhead_us, 1),
            "cost_model": self.cost_model,
            "notes": list(self.notes),
            **({"lower_bound_bytes": self.lower_bound.nbytes,
                "lower_bound": self.lower_bound.describe()} if self.lower_bound else {}),
        }


class _ModuleProblem:
    """The stage search's view of a module (``stage_search.Problem``): candidates from the
    analyses, states from exact re-estimates of trial rewrites, memoised per module."""

    def __init__(self, mod, target, function: str, opts: SearchOptions, budget: int):
        self.mod, self.target, self.function, self.opts = mod, target, function, opts
        self.budget = budget  # the search's target (the budget less the safety margin)
        self.evaluations = 0
        # per module: (ranked candidates, why none, hottest binding, {(cand, chunk): State});
        # the entry holds its module, so its identity is not reused meanwhile
        self.memo: dict = {}

    def state(self, m, prof=None) -> State:
        if prof is None:
            self.evaluations += 1
            prof = estimate_memory(m, self.target, entry=self.function, weights=False)
        return State(
            need_bytes(prof),
            int(prof.peak_bytes),
            int(prof.runtime_peak_bytes),
            excess_bytes(prof, self.budget),
            prof.peak_op.startswith("call "),
            m,
            prof,
        )

    def candidates(self, st: State):
        cur, fn = st.module, self.function
        if cur not in self.memo:
            # the most memory-heavy bindings that are still plain ops (a chunk call is done)
            hot = [
                e.name
                for e in sorted(st.profile.timeline, key=lambda e: (-e.live_bytes, e.index))
                if not e.op.startswith("call ")
            ][: self.opts.hot_bindings]
            reasons: list[str] = []
            cands = enumerate_candidates(cur, hot, self.opts, fn, reasons)
            # the same region in repeated layers is chunked jointly (one stage, one size);
            # a region that runs past a layer's end may have a prefix with more copies
            ranked = []
            for c in rank_candidates(cands)[: 4 * self.opts.evaluate_top]:
                ranked.append(with_copies(cur, c, fn))
                p = layer_prefix(cur, c, fn, more_than=len(ranked[-1].copies))
                if p is not None and p not in ranked:
                    ranked.append(p)
            self.memo[cur] = (rank_candidates(ranked), reasons, hot[0] if hot else "", {})
        ranked, reasons, hot, _ = self.memo[cur]
        return ranked, reasons, hot

    def child(self, st: State, cand: Candidate, chunk: int) -> State:
        tried = self.memo[st.module][3]
        if (cand, chunk) not in tried:
            # a trial: only the module the search returns is checked (well_formed)
            m = apply_chunk_plan(st.module, ChunkPlan(cand.regions(chunk)), check=False)
            tried[(cand, chunk)] = self.state(m)
        return tried[(cand, chunk)]

    def skip(self, st: State, cand: Candidate, best: Candidate, fit, over: bool) -> bool:
        return shorter_copy(st.module, cand, best, fit, self.opts, self.function, over=over)

    def with_regions(self, regions) -> State | None:
        try:
            m = apply_chunk_plan(self.mod, ChunkPlan(tuple(regions)), check=False)
        except (PassContractError, KeyError, ValueError):
            return None  # a later stage names a binding of an earlier one's rewrite
        return self.state(m)


def _gc_frozen(fn):
    """Run ``fn`` with the objects that exist before it frozen out of Python's cyclic garbage
    collector (``gc.freeze``; unfrozen after). The search makes many short-lived objects, and
    each full collection otherwise traverses the whole heap (torch and TVM hold millions of
    objects): 0.1-0.2 s of a 0.4 s search. Nothing is left uncollected: the search's own
    cycles are still collected, and the frozen objects are collectable again afterwards. A
    caller that froze objects itself (a forking server) keeps them frozen: nothing is done."""

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        if gc.get_freeze_count():
            return fn(*args, **kw)
        gc.freeze()
        try:
            return fn(*args, **kw)
        finally:
            gc.unfreeze()

    return wrapper


def min_budget_for(need: int, unchunked: int) -> int:
    """The smallest budget whose margin-reduced target still admits the peak ``need`` (never
    above the unchunked peak: a budget of that size builds without chunking)."""
    return min(unchunked, max(need + 2**20 if need > 2**25 else need, -(-need * 100 // 97)))


def search_aim(budget_bytes: int, opts: SearchOptions) -> int:
    """The peak the search aims at for a budget: under it by the safety margin."""
    return budget_bytes - max(
        2**20 if budget_bytes > 2**25 else 0, int(budget_bytes * opts.safety_margin)
    )


@_gc_frozen
@caches.scoped
def auto_chunk(
    mod: tvm.IRModule,
    target,
    budget_bytes: int,
    *,
    options: SearchOptions | None = None,
    function: str = "main",
    profile=None,
    explore: int | None = None,
) -> tuple[tvm.IRModule, AutoChunkResult]:
    """Chunk ``mod`` until its estimated peak fits ``budget_bytes`` (or raise).

    ``explore`` (under ``budget_bytes``): search aiming at it, then re-fit the plan found to
    ``budget_bytes`` with fewer calls (the greedy path follows its aim; a lower one can find a
    plan where aiming at the budget stops above it).

    ``profile``: ``estimate_memory(mod, target, entry=function)`` when the caller has it
    already (it is not checked; it saves one estimate).
    """
    tgt = as_target(target)
    gpu = is_gpu(tgt)
    opts = options or SearchOptions.for_target(gpu)
    if options is not None:
        cost_model = "the caller's SearchOptions"
    else:
        cost_model = f"{tgt.kind.name}: " + (
            "constants measured on an H200 (benchmarks/calibrate_cost.py --export-cuda)" if gpu
            else "constants measured on llvm (benchmarks/calibrate_cost.py)"
        )
    t0 = time.perf_counter()
    problem = _ModuleProblem(mod, target, function, opts, budget_bytes)
    if profile is None:
        problem.evaluations += 1
        profile = estimate_memory(mod, target, entry=function, weights=False)
        weights = None
    else:
        weights = profile.weight_bytes
    unchunked = need_bytes(profile)
    aim = budget_bytes
    if unchunked > budget_bytes:  # chunking needed: aim under the budget by the safety margin
        aim = search_aim(budget_bytes, opts)
    low = search_aim(explore, opts) if explore is not None and explore < budget_bytes else aim
    problem.budget = low
    start = problem.state(mod, profile)
    out = search_stages(problem, start, low, opts, t0, refit_target=aim if low < aim else None)
    cur, prof, stages = out.state.module, out.state.profile, out.stages
    if stages:
        check_well_formed(cur, f"chunking {len(stages)} region(s)")
    # the search's estimates skip the weights scan (peaks do not include weights); chunking
    # moves constants into chunk functions but makes or copies none
    wb = weights if weights is not None else weight_bytes(cur, function)
    prof = dataclasses.replace(prof, weight_bytes=wb)
    need = out.state.need
    res = AutoChunkResult(
        budget_bytes,
        unchunked,
        need,
        stages,
        time.perf_counter() - t0,
        problem.evaluations,
        out.blockers,
        cost_model=cost_model,
        profile=prof,
    )
    if need > aim:
        raise BudgetInfeasibleError(
            budget=budget_bytes,
            unchunked_peak=unchunked,
            best_peak=need,
            min_budget=min_budget_for(need, unchunked),
            stages=len(stages),
            peak_site=f"'{prof.peak_binding}' ({prof.peak_op})",
            blockers=out.blockers,
            gpu=gpu,
        )
    return cur, res


@tvm.transform.module_pass(opt_level=0, name="AutoChunk")
class AutoChunk:
    """``relay_passes.AutoChunk(budget_bytes, target)``: the search as a TVM module pass.

    An error raised inside a TVM pass reaches the caller with its type and message (the
    classes are registered with TVM's FFI) but without its fields; call ``auto_chunk``
    directly, or read ``.error``, for those.
    """

    def __init__(self, budget_bytes: int, target="llvm", options: SearchOptions | None = None):
        if not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise PassContractError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self.target = target
        self.options = options
        self.result: AutoChunkResult | None = None
        self.error: Exception | None = None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        try:
            out, self.result = auto_chunk(
                mod, self.target, self.budget_bytes, options=self.options
            )
        except Exception as e:
            self.error = e
            raise
        return out
