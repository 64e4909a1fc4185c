"""Selection for AutoChunk over plain data: rank candidates, fit the fewest chunks.

Imports nothing from TVM (a test checks it): candidates are plain records and the memory of a
chunked module comes from the caller's ``evaluate(chunk) -> bytes`` callback (an exact
re-estimate; or its static-plan and run-time parts). Deterministic: explicit tie-breaks by
name; every loop is bounded.
"""

from __future__ import annotations

import dataclasses
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
    # a later start of the best region is not estimated unless it could save this share
    # (candidates.shorter_copy)
    beat_min_saving: float = 0.05
    max_evals_per_candidate: int = 8
    # calls of the many-chunks probe (fit_chunk)
    probe_chunks: int = 32
    # estimates at the fewest calls predicted to fit, before the probes (fit_chunk)
    guess_probes: int = 3
    chunk_tolerance: float = 0.1  # stop refining when at most 10% fewer calls could fit
    max_calls: int = 1024  # chunk calls of one stage (all copies) at most
    # the chunk for n calls: "short" (the last chunk as short as possible) or "balanced"
    # (other kernel shapes: build's fallback when TVM cannot compile a kernel; chunk_for_calls)
    last_chunk: str = "short"
    # how far above its floor a region that cannot reach the budget alone may stay, for
    # fewer chunks (a search that then misses is repeated with 0: stage_search)
    floor_slack: float = 0.03
    min_extent: int = 8  # do not chunk dims shorter than this
    time_limit_s: float = 300.0
    # estimates per stage of the joint re-fit (refit_calls): fewer calls are faster on GPUs
    # (launches) and, with scheduled kernels, on CPUs too (benchmarks/refit.py)
    refit_evals: int = 4
    # the search aims this far under the budget: the run-time model can be a few percent
    # under the measured peak (docs/design.md)
    safety_margin: float = 0.03
    # cost model, microseconds added per chunk (docs/design.md "AutoChunk cost model"):
    # llvm's from benchmarks/calibrate_cost.py (a test keeps them equal to its results)
    call_overhead: float = 3.77  # per chunk: the Relax call, slicing, the in-place write
    op_overhead: float = 0.161  # per op per chunk: one more kernel call
    # per KiB per chunk of the tensors each chunk reads whole (weights, keys and values, ...)
    reread_overhead: float = 0.1926
    small_rows: int = 16  # chunks shorter than this may be charged small_penalty
    small_penalty: float = 2.0  # x the per-chunk cost below small_rows rows
    # chunks of 4 * row_multiple rows or more are multiples of it where that keeps the number
    # of calls: the CPU matmul tile is 4 rows, and an odd chunk (97 rows) runs its matmuls
    # 2.5-4x slower per row (chunk_for_calls)
    row_multiple: int = 4

    @classmethod
    def for_target(cls, gpu: bool, **kw) -> SearchOptions:
        """The defaults for a GPU target (``GPU_OPTIONS``: the CUDA cost constants)
        or a CPU one (the measured llvm defaults); ``kw`` overrides either.
        ``lowering.is_gpu(target)`` tells which (this module imports nothing from TVM)."""
        return cls(**{**(GPU_OPTIONS if gpu else {}), **kw})


# The CUDA cost constants, from benchmarks/results/cost_calibration_cuda.jsonl (a test keeps
# them equal): a chunk costs about the same whatever its ops, since FuseOps merges them
# (docs/gpu.md has the measurements and what the model does not capture).
CUDA_COSTS = {
    "call_overhead": 22.0,
    "op_overhead": 0.0,
    "reread_overhead": 0.0004,
    "small_rows": 16,
    "small_penalty": 1.0,
}
# chunk sizes the CUDA kernels favour: not measured on a GPU yet
GPU_OPTIONS = {**CUDA_COSTS, "row_multiple": 1}


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
    # bytes of the tensors defined outside the chunk that every chunk reads whole (not
    # sliced): weights, the keys and values of attention chunked by query rows
    reread_bytes: int = 0
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
        """Predicted run time added by chunking, in microseconds (all copies)."""
        n = math.ceil(self.extent / chunk)
        per = (
            opts.call_overhead
            + self.body_ops * opts.op_overhead
            + self.reread_bytes / 1024 * opts.reread_overhead
        )
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


