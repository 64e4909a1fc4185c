"""Selection for AutoChunk over plain data: rank candidates, fit the largest chunk size.

Imports nothing from TVM (a test checks it): candidates are plain records and the memory of a
chunked module comes from the caller's ``evaluate(chunk) -> bytes`` callback (an exact
re-estimate). Deterministic: explicit tie-breaks by name; every loop is bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .plan import ChunkRegion


@dataclass(frozen=True)
class SearchOptions:
    max_stages: int = 8  # regions applied one after another at most
    hot_bindings: int = 4  # candidate regions must contain one of the top-N live bindings
    window_before: int = 48  # bindings before a hot binding where a region may start
    window_after: int = 64  # bindings after it where a region may end
    evaluate_top: int = 2  # candidates whose chunk size is fitted exactly, per stage
    max_evals_per_candidate: int = 6
    min_extent: int = 8  # do not chunk dims shorter than this
    time_limit_s: float = 300.0
    # the search aims this far under the budget: the run-time model has been seen up to ~3%
    # under the measured peak on chunked modules (GPT S=4096 at 5% of its peak)
    safety_margin: float = 0.03
    # cost model (relative units; see README "AutoChunk cost model")
    call_overhead: float = 20.0  # per chunk: the Relax call, slicing, the in-place write
    op_overhead: float = 1.0  # per op per chunk: one more kernel launch
    small_rows: int = 16  # chunk extents below this lose matmul efficiency
    small_penalty: float = 4.0


@dataclass(frozen=True)
class Candidate:
    function: str
    start: str
    end: str
    seed: str
    dim: int
    extent: int
    granularity: int  # chunk sizes must be multiples of this (reshape splits)
    body_ops: int
    body_bytes: int  # full-size bytes of the tensors the region computes per chunk
    out_bytes: int  # full-size bytes of the region outputs (written whole)
    # (start, end, seed) of identical regions elsewhere (repeated layers), chunked jointly
    # with this one by the same chunk size; bytes and ops above are per copy
    copies: tuple[tuple[str, str, str], ...] = ()

    def region(self, chunk: int) -> ChunkRegion:
        return ChunkRegion(self.start, self.end, self.seed, self.dim, int(chunk), self.function)

    def regions(self, chunk: int) -> tuple[ChunkRegion, ...]:
        """This region and its copies, last in the graph first (applying one leaves the
        binding names of the others as they were)."""
        out = [self.region(chunk)]
        out += [
            ChunkRegion(a, b, s, self.dim, int(chunk), self.function) for a, b, s in self.copies
        ]
        return tuple(reversed(out))

    @property
    def n_regions(self) -> int:
        return 1 + len(self.copies)

    def cost(self, chunk: int, opts: SearchOptions) -> float:
        n = math.ceil(self.extent / chunk)
        per = opts.call_overhead + self.body_ops * opts.op_overhead
        penalty = opts.small_penalty if chunk < opts.small_rows else 1.0
        return n * per * penalty * self.n_regions


@dataclass(frozen=True)
class Fit:
    chunk: int
    peak: int
    cost: float
    evaluations: int


def rank_candidates(cands: list[Candidate]) -> list[Candidate]:
    """Most memory to gain first; then fewer ops per chunk; then by name (deterministic)."""
    return sorted(
        cands,
        key=lambda c: (
            -(c.body_bytes - 3 * c.out_bytes) * c.n_regions,
            c.body_ops,
            c.start,
            c.end,
            c.seed,
            c.dim,
        ),
    )


def fit_chunk(
    cand: Candidate, budget: int, evaluate: Callable[[int], int], opts: SearchOptions
) -> Fit | None:
    """The largest chunk (multiple of the granularity) whose evaluated peak fits ``budget``.

    Memory grows about linearly with the chunk size, so two probes (smallest chunk, half the
    extent) give a line; its solution is verified exactly and stepped down while over budget.
    If even the smallest chunk does not fit, the target becomes "within max(1 MiB, 3%) of the
    smallest chunk's peak" (best effort: the largest chunk that gets there, not chunk 1).
    """
    g = max(1, cand.granularity)
    top = (cand.extent // g) * g
    if top < g or cand.extent // g < 2:
        return None
    seen: dict[int, int] = {}

    def ev(c: int) -> int:
        c = max(g, min(top, (c // g) * g))
        if c not in seen:
            seen[c] = evaluate(c)
        return seen[c]

    lo = g
    m_lo = ev(lo)
    mid = max(g, ((top // 2) // g) * g)
    m_mid = ev(mid)
    target = budget
    if m_lo > budget:
        # this region alone cannot reach the budget (other parts of the graph set a floor):
        # take the largest chunk that gets within a small margin of that floor, not chunk 1
        target = m_lo + max(2**20 if m_lo > 2**25 else 0, (m_lo * 3) // 100)
    if m_mid > m_lo:
        guess = lo + (target - m_lo) * (mid - lo) / (m_mid - m_lo)
    else:
        guess = top
    c = max(g, min(top, int(guess) // g * g))
    while len(seen) < opts.max_evals_per_candidate and c not in seen:
        if ev(c) <= target:
            break
        c = max(g, int(c * 0.8) // g * g)
    # the largest chunk known to meet the target (the smallest chunk always does)
    best = max(k for k, v in seen.items() if v <= target)
    return Fit(best, seen[best], cand.cost(best, opts), len(seen))
