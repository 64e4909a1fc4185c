"""AutoChunk: find chunk regions and chunk sizes so that one call fits a memory budget.

Where it belongs: on a high-level Relax module, before legalization (``autochunk_pipeline``
puts it first). It reads the module with the analyses (``estimate_memory``,
``chunk_region.analyze_region``), decides with ``search`` (plain Python), and changes IR only
through ``rewrite.apply_chunk_plan``. Loop (bounded): estimate -> the most memory-heavy bindings
of the entry function -> candidate regions around them x legal seed dims -> rank -> fit the
fewest chunks that meet the budget on the best candidates (exact re-estimates) -> apply
-> repeat until the estimate fits, or no candidate helps (then ``BudgetInfeasibleError`` with
the unchunked peak, the best reached, where it is and what blocks going lower).

A stage chunks one region, or the same region in every repeated layer (``with_copies``) with
one chunk size. The search is a bounded tree: a stage that meets the budget only with chunks
shorter than ``small_rows`` also branches into that region at ``small_rows`` plus later stages
(at most two such branches); the cheapest plan that fits wins, else the lowest peak seen.
If the budget is missed, the search runs once more with ``floor_slack`` 0 (every region that
cannot reach the budget alone takes its lowest peak), reusing the states it has evaluated.
On GPU targets (``SearchOptions.refit_evals``), a plan of several stages that fits is then
re-fitted jointly (``refit``: each stage but the last, the costliest first, halves its calls
while the whole plan still fits).

Not handled yet: regions inside callees; a full dynamic programme over stages (a beam that
also explored each stage's runner-up found no better plan on the benchmark models).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import time
from dataclasses import dataclass, field

import tvm
from tvm import relax

from . import _compat as C
from .alias import _tensor_leaves
from .chunk_region import (
    RegionAnalysis,
    _index,
    _reads_by_block,
    analyze_region,
    block_layout,
)
from .errors import BudgetInfeasibleError, PassContractError
from .estimate_memory import estimate_memory, weight_bytes
from .pipeline import as_target, is_gpu
from .plan import ChunkPlan, ChunkRegion, human_bytes
from .rewrite import apply_chunk_plan, check_well_formed
from .search import (
    Candidate,
    SearchOptions,
    fit_chunk,
    rank_candidates,
    refit_calls,
)

log = logging.getLogger(__name__)


def need_bytes(prof) -> int:
    """What a budget is checked against: max(static plan, simulated run-time peak)."""
    return max(int(prof.peak_bytes), int(prof.runtime_peak_bytes))


def excess_bytes(prof, target: int) -> int:
    """Memory above ``target`` summed over the entry function's timeline (byte x bindings).

    Breaks ties between plans with the same peak: a model whose peak occurs in several layers
    that differ slightly (no joint copies) only gets below it when each one is chunked.
    """
    return sum(max(0, e.live_bytes - target) for e in prof.timeline)


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
    # the stage's calls before ``refit`` (0: not re-fitted); ``peak_before``/``peak_after``
    # are on the search path, with that many calls
    refit_from: int = 0
    candidate: Candidate | None = field(default=None, repr=False, compare=False)

    @property
    def regions(self) -> tuple[ChunkRegion, ...]:
        return self.applied or (self.region,)


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
            "predicted_overhead_us": round(sum(s.cost for s in self.stages), 1),
            "cost_model": self.cost_model,
        }


def layer_prefix(
    mod, cand: Candidate, function: str = "main", more_than: int = 0
) -> Candidate | None:
    """The prefix of ``cand``'s region with the most copies, more than ``more_than`` (see
    ``with_copies``; pass the number ``cand`` itself has), with its copies; else None. Of
    prefixes with as many copies, the longest.

    A region that runs past the end of a repeated layer (into the next layer's row-local
    prefix: its LayerNorm, its q/k/v projection) has no copy in the last layer, and chunking
    some of several equal layers cannot lower their common peak. The prefix must keep at
    least half of the region (a layer boundary, not a short motif that happens to repeat).
    """
    func = mod[function]
    layout = block_layout(func, cand.start)
    if layout is None or cand.end not in layout[0]:
        return None
    names, keys = layout
    j, e = names.index(cand.start), names.index(cand.end)
    # the most repeats first (every layer), then the longest; at least half the region
    reps = {e2: _repeats(keys, j, e2) for e2 in range(j + (e - j) // 2, e)}  # op keys only
    best = None
    for e2 in sorted(reps, key=lambda x: (-reps[x], -x)):
        have = len(best.copies) if best is not None else more_than
        if reps[e2] <= have:
            break  # no shorter prefix can have more copies
        ra = analyze_region(mod, cand.start, names[e2], cand.seed, cand.dim, function=function)
        if not ra.legal:
            continue
        # a same-op copy may still differ (e.g. the last layer's outputs): count real ones
        shorter = with_copies(mod, _candidate(ra, func), function)
        if len(shorter.copies) > have:
            best = shorter
    return best


def _repeats(keys: list[str], j: int, e: int) -> int:
    """How many disjoint copies of ``keys[j..e]`` the block has besides itself."""
    pat, n = keys[j : e + 1], e - j + 1
    first = pat[0]
    count, k = 0, 1
    while k + n <= len(keys):
        if keys[k] == first and (k + n - 1 < j or k > e) and keys[k : k + n] == pat:
            count += 1
            k += n
        else:
            k += 1
    return count


def with_copies(mod, cand: Candidate, function: str = "main") -> Candidate:
    """``cand`` plus the identical regions elsewhere in the function (repeated layers).

    A copy has the same op sequence, its seed is the binding just before it (as for ``cand``),
    and it is legal along the same dim with the same extent, ops and bytes. Copies do not
    overlap ``cand`` or each other. Without any, ``cand`` is returned unchanged.
    """
    func = mod[function]
    layout = block_layout(func, cand.start)
    if layout is None or cand.end not in layout[0]:
        return cand
    names, keys = layout
    j, e = names.index(cand.start), names.index(cand.end)
    if j == 0 or names[j - 1] != cand.seed:
        return cand  # seeded by a parameter or from further back: not a layer pattern
    pat, n = keys[j : e + 1], e - j + 1
    sig = (cand.extent, cand.granularity, cand.body_ops, cand.body_bytes, cand.out_bytes)
    copies: list[tuple[str, str, str]] = []
    k = 1
    while k + n <= len(names):
        if (k + n - 1 < j or k > e) and keys[k : k + n] == pat:  # disjoint, same ops
            ra = analyze_region(
                mod, names[k], names[k + n - 1], names[k - 1], cand.dim, function=function
            )
            if ra.legal:
                c2 = _candidate(ra, func)
                if (c2.extent, c2.granularity, c2.body_ops, c2.body_bytes, c2.out_bytes) == sig:
                    copies.append((names[k], names[k + n - 1], names[k - 1]))
                    k += n
                    continue
        k += 1
    return dataclasses.replace(cand, copies=tuple(copies)) if copies else cand


def _shorter_copy(
    mod, cand: Candidate, best: Candidate, fit, opts, function: str, *, over: bool = False
) -> bool:
    """Whether ``cand`` is ``best``'s region started later (same end, extent and copies) and
    would cost less than ``opts.beat_min_saving`` less than ``best`` at its fitted chunk; or,
    ``over`` (the best misses the budget: candidates are compared by peak, not cost), started
    later at all.

    Such a region computes fewer of the same bindings per chunk; the ones it leaves out run
    whole before the loop, and their full-size result is its seed, live through the loop: it
    typically needs as much memory or more (as many chunks or more), and it saves only those
    few ops per chunk. The estimate that would tell (a quarter to a third of a one-stage
    search) is not worth that. Ties of this kind are common: two seeds a LayerNorm apart
    (GPT-4096: the same peak at every budget of the sweep when both were estimated).
    """
    if opts.beat_min_saving <= 0 or cand.function != best.function or cand.end != best.end:
        return False
    if (cand.extent, cand.granularity, len(cand.copies)) != (
        best.extent,
        best.granularity,
        len(best.copies),
    ):
        return False
    layout = block_layout(mod[function], best.start)
    if layout is None or cand.start not in layout[0]:
        return False
    names = layout[0]
    if not names.index(best.start) < names.index(cand.start) <= names.index(best.end):
        return False
    return over or cand.cost(fit.chunk, opts) >= (1 - opts.beat_min_saving) * fit.cost


def enumerate_candidates(
    mod, hot: list[str], opts: SearchOptions, function: str = "main", reasons=None
) -> list[Candidate]:
    """Legal (region, seed, dim) candidates whose body contains one of the ``hot`` bindings."""
    func = mod[function]
    ix = _index(func)  # names, bindings and reads, read through the FFI once per function
    seen: set = set()
    out: list[Candidate] = []
    last_use: dict[int, list[int]] = {}
    for name in hot:
        for bi, bs in enumerate(ix.blocks):
            names = ix.names[bi]
            if name not in ix.position[bi]:
                continue
            ip = names.index(name)  # the first binding of that name (position: the last)
            if not isinstance(bs[ip].value, C.Call) or not isinstance(bs[ip].value.op, C.Op):
                continue  # a call of a chunk function: already chunked
            lo = max(0, ip - opts.window_before)
            hi = min(len(bs) - 1, ip + opts.window_after)
            for j in range(lo, ip + 1):
                if j == 0:
                    seeds = [p for p in func.params if isinstance(p.ty, C.TensorType)]
                else:
                    sv = ix.vars[bi][j - 1]
                    seeds = [sv] if isinstance(sv.ty, C.TensorType) else []
                for sv in seeds:
                    shape = C.tensor_shape(sv.ty) or []
                    for d, n in enumerate(shape):
                        if not isinstance(n, int) or n < opts.min_extent:
                            continue
                        key = (names[j], str(sv.name), d)
                        if key in seen:
                            continue
                        seen.add(key)  # tried once, for the first hot binding near it
                        ra = _longest_legal(
                            mod, names, j, ip, hi, str(sv.name), d, function, reasons
                        )
                        if ra is None or name not in ra.body:
                            continue
                        out.append(_candidate(ra, func))
                        # the end in [hot .. longest] leaving the fewest bytes live after the
                        # region: every output is a whole tensor kept through the chunk loop
                        if bi not in last_use:
                            last_use[bi] = _last_uses(func, bi)
                        e = _min_output_end(bs, last_use[bi], j, ip, names.index(ra.end))
                        if e != names.index(ra.end):
                            ra2 = analyze_region(
                                mod, names[j], names[e], str(sv.name), d, function=function
                            )
                            if ra2.legal and name in ra2.body:
                                out.append(_candidate(ra2, func))
    return out


def _last_uses(func: relax.Function, bi: int) -> list[int]:
    """For each binding of block ``bi``, the index of its last reader in the block (the block's
    length if the value is read after the block or returned)."""
    blocks, ret = _reads_by_block(func)
    bs = blocks[bi]
    index = {v: i for i, (v, _) in enumerate(bs)}
    last = [-1] * len(bs)
    for i, (_, reads) in enumerate(bs):
        for v in reads:
            k = index.get(v)
            if k is not None:
                last[k] = max(last[k], i)
    outside = set(ret)
    for bj, blk in enumerate(blocks):
        if bj != bi:
            for _, reads in blk:
                outside.update(reads)
    for v, k in index.items():
        if v in outside or not isinstance(v, relax.DataflowVar):
            last[k] = len(bs)  # returned, read by another block, or a block output
    return last


def _min_output_end(bs: list, last: list[int], j: int, lo: int, hi: int) -> int:
    """The end e in [lo, hi] minimising the bytes of bindings in [j, e] read after e (ties: the
    longest region)."""
    sizes = {i: C.static_nbytes(bs[i].var.ty) for i in range(j, hi + 1)}
    best, best_e = None, hi
    for e in range(hi, lo - 1, -1):
        live = sum(sizes[i] for i in range(j, e + 1) if last[i] > e)
        if best is None or live < best:
            best, best_e = live, e
    return best_e


def _candidate(ra: RegionAnalysis, func: relax.Function) -> Candidate:
    named = _index(func).var_by_name  # read once per function (not a type per binding here)

    def nbytes(name: str) -> int:
        v = named.get(name)
        return C.static_nbytes(v.ty if v is not None else None)

    gran = 1
    for s in ra.specs:
        gran = gran * s.scale.denominator // math.gcd(gran, s.scale.denominator)
    return Candidate(
        function=ra.function,
        start=ra.start,
        end=ra.end,
        seed=ra.seed.name,
        dim=ra.seed.dim,
        extent=ra.extent,
        granularity=gran,
        body_ops=len(ra.body),
        body_bytes=sum(nbytes(s.name) for s in ra.specs[1:]),
        out_bytes=sum(nbytes(o.name) for o in ra.outputs),
        reread_bytes=reread_bytes(ra, func),
    )


def reread_bytes(ra: RegionAnalysis, func: relax.Function) -> int:
    """Bytes of the tensors that every chunk of ``ra`` reads whole: arguments of its body
    defined outside the body (hoisted bindings, earlier bindings, parameters, constants) that
    are neither the seed nor sliced per chunk. Each counted once."""
    ix = _index(func)
    body = set(ra.body)
    sliced = {(s.binding, s.arg) for s in ra.slices}
    seen: set = set()
    total = 0
    for name in ra.body:
        for i, arg in enumerate(ix.facts[ix.var_by_name[name]].args):
            if (name, i) in sliced:
                continue
            for a in _tensor_leaves(arg):  # vars and constants, tuples flattened
                if isinstance(a, relax.Var):
                    key = str(a.name)
                    if key in body or key == ra.seed.name:
                        continue
                else:
                    key = a.__chandle__()
                if key not in seen:
                    seen.add(key)
                    total += C.static_nbytes(a.ty)
    return total


def _longest_legal(mod, names, j, ip, hi, seed, d, function, reasons=None) -> RegionAnalysis | None:
    """The legal region [names[j] .. e] with the largest e in [ip, hi], or None."""
    e = hi
    for _ in range(6):
        if e < ip:
            return None
        ra = analyze_region(mod, names[j], names[e], seed, d, function=function)
        if ra.legal:
            return ra
        if reasons is not None and ra.failed_at in names and names.index(ra.failed_at) <= ip:
            reasons.append(ra.reason)  # what stops a region from covering the hot binding
        if ra.failed_at in names and names.index(ra.failed_at) > ip:
            e = names.index(ra.failed_at) - 1  # end just before the binding that broke it
        elif not ra.failed_at:
            e -= 1  # a problem with the region's end (e.g. a tuple output): end earlier
        else:
            return None
    return None


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


@_gc_frozen
def auto_chunk(
    mod: tvm.IRModule,
    target,
    budget_bytes: int,
    *,
    options: SearchOptions | None = None,
    function: str = "main",
    profile=None,
) -> tuple[tvm.IRModule, AutoChunkResult]:
    """Chunk ``mod`` until its estimated peak fits ``budget_bytes`` (or raise).

    ``profile``: ``estimate_memory(mod, target, entry=function)`` when the caller has it
    already (it is not checked; it saves one estimate). Python's cyclic GC skips the objects
    that exist before the call while it runs (``_gc_frozen``).
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
    evals = [0]

    def evaluate(m) -> tuple[int, object]:
        evals[0] += 1
        p = estimate_memory(m, target, entry=function, weights=False)
        return need_bytes(p), p

    cur = mod
    unchunked, prof = (need_bytes(profile), profile) if profile is not None else evaluate(cur)
    first_prof = prof
    need = unchunked
    user_budget = budget_bytes
    if unchunked > budget_bytes:  # chunking needed: aim under the budget by the safety margin
        budget_bytes = budget_bytes - max(
            2**20 if budget_bytes > 2**25 else 0, int(budget_bytes * opts.safety_margin)
        )
    blockers: list[str] = []
    # per module state: (ranked candidates, why none, {(candidate, chunk): (need, profile,
    # chunked module)}); the state holds its module, so its identity is not reused meanwhile
    memo: dict = {}

    def expand(cur, need, prof) -> list[tuple[StageRecord, int, object, tvm.IRModule]]:
        """The next stage from one state: the best child, and when the best child meets the
        budget only with chunks shorter than ``small_rows``, also the same region at
        ``small_rows`` (not meeting the budget yet; later stages chunk elsewhere). []: stuck."""
        # the most memory-heavy bindings that are still plain ops (a chunk call is done)
        hot = [
            e.name
            for e in sorted(prof.timeline, key=lambda e: (-e.live_bytes, e.index))
            if not e.op.startswith("call ")
        ][: opts.hot_bindings]
        if cur not in memo:  # a second search (without floor slack) revisits states
            reasons: list[str] = []
            cands = enumerate_candidates(cur, hot, opts, function, reasons)
            # the same region in repeated layers is chunked jointly (one stage, one chunk
            # size): chunking one of several equal layers alone cannot lower their common peak
            ranked = []
            for c in rank_candidates(cands)[: 4 * opts.evaluate_top]:
                ranked.append(with_copies(cur, c, function))
                # it may run past the end of a repeated layer: then a prefix has more copies
                p = layer_prefix(cur, c, function, more_than=len(ranked[-1].copies))
                if p is not None and p not in ranked:
                    ranked.append(p)
            ranked = rank_candidates(ranked)
            memo[cur] = (ranked, reasons, {})
        ranked, reasons, tried = memo[cur]
        if not ranked:
            common = max(set(reasons), key=reasons.count) if reasons else "no legal seed dim"
            blockers.append(f"no chunkable region around '{hot[0] if hot else '?'}' ({common})")
            return []

        def peak_with(cand: Candidate, chunk: int) -> int:
            return peaks_with(cand, chunk)[0]

        def peaks_with(cand: Candidate, chunk: int) -> tuple[int, int, int]:
            """(peak, static plan peak, run-time peak) of ``cur`` with ``cand`` chunked."""
            if (cand, chunk) not in tried:
                # a trial: only the module the search returns is checked (well_formed)
                m = apply_chunk_plan(cur, ChunkPlan(cand.regions(chunk)), check=False)
                n, p = evaluate(m)
                tried[(cand, chunk)] = (n, p, m)
            n, p, _ = tried[(cand, chunk)]
            return n, int(p.peak_bytes), int(p.runtime_peak_bytes)

        best = None
        for cand in ranked[: opts.evaluate_top]:
            # a later candidate is first tried at the best fit's chunk: dropped after that one
            # evaluation when it cannot beat it (search.fit_chunk)
            beat = best[2] if best is not None else None
            if beat is not None and _shorter_copy(
                cur, cand, best[1], beat, opts, function, over=beat.peak > budget_bytes
            ):
                continue  # not worth an estimate: it cannot save enough (see there)
            fit = fit_chunk(
                cand,
                budget_bytes,
                lambda c, cand=cand: peaks_with(cand, c)[1:],
                opts,
                beat=beat,
                unchunked=(int(prof.peak_bytes), int(prof.runtime_peak_bytes)),
            )
            if fit is None:
                continue
            over = fit.peak > budget_bytes
            p_fit = tried[(cand, fit.chunk)][1]
            key = (over, (fit.peak, excess_bytes(p_fit, budget_bytes)) if over else fit.cost)
            if best is None or key < best[0]:
                best = (key, cand, fit)
        if best is None:
            blockers.append(f"no candidate lowers the peak below {need} bytes")
            return []
        _, cand, fit = best

        def child(chunk: int):
            n, p, m = tried[(cand, chunk)]
            rec = StageRecord(
                cand.region(chunk),
                -(-cand.extent // chunk),
                cand.body_ops,
                need,
                n,
                cand.cost(chunk, opts),
                cand.regions(chunk),
                candidate=cand,
            )
            return rec, n, p, m

        # progress = a lower peak, or less memory above the target (models with repeated
        # layers: chunking the first of two equal attention blocks cannot lower the peak, and
        # may even raise it a little, until the second one is chunked too)
        n, p, _ = tried[(cand, fit.chunk)]
        if n >= need and excess_bytes(p, budget_bytes) >= excess_bytes(prof, budget_bytes):
            blockers.append(f"no candidate lowers the peak below {need} bytes")
            return []
        out = [child(fit.chunk)]
        g = max(1, cand.granularity)
        alt = -(-opts.small_rows // g) * g
        if (
            fit.peak <= budget_bytes
            and fit.chunk < opts.small_rows
            and alt < cand.extent
            and not p.peak_op.startswith("call ")
        ):
            # worth later stages only when the peak is then at a plain op: at a chunk call
            # it is that call's frame and what lives across it, which chunking other
            # regions (plain ops only) does not lower. When the fit's own peak is at the
            # chunk call, it is there with longer chunks too (a larger frame; what lives
            # across it is the same): not estimated (UNet-128 at 10%: 3 estimates -> 2)
            if peak_with(cand, alt) < need and not tried[(cand, alt)][1].peak_op.startswith(
                "call "
            ):
                out.append(child(alt))
        return out

    def total_cost(stages) -> float:
        return sum(st.cost for st in stages)

    def better(a, b) -> bool:
        """a before b: meets the budget; then the cheaper plan (or the lower peak); fewer stages."""

        def key(state):
            n, _p, _m, st = state
            fits = n <= budget_bytes
            return (not fits, total_cost(st) if fits else n, len(st))

        return key(a) < key(b)

    branches = [2]  # alternative children explored, at most (bounded search)

    def search(cur, need, prof, stages, depth):
        """The best state in the tree below (cur, need, prof, stages), itself included."""
        best = (need, prof, cur, stages)
        if need <= budget_bytes or depth >= opts.max_stages:
            return best
        if time.perf_counter() - t0 > opts.time_limit_s:
            blockers.append(f"search stopped after {opts.time_limit_s:.0f}s")
            return best
        for i, (rec, n, p, m) in enumerate(expand(cur, need, prof)):
            if i > 0:
                if branches[0] <= 0:
                    break
                branches[0] -= 1
            log.info(
                "stage %d%s: chunk %s..%s along %s[%d] by %d: %d -> %d bytes",
                depth + 1,
                " (alternative)" if i else "",
                rec.region.start,
                rec.region.end,
                rec.region.seed,
                rec.region.dim,
                rec.region.chunk,
                need,
                n,
            )
            found = search(m, n, p, [*stages, rec], depth + 1)
            if better(found, best):
                best = found
        return best

    def refit(need, prof, cur, stages):
        """Fewer calls per stage with the other stages in place (``search.refit_calls``),
        the costliest stage first; each change is kept only when the whole plan still fits.
        The last stage was fitted with every other one in place already (and giving another
        stage fewer calls only adds memory): it is not re-fitted."""
        stages = list(stages)
        for i in sorted(range(len(stages) - 1), key=lambda i: -stages[i].cost):
            st = stages[i]
            if st.candidate is None or st.n_chunks <= 2:
                continue
            if time.perf_counter() - t0 > opts.time_limit_s:
                break
            found: dict = {}

            def plan_peak(chunk, i=i, st=st, found=found):
                regions = []
                for j, other in enumerate(stages):
                    regions += st.candidate.regions(chunk) if j == i else other.regions
                try:
                    m = apply_chunk_plan(mod, ChunkPlan(tuple(regions)), check=False)
                except (PassContractError, KeyError, ValueError):
                    return None  # a later stage names a binding of this one's rewrite
                n, p = evaluate(m)
                found[chunk] = (n, p, m)
                return n

            fit = refit_calls(st.candidate, st.n_chunks, budget_bytes, plan_peak, opts)
            if fit is None:
                continue
            need, prof, cur = found[fit.chunk]
            log.info("re-fit stage %d with the others in place: %d -> %d calls",
                     i + 1, st.n_chunks, -(-st.candidate.extent // fit.chunk))
            stages[i] = dataclasses.replace(
                st,
                region=st.candidate.region(fit.chunk),
                n_chunks=-(-st.candidate.extent // fit.chunk),
                cost=fit.cost,
                applied=st.candidate.regions(fit.chunk),
                refit_from=st.refit_from or st.n_chunks,
            )
        return need, prof, cur, stages

    need, prof, cur, stages = search(mod, need, prof, [], 0)
    if need > budget_bytes and opts.floor_slack > 0:
        # the slack that regions unable to reach the budget alone may leave (for fewer
        # chunks) adds up over stages: search again taking every such region's lowest peak
        log.info("budget missed by %d bytes: searching again without floor slack",
                 need - budget_bytes)
        blockers.clear()
        branches[0] = 2
        opts = dataclasses.replace(opts, floor_slack=0.0)
        again = search(mod, unchunked, first_prof, [], 0)
        if better(again, (need, prof, cur, stages)):
            need, prof, cur, stages = again
    if opts.refit_evals > 0 and need <= budget_bytes and len(stages) >= 2:
        need, prof, cur, stages = refit(need, prof, cur, stages)
    if stages:
        check_well_formed(cur, f"chunking {len(stages)} region(s)")
    if prof is not first_prof or profile is None:
        # the search's estimates skip the weights scan (peaks do not include weights). Chunking
        # moves constants into chunk functions but makes or copies none: the caller's profile
        # has the same weights (tests/test_auto_chunk.py checks it on the families)
        wb = profile.weight_bytes if profile is not None else weight_bytes(cur, function)
        prof = dataclasses.replace(prof, weight_bytes=wb)
    res = AutoChunkResult(
        user_budget,
        unchunked,
        need,
        tuple(stages),
        time.perf_counter() - t0,
        evals[0],
        tuple(blockers),
        cost_model=cost_model,
        profile=prof,
    )
    if need > budget_bytes:
        # the smallest budget whose margin-reduced target still admits the peak reached (never
        # above the unchunked peak: a budget of that size builds without chunking)
        suggest = min(unchunked, max(need + 2**20 if need > 2**25 else need, -(-need * 100 // 97)))
        raise BudgetInfeasibleError(
            f"cannot fit the budget of {human_bytes(user_budget)} ({user_budget} bytes): the "
            f"unchunked module needs {human_bytes(unchunked)} and the smallest peak reached "
            f"is {human_bytes(need)} ({need} bytes) after {len(stages)} chunk region(s); the "
            f"peak is now after binding '{prof.peak_binding}' ({prof.peak_op}). Blocked by: "
            f"{'; '.join(blockers) or 'nothing left to chunk'}. Remedy: raise the budget to at "
            f"least {suggest} bytes, or shorten the input."
            + (" (On a GPU, device allocations of 1 MiB or more count in whole 2 MiB pages.)"
               if gpu else ""),
            unchunked_peak=unchunked,
            best_peak=need,
            min_budget=suggest,
        )
    return cur, res


@tvm.transform.module_pass(opt_level=0, name="AutoChunk")
class AutoChunk:
    """``relay_passes.AutoChunk(budget_bytes, target)``: the search as a TVM module pass.

    Errors raised inside a TVM pass reach Python as ``RuntimeError`` carrying our message; call
    ``auto_chunk`` directly to get ``BudgetInfeasibleError`` itself.
    """

    def __init__(self, budget_bytes: int, target="llvm", options: SearchOptions | None = None):
        if not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise PassContractError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self.target = target
        self.options = options
        self.result: AutoChunkResult | None = None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out, self.result = auto_chunk(mod, self.target, self.budget_bytes, options=self.options)
        return out