def chunk_for_calls(
    extent: int, n: int, gran: int = 1, *, balanced: bool = False, prefer: int = 1
) -> int:
    """``_chunk_for_calls``'s chunk, moved to a multiple of ``prefer`` (and ``gran``) when it
    is at least 4 such multiples long and the multiple below or above it makes ``n`` calls
    too (``SearchOptions.row_multiple``: kernels are tiled by that many rows). Balanced chunks
    stay ``ceil(extent / n)``: they are the fallback that makes other kernel shapes."""
    c = _chunk_for_calls(extent, n, gran, balanced=balanced)
    m = prefer * max(1, gran) // math.gcd(prefer, max(1, gran))
    if prefer <= 1 or balanced or c % m == 0 or c < 4 * m:
        return c
    for k in (c // m * m, -(-c // m) * m):
        if k <= extent and -(-extent // k) == n:
            return k
    return c


def _chunk_for_calls(extent: int, n: int, gran: int = 1, *, balanced: bool = False) -> int:
    """The chunk (a multiple of ``gran``) that computes ``extent`` rows in ``n`` calls.

    ``n`` divides the extent: ``extent / n``, no last, shorter chunk. Otherwise (3 or more
    calls) the largest chunk that needs ``n`` calls, so that the last chunk is as short as
    possible: the last chunk runs in a function of its own (its own static shape), and the
    VM's pool keeps that function's frame beside the full chunk's (another size: no reuse).
    So n calls of ``c`` rows plus a short tail hold about one frame of ``c`` rows, while
    balanced chunks (``ceil(extent / n)`` rows each, the last nearly as long) hold two frames
    of about ``extent / n`` rows (docs/design.md "Chunk sizes"). Two calls over an odd
    extent are balanced (the two frames then weigh about as much as one of ``extent - 1``).
    ``balanced``: always ``ceil(extent / n)`` rounded up to ``gran`` (the previous choice).
    """
    g = max(1, gran)
    top = max(g, extent // g * g)
    if n <= 1:
        return top
    even = min(top, -(-(-(-extent // n)) // g) * g)  # ceil(extent / n), to a multiple of g
    if extent % n == 0 and (extent // n) % g == 0:
        return extent // n
    if n > 2 and not balanced:
        c = (extent - 1) // (n - 1) // g * g  # the largest with (n - 1) * c < extent
        if c >= g and -(-extent // c) == n:
            return c
    return even


def fit_chunk(
    cand: Candidate,
    budget: int,
    evaluate: Callable[[int], int | tuple[int, int]],
    opts: SearchOptions,
    *,
    beat: Fit | None = None,
    unchunked: tuple[int, int] | None = None,
) -> Fit | None:
    """The fewest chunks (the largest chunk size) whose evaluated peak fits ``budget``.

    ``evaluate(chunk)`` gives the chunked module's peak, or its (static plan, run-time) peaks
    (the peak is the larger). The search is over the number of calls; each number is tried
    at one chunk size, ``chunk_for_calls`` (a divisor of the extent, else the largest chunk
    for that number). Probes: two chunks; then ``opts.probe_chunks`` chunks. The answer is
    bracketed between a chunk that fits and one that does not, and the bracket is narrowed
    by predicting the peak between them (the static plan linear in the chunk, the run-time
    peak linear in the rows of the chunk and the last, shorter chunk; the chord of a convex
    curve never overshoots) and trying the fewest calls predicted to fit, until those would
    save at most ``opts.chunk_tolerance`` of the calls of the best fit so far (or the bracket
    holds no number of chunks that would save more), or ``opts.max_evals_per_candidate``.

    If even ``probe_chunks`` chunks do not fit, 8x as many are tried, then the smallest chunk
    (the granularity, or more rows so that the stage makes at most ``opts.max_calls`` calls
    over every copy of the region): if that does not fit either (other parts of the graph set
    a floor), the target becomes "within ``opts.floor_slack`` of that floor" (``_slack``)
    (best effort: the largest chunk that gets there, not chunk 1).

    ``unchunked``: the (static plan, run-time) peaks before this stage. That point (one call)
    closes the bracket, and the first tries are guessed from it (``guess``: the fewest calls
    predicted to fit; a budget under half of it skips the two-chunk probe). The probes
    follow only when no guess fits.

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
    if opts.last_chunk not in ("short", "balanced"):
        raise ValueError(f"last_chunk must be 'short' or 'balanced', got {opts.last_chunk!r}")
    balanced = opts.last_chunk == "balanced"
    pm = opts.row_multiple
    seen: dict[int, int] = {}  # chunk -> evaluated peak
    parts: dict[int, tuple[int, int]] = {}  # chunk -> (static plan, run-time) peaks
    virtual: set[int] = set()  # keys of seen that were not evaluated (the unchunked point)

    def tries() -> int:
        return len(seen) - len(virtual)

    def tried() -> list[int]:
        """The chunks evaluated (the unchunked point is not), smallest first."""
        return sorted(k for k in seen if k not in virtual)

    def fitting() -> list[int]:
        """The chunks evaluated that fit the target."""
        return [k for k in tried() if seen[k] <= target]

    def snap(c: int) -> int:
        """The chunk tried for as many calls as chunks of ``c`` rows make."""
        c = max(g, min(top, c // g * g))
        return chunk_for_calls(cand.extent, -(-cand.extent // c), g, balanced=balanced, prefer=pm)

    def rows(c: int) -> int:
        """Rows of the frames held at once with chunks of ``c``: a chunk and the last one."""
        return c + cand.extent % c if c else 0

    def ev(c: int) -> int:
        if c not in seen:
            r = evaluate(c)
            parts[c] = (int(r), int(r)) if isinstance(r, int) else (int(r[0]), int(r[1]))
            seen[c] = max(parts[c])
        return seen[c]

    def n_of(c: int) -> int:
        return -(-cand.extent // c)

    def line(p: int, q: int, pq: dict) -> Callable[[int], float]:
        """The peak predicted at a chunk on the lines through chunks ``p`` and ``q`` (their
        (static plan, run-time) peaks in ``pq``), within or beyond them: the static plan holds
        the largest frame, about linear in the chunk; the run-time pool holds the chunk's and
        the last, shorter chunk's (a function and a frame of its own), linear in both rows."""
        (s_p, r_p), (s_q, r_q) = pq[p], pq[q]

        def predict(k: int) -> float:
            s = s_p + (s_q - s_p) * (k - p) / (q - p)
            d = rows(q) - rows(p)
            r = r_p + (r_q - r_p) * (rows(k) - rows(p)) / d if d else max(r_p, r_q)
            return max(s, r)

        return predict

    def fewest(predict: Callable[[int], float], n_from: int, n_to: int) -> int | None:
        """The chunk of the fewest calls in [n_from, n_to) predicted to fit."""
        for n in range(n_from, n_to):
            k = chunk_for_calls(cand.extent, n, g, balanced=balanced, prefer=pm)
            if n_of(k) == n and predict(k) <= target:
                return k
        return None

    def guess(lo: int) -> int:
        """Estimates before the probe of ``lo`` (``probe_chunks`` calls) when the peak before
        the stage is known: the fewest calls (fewer than that) predicted to fit, first with
        memory proportional to the chunk (the line through nothing at no rows and the
        unchunked point: two chunks when the budget is at least half of it), then on the line
        through the two smallest chunks tried (none fitted: a secant), at most
        ``opts.guess_probes`` times. Returns the probe to go on with: the chunk that fits (the
        bracket for the refinement; ``lo`` is then never estimated); else ``lo``, or the
        smallest chunk tried when the last line says that ``lo`` cannot fit either (it is then
        the many-chunks probe). The proportional line is optimistic (memory that does not
        shrink with the chunk is left out); when it misses, the secant puts the next try about
        where the probe's chord would have."""
        def last_line() -> Callable[[int], float]:
            ks = tried()  # none fits
            if not ks:
                return line(0, cand.extent, {0: (0, 0), **parts})
            p, q = ks[0], ks[1] if len(ks) > 1 else cand.extent
            if q == cand.extent and parts[p][1] > parts[q][1]:
                # the run-time peak rose on chunking (the chunk call's frame is held beside
                # what lived before): its line through the unchunked point would say that no
                # shorter chunk fits. Shorter chunks shrink that frame, so the run-time peak is
                # taken as at p (no higher), the static plan on its line
                s_p, s_q, r_p = parts[p][0], parts[q][0], parts[p][1]
                return lambda k: max(s_p + (s_q - s_p) * (k - p) / (q - p), r_p)
            return line(p, q, parts)

        def even(c: int) -> int:
            """``c``, or a chunk that divides the extent for at most a third more calls (the
            first guess only: it is crude): an estimate with a last, shorter chunk legalizes
            and walks a second function. The refinement below may still try fewer calls."""
            n = n_of(c)
            if cand.extent % c == 0:
                return c
            for m in range(n + 1, n + max(1, n // 3) + 1):
                k = chunk_for_calls(cand.extent, m, g, balanced=balanced, prefer=pm)
                if cand.extent % k == 0 and n_of(k) == m and k not in seen:
                    return k
            return c

        def shrinks() -> bool:
            """Both peaks fall with the chunk between the two smallest chunks tried (or the
            smallest and the unchunked point): the line can be trusted to say ``lo`` does not
            fit. Not so when the unchunked peak is set elsewhere (a later stage: a chunk call's
            frame can make the run-time peak rise above the one before chunking)."""
            ks = tried()
            q = ks[1] if len(ks) > 1 else cand.extent
            return all(a < b for a, b in zip(parts[ks[0]], parts[q]))

        for _ in range(opts.guess_probes):
            if fitting():
                break
            low = min(tried(), default=cand.extent)
            c = fewest(last_line(), n_of(low) + 1, max(2, opts.probe_chunks))
            if c is None or c in seen:
                break
            ev(even(c) if low == cand.extent else c)  # a secant's guess is taken as it is
        fits = fitting()
        if fits:
            return max(fits)
        low = min(tried(), default=None)
        if low is not None and lo < low < mid and shrinks() and last_line()(lo) > target:
            return low
        return lo

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
            return Fit(c, m, cand.cost(c, opts), tries())
    mid = snap(-(-cand.extent // 2))
    lo = snap(-(-cand.extent // max(2, opts.probe_chunks)))
    if unchunked is not None and lo < mid and mid not in seen:
        # the unchunked point (one call) is a bracket (it is not a try: never taken, not
        # counted), and the first tries are guessed from it (guess: under half of it, two
        # chunks, which keep about half of the region's memory or more, are not tried)
        seen[cand.extent] = max(unchunked)
        parts[cand.extent] = (int(unchunked[0]), int(unchunked[1]))
        virtual.add(cand.extent)
        lo = guess(lo)
        if ev(lo) > target and seen[lo] >= seen[cand.extent]:
            ev(mid)  # 16x more chunks than two saved nothing: as below
    elif ev(mid) <= target:
        return Fit(mid, seen[mid], cand.cost(mid, opts), tries())  # two chunks: the fewest
    if ev(lo) > target and mid in seen and seen[lo] >= seen[mid]:
        # 16x more chunks saved nothing: the peak is set elsewhere, not by this region's chunk
        return Fit(mid, seen[mid], cand.cost(mid, opts), tries())
    # the smallest chunk tried: the granularity, unless that makes more than max_calls calls
    # (over every copy of the region): each call is a binding the estimate walks, and chunks
    # of a few rows are too slow to be worth it anyway
    smallest = snap(-(-cand.extent * cand.n_regions // max(1, opts.max_calls)))
    if seen[lo] > target and lo > smallest:
        # 8x more chunks before the smallest chunk (on long dims that one is costly to
        # evaluate: one call per row), but not under small_rows rows
        lo2 = snap(max(-(-cand.extent // (8 * max(2, opts.probe_chunks))), opts.small_rows))
        floor = ev(lo2) if smallest < lo2 < lo and ev(lo2) <= target else ev(smallest)
        if floor > target:
            # this region alone cannot reach the budget (other parts of the graph set a floor):
            # take the largest chunk that gets within a small margin of that floor, not chunk 1
            target = floor + _slack(floor, opts)
    elif seen[lo] > target:  # lo is the smallest chunk: it is the floor
        target = seen[lo] + _slack(seen[lo], opts)

    while tries() < opts.max_evals_per_candidate:
        fits = fitting()
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
        # the next try: the fewest calls whose predicted peak fits. The static plan holds the
        # largest frame, about linear in the chunk; the run-time pool holds the chunk's and the
        # last, shorter chunk's (a function and a frame of its own), linear in both their rows
        c = fewest(line(ok, bad, parts), n_of(bad) + 1, n_of(ok))
        if c is None or c in seen:
            break  # the line puts the crossing at ok: nothing fewer fits
        if n_of(ok) - n_of(c) <= int(opts.chunk_tolerance * n_of(ok)):
            break  # it would save at most the tolerance of ok's calls: not worth an estimate
        ev(c)
    fits = fitting()
    if not fits:
        return None
    best = max(fits)
    return Fit(best, seen[best], cand.cost(best, opts), tries())


def _slack(floor: int, opts: SearchOptions) -> int:
    """How far above a region's floor a cheaper chunk may leave the peak (floor mode)."""
    if opts.floor_slack <= 0:
        return 0
    return max(2**20 if floor > 2**25 else 0, int(floor * opts.floor_slack))


def refit_calls(
    cand: Candidate,
    n_now: int,
    target: int,
    evaluate: Callable[[int], int | None],
    opts: SearchOptions,
) -> Fit | None:
    """Fewer calls for one stage of a plan that fits, the other stages in place.

    A greedy stage is fitted before the later stages exist: a region that cannot reach the
    budget alone is driven to its floor, and the next stage then chunks the region whose
    tensors set that floor; with it chunked, the first one may need far fewer calls
    (docs/design.md). The calls tried are the current ones halved k times (k = 1..K, K the
    last that leaves at least two): half first (a stage that cannot do with half its calls
    costs one estimate), then the fewest (K), then a bisection over k, at most
    ``opts.refit_evals`` estimates in all (the peak grows with the chunk, so the fits are
    the k up to some point). ``evaluate(chunk)`` is the whole plan's peak with this stage at
    ``chunk`` (None: the plan cannot be applied so, e.g. a later stage names a binding this
    one's rewrite made). Returns the fewest calls found that fit (the fit's ``evaluations``:
    all estimates made), or None when half did not fit.
    """
    g = max(1, cand.granularity)
    balanced = opts.last_chunk == "balanced"
    pm = opts.row_multiple
    chunks, n = [], n_now  # chunks[k - 1]: the chunk for the calls halved k times
    while n // 2 >= 2:
        c = chunk_for_calls(cand.extent, n // 2, g, balanced=balanced, prefer=pm)
        if -(-cand.extent // c) >= n:  # the granularity allows no fewer calls
            break
        n = -(-cand.extent // c)
        chunks.append(c)
    best, evals, lo, hi = None, 0, 0, len(chunks) + 1  # k = lo fits; k >= hi does not
    while evals < opts.refit_evals and hi - lo > 1:
        k = 1 if lo == 0 else (len(chunks) if hi == len(chunks) + 1 else (lo + hi) // 2)
        peak = evaluate(chunks[k - 1])
        evals += 1
        if peak is None or peak > target:
            if k == 1:
                break
            hi = k
            continue
        lo = k
        best = Fit(chunks[k - 1], int(peak), cand.cost(chunks[k - 1], opts), evals)
    return dataclasses.replace(best, evaluations=evals) if best is not None else None
