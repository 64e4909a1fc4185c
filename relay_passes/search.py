"""Selection for AutoChunk over plain data: rank candidates, fit the fewest chunks.

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
    probe_chunks: int = 32  # the second probe: this many chunks (the first is two)
    chunk_tolerance: float = 0.1  # stop refining when at most 10% fewer chunks could fit
    max_calls: int = 1024  # chunk calls of one stage (all copies) at most
    # a region that cannot reach the budget alone may leave the peak this far (and at least
    # 1 MiB above 32 MiB) above its smallest, for fewer chunks; a search that then misses the
    # budget is repeated with 0 (auto_chunk)
    floor_slack: float = 0.03
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


def balanced_chunk(extent: int, chunk: int, gran: int = 1) -> int:
    """The smallest chunk (a multiple of ``gran``) that needs as few chunks as ``chunk`` (rounded
    down to a multiple of ``gran``) does.

    ``n = ceil(extent / chunk)`` calls cost the same whatever the chunk, and a shorter chunk
    keeps less live per call (and often leaves no shorter last chunk to compile): 4096 rows
    by 1196 are 4 chunks, as by 1024.
    """
    g = max(1, gran)
    c = max(g, chunk // g * g)
    n = -(-extent // c)
    return -(-(-(-extent // n)) // g) * g


def fit_chunk(
    cand: Candidate,
    budget: int,
    evaluate: Callable[[int], int],
    opts: SearchOptions,
    *,
    beat: Fit | None = None,
) -> Fit | None:
    """The fewest chunks (the largest chunk size, balanced) whose evaluated peak fits ``budget``.

    Only chunk sizes that are the smallest for their number of chunks are tried
    (``balanced_chunk``). Probes: two chunks; then ``opts.probe_chunks`` chunks; the answer is
    bracketed between a chunk that fits and one that does not, and the bracket is narrowed by
    interpolating the peak linearly in the chunk size (memory grows about linearly with it, and
    the chord of a convex curve never overshoots), until no number of chunks in between would
    be cheaper by more than ``opts.chunk_tolerance``, or ``opts.max_evals_per_candidate``.

    If even ``probe_chunks`` chunks do not fit, 8x as many are tried, then the smallest chunk
    (the granularity, or more rows so that the stage makes at most ``opts.max_calls`` calls
    over every copy of the region): if that does not fit either (other parts of the graph set
    a floor), the target becomes "within ``opts.floor_slack`` (max(1 MiB, 3%)) of that floor"
    (best effort: the largest chunk that gets there, not chunk 1).

    ``beat``: the best fit found so far for another candidate. This one is first evaluated at
    that fit's chunk and dropped (None) after that one evaluation when it cannot beat it: it
    does not fit there and one more chunk would cost no less; or it needs no less memory
    there and costs no less there (two seeds of one region often give the same chunked
    module); or, when the best misses the budget, it is at its smallest chunk and no lower.
    Within 1% of the best's peak there but cheaper (fewer ops), it is taken at that chunk.
    """
    g = max(1, cand.granularity)
    top = (cand.extent // g) * g
    if top < g or cand.extent // g < 2:
        return None
    seen: dict[int, int] = {}

    def snap(c: int) -> int:
        return balanced_chunk(cand.extent, max(g, min(top, c)), g)

    def ev(c: int) -> int:
        if c not in seen:
            seen[c] = evaluate(c)
        return seen[c]

    def n_of(c: int) -> int:
        return -(-cand.extent // c)

    target = budget
    if beat is not None:
        c = snap(beat.chunk)
        m = ev(c)
        if beat.peak > budget:
            # the best so far misses the budget (it is compared by peak): this one needs a
            # lower peak, and at the smallest chunk it has none
            if c == g and m >= beat.peak:
                return None
        elif m > target:
            # it needs more chunks than the best: at least one more call
            if cand.cost(snap(-(-cand.extent // (n_of(c) + 1))), opts) >= beat.cost:
                return None
        elif m >= beat.peak and cand.cost(c, opts) >= beat.cost:
            return None  # no less memory at the best's chunk, no cheaper there
        elif m >= beat.peak - beat.peak // 100:
            # about the same peak at the same chunk (within 1%): the same memory curve (the
            # region differs by a cheap op or two at its start), so that chunk it is
            return Fit(c, m, cand.cost(c, opts), len(seen))
    mid = snap(-(-cand.extent // 2))
    if ev(mid) <= target:
        return Fit(mid, seen[mid], cand.cost(mid, opts), len(seen))  # two chunks: the fewest
    lo = snap(-(-cand.extent // max(2, opts.probe_chunks)))
    if ev(lo) > target and seen[lo] >= seen[mid]:
        # 16x more chunks saved nothing: the peak is set elsewhere, not by this region's chunk
        return Fit(mid, seen[mid], cand.cost(mid, opts), len(seen))
    # the smallest chunk tried: the granularity, unless that makes more than max_calls calls
    # (over every copy of the region): each call is a binding the estimate walks, and chunks
    # of a few rows are too slow to be worth it anyway
    smallest = snap(-(-cand.extent * cand.n_regions // max(1, opts.max_calls)))
    if seen[lo] > target and lo > smallest:
        # 8x more chunks before the smallest chunk (on long dims that one is costly to
        # evaluate: one call per row)
        lo2 = snap(-(-cand.extent // (8 * max(2, opts.probe_chunks))))
        floor = ev(lo2) if smallest < lo2 < lo and ev(lo2) <= target else ev(smallest)
        if floor > target:
            # this region alone cannot reach the budget (other parts of the graph set a floor):
            # take the largest chunk that gets within a small margin of that floor, not chunk 1
            target = floor + _slack(floor, opts)
    elif seen[lo] > target:  # lo is the smallest chunk: it is the floor
        target = seen[lo] + _slack(seen[lo], opts)

    while len(seen) < opts.max_evals_per_candidate:
        fits = [k for k, v in seen.items() if v <= target]
        if not fits:
            break
        ok = max(fits)
        above = [k for k, v in seen.items() if v > target and k > ok]
        if not above:
            break
        bad = min(above)
        # stop when no chunk count between them would save more than the tolerance
        if n_of(ok) - n_of(bad) <= max(1, int(opts.chunk_tolerance * n_of(bad))):
            break
        m_ok, m_bad = seen[ok], seen[bad]
        guess = ok + (target - m_ok) * (bad - ok) / max(1, m_bad - m_ok)
        c = snap(int(guess))
        if c <= ok or c >= bad or c in seen:
            break  # the line puts the crossing at ok: nothing fewer fits
        ev(c)
    fits = [k for k, v in seen.items() if v <= target]
    if not fits:
        return None
    best = max(fits)
    return Fit(best, seen[best], cand.cost(best, opts), len(seen))


def _slack(floor: int, opts: SearchOptions) -> int:
    """How far above a region's floor a cheaper chunk may leave the peak (floor mode)."""
    if opts.floor_slack <= 0:
        return 0
    return max(2**20 if floor > 2**25 else 0, int(floor * opts.floor_slack))
