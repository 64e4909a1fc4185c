"""The stage search of AutoChunk over plain data: which regions to chunk, one after another.

Imports nothing from TVM (a test checks it). The caller's ``Problem`` lists the candidates of
a state and evaluates a candidate at a chunk size (an exact re-estimate of the chunked
module); states are plain records whose module and profile the search never looks into.

A stage chunks one region (and its copies in repeated layers) with one chunk size, fitted by
``search.fit_chunk``. The search is a bounded tree: a stage that meets the target only with
chunks shorter than ``small_rows`` also branches into that region at ``small_rows`` plus later
stages (at most two such branches); the cheapest plan that fits wins, else the lowest peak.
A search that misses the target is repeated once with ``floor_slack`` 0. With ``refit_evals``
(the default), a plan of several stages that fits is re-fitted jointly (``refit_calls``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from .plan import ChunkRegion
from .search import Candidate, Fit, SearchOptions, fit_chunk, refit_calls

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class State:
    """A module the search reached, as the search sees it."""

    need: int  # what the budget is checked against: max(static plan, run-time peak)
    planned: int  # the static plan's peak
    runtime: int  # the simulated run-time peak
    excess: int  # bytes above the target summed over the timeline (breaks ties of peaks)
    peak_at_call: bool  # the peak is at a chunk call (chunking plain ops cannot lower it)
    module: object = field(repr=False)
    profile: object = field(repr=False)


@dataclass(frozen=True)
class StageRecord:
    """One greedy stage: a region (and its copies in repeated layers) chunked by one size."""

    region: ChunkRegion
    n_chunks: int
    body_ops: int
    peak_before: int
    peak_after: int
    cost: float
    # every region this stage applied, in application order (the region and its copies)
    applied: tuple[ChunkRegion, ...] = ()
    # the stage's calls before ``refit`` (0: not re-fitted)
    refit_from: int = 0
    candidate: Candidate | None = field(default=None, repr=False, compare=False)

    @property
    def regions(self) -> tuple[ChunkRegion, ...]:
        return self.applied or (self.region,)


class Problem(Protocol):
    def candidates(self, state: State) -> tuple[list[Candidate], list[str], str]:
        """(ranked candidates, why regions failed, the hottest binding's name)."""

    def child(self, state: State, cand: Candidate, chunk: int) -> State:
        """``state`` with ``cand`` chunked by ``chunk`` (memoised by the problem)."""

    def skip(self, state: State, cand: Candidate, best: Candidate, fit: Fit, over: bool) -> bool:
        """Whether ``cand`` is not worth an estimate next to ``best`` at ``fit``."""

    def with_regions(self, regions: tuple[ChunkRegion, ...]) -> State | None:
        """The original module with these regions chunked; None when they cannot be applied."""


@dataclass(frozen=True)
class Outcome:
    state: State
    stages: tuple[StageRecord, ...]
    blockers: tuple[str, ...]


@dataclass
class _Search:
    problem: Problem
    opts: SearchOptions
    target: int
    t0: float
    blockers: list[str] = field(default_factory=list)
    branches: int = 2  # alternative children explored, at most

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.t0 > self.opts.time_limit_s

    def better(self, a: tuple[State, list], b: tuple[State, list]) -> bool:
        """a before b: meets the target; then the cheaper plan (or the lower peak); fewer
        stages."""

        def key(x):
            st, stages = x
            fits = st.need <= self.target
            return (not fits, sum(s.cost for s in stages) if fits else st.need, len(stages))

        return key(a) < key(b)

    def expand(self, cur: State) -> list[tuple[StageRecord, State]]:
        """The next stage from ``cur``: the best child, and when it meets the target only with
        chunks shorter than ``small_rows``, also the same region at ``small_rows``. []: stuck."""
        opts, target, problem = self.opts, self.target, self.problem
        ranked, reasons, hot = problem.candidates(cur)
        if not ranked:
            common = max(set(reasons), key=reasons.count) if reasons else "no legal seed dim"
            self.blockers.append(f"no chunkable region around '{hot or '?'}' ({common})")
            return []
        best = None
        for cand in ranked[: opts.evaluate_top]:
            beat = best[2] if best is not None else None
            if beat is not None and problem.skip(cur, cand, best[1], beat, beat.peak > target):
                continue
            fit = fit_chunk(
                cand,
                target,
                lambda c, cand=cand: (
                    problem.child(cur, cand, c).planned,
                    problem.child(cur, cand, c).runtime,
                ),
                opts,
                beat=beat,
                unchunked=(cur.planned, cur.runtime),
            )
            if fit is None:
                continue
            over = fit.peak > target
            excess = problem.child(cur, cand, fit.chunk).excess
            key = (over, (fit.peak, excess) if over else fit.cost)
            if best is None or key < best[0]:
                best = (key, cand, fit)
        if best is None:
            self.blockers.append(f"no candidate lowers the peak below {cur.need} bytes")
            return []
        _, cand, fit = best

        def child(chunk: int) -> tuple[StageRecord, State]:
            st = problem.child(cur, cand, chunk)
            rec = StageRecord(
                cand.region(chunk),
                -(-cand.extent // chunk),
                cand.body_ops,
                cur.need,
                st.need,
                cand.cost(chunk, opts),
                cand.regions(chunk),
                candidate=cand,
            )
            return rec, st

        # progress: a lower peak, or less memory above the target (chunking the first of two
        # equal layers cannot lower their common peak until the second one is chunked too)
        fitted = problem.child(cur, cand, fit.chunk)
        if fitted.need >= cur.need and fitted.excess >= cur.excess:
            self.blockers.append(f"no candidate lowers the peak below {cur.need} bytes")
            return []
        out = [child(fit.chunk)]
        g = max(1, cand.granularity)
        alt = -(-opts.small_rows // g) * g
        if (
            fit.peak <= target
            and fit.chunk < opts.small_rows
            and alt < cand.extent
            and not fitted.peak_at_call
        ):
            # later stages help only while the peak is at a plain op: at a chunk call it is
            # that call's frame, which chunking other regions does not lower
            other = problem.child(cur, cand, alt)
            if other.need < cur.need and not other.peak_at_call:
                out.append(child(alt))
        return out

    def search(self, cur: State, stages: list, depth: int) -> tuple[State, list]:
        """The best (state, stages) in the tree below ``cur``, itself included."""
        best = (cur, stages)
        if cur.need <= self.target or depth >= self.opts.max_stages:
            return best
        if self.out_of_time():
            self.blockers.append(f"search stopped after {self.opts.time_limit_s:.0f}s")
            return best
        for i, (rec, st) in enumerate(self.expand(cur)):
            if i > 0:
                if self.branches <= 0:
                    break
                self.branches -= 1
            r = rec.region
            log.info(
                "stage %d%s: chunk %s..%s along %s[%d] by %d: %d -> %d bytes",
                depth + 1, " (alternative)" if i else "", r.start, r.end, r.seed, r.dim,
                r.chunk, cur.need, st.need,
            )
            found = self.search(st, [*stages, rec], depth + 1)
            if self.better(found, best):
                best = found
        return best

    def refit(self, cur: State, stages: list, last: bool = False) -> tuple[State, list]:
        """Fewer calls per stage with the other stages in place, the costliest stage first;
        a change is kept only when the whole plan still fits. The last stage was fitted with
        every other one in place already: it is re-fitted only when ``last`` (the plan was
        searched aiming lower than ``self.target``)."""
        stages = list(stages)
        upto = len(stages) if last else len(stages) - 1
        for i in sorted(range(upto), key=lambda i: -stages[i].cost):
            st = stages[i]
            if st.candidate is None or st.n_chunks <= 2:
                continue
            if self.out_of_time():
                break
            found: dict = {}

            def plan_peak(chunk, i=i, st=st, found=found):
                regions: list = []
                for j, other in enumerate(stages):
                    regions += st.candidate.regions(chunk) if j == i else other.regions
                state = self.problem.with_regions(tuple(regions))
                if state is None:
                    return None
                found[chunk] = state
                return state.need

            fit = refit_calls(st.candidate, st.n_chunks, self.target, plan_peak, self.opts)
            if fit is None:
                continue
            cur = found[fit.chunk]
            n = -(-st.candidate.extent // fit.chunk)
            log.info("re-fit stage %d with the others in place: %d -> %d calls",
                     i + 1, st.n_chunks, n)
            stages[i] = dataclasses.replace(
                st,
                region=st.candidate.region(fit.chunk),
                n_chunks=n,
                cost=fit.cost,
                applied=st.candidate.regions(fit.chunk),
                refit_from=st.refit_from or st.n_chunks,
            )
        if stages and stages[-1].peak_after != cur.need:
            # the plan's peak is what the last stage leaves, with every re-fit in place
            stages[-1] = dataclasses.replace(stages[-1], peak_after=cur.need)
        return cur, stages


def search_stages(
    problem: Problem,
    start: State,
    target: int,
    opts: SearchOptions,
    t0: float | None = None,
    refit_target: int | None = None,
) -> Outcome:
    """The plan of stages that meets ``target`` at the least predicted cost, else the one
    with the lowest peak (its blockers say why it stops there). ``refit_target`` (above
    ``target``): the plan found is then re-fitted to it, every stage, with fewer calls."""
    s = _Search(problem, opts, target, time.perf_counter() if t0 is None else t0)
    cur, stages = s.search(start, [], 0)
    if cur.need > target and opts.floor_slack > 0:
        # the slack that regions unable to reach the target alone may leave adds up over
        # stages: search again taking every such region's lowest peak
        log.info("budget missed by %d bytes: searching again without floor slack",
                 cur.need - target)
        s.blockers.clear()
        s.branches = 2
        s.opts = dataclasses.replace(opts, floor_slack=0.0)
        again = s.search(start, [], 0)
        if s.better(again, (cur, stages)):
            cur, stages = again
    if refit_target is not None and refit_target > target and stages:
        if cur.need <= refit_target:  # searched aiming low: as few calls as the real aim needs
            s.target = refit_target
            s.opts = dataclasses.replace(s.opts, refit_evals=max(s.opts.refit_evals, 4))
            cur, stages = s.refit(cur, stages, last=True)
    elif s.opts.refit_evals > 0 and cur.need <= target and len(stages) >= 2:
        cur, stages = s.refit(cur, stages)
    return Outcome(cur, tuple(stages), tuple(s.blockers))
