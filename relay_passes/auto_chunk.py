"""AutoChunk: find chunk regions and chunk sizes so that one call fits a memory budget.

Where it belongs: on a high-level Relax module, before legalization (``autochunk_pipeline``
puts it first). It reads the module with the analyses (``estimate_memory``,
``chunk_region.analyze_region``), decides with ``search`` (plain Python), and changes IR only
through ``rewrite.apply_chunk_plan``. Loop (bounded): estimate -> the most memory-heavy bindings
of the entry function -> candidate regions around them x legal seed dims -> rank -> fit the
largest chunk size that meets the budget on the best candidates (exact re-estimates) -> apply
-> repeat until the estimate fits, or no candidate helps (then ``BudgetInfeasibleError`` with
the unchunked peak, the best reached, where it is and what blocks going lower).

Not handled yet: regions inside callees, several regions searched jointly (stages are greedy,
one region per stage, best by estimated peak then by the cost model).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import tvm
from tvm import relax

from . import _compat as C
from .chunk_region import RegionAnalysis, analyze_region, bindings_by_name
from .errors import BudgetInfeasibleError, PassContractError
from .estimate_memory import estimate_memory
from .plan import ChunkPlan, ChunkRegion, human_bytes
from .rewrite import apply_chunk_plan
from .search import Candidate, SearchOptions, fit_chunk, rank_candidates

log = logging.getLogger(__name__)


def need_bytes(prof) -> int:
    """What a budget is checked against: max(static plan, simulated run-time peak)."""
    return max(int(prof.peak_bytes), int(prof.runtime_peak_bytes))


@dataclass(frozen=True)
class StageRecord:
    region: ChunkRegion
    n_chunks: int
    body_ops: int
    peak_before: int
    peak_after: int
    cost: float


@dataclass(frozen=True)
class AutoChunkResult:
    budget_bytes: int
    unchunked_peak: int
    final_peak: int
    stages: tuple[StageRecord, ...] = ()
    search_seconds: float = 0.0
    evaluations: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def plan(self) -> ChunkPlan:
        return ChunkPlan(tuple(s.region for s in self.stages))

    def to_dict(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes,
            "unchunked_peak_bytes": self.unchunked_peak,
            "final_peak_bytes": self.final_peak,
            "search_seconds": round(self.search_seconds, 3),
            "evaluations": self.evaluations,
            "regions": [
                {
                    "start": s.region.start,
                    "end": s.region.end,
                    "seed": s.region.seed,
                    "dim": s.region.dim,
                    "chunk": s.region.chunk,
                    "n_chunks": s.n_chunks,
                    "body_ops": s.body_ops,
                    "peak_before_bytes": s.peak_before,
                    "peak_after_bytes": s.peak_after,
                    "predicted_cost": round(s.cost, 4),
                }
                for s in self.stages
            ],
        }


def enumerate_candidates(
    mod, hot: list[str], opts: SearchOptions, function: str = "main", reasons=None
) -> list[Candidate]:
    """Legal (region, seed, dim) candidates whose body contains one of the ``hot`` bindings."""
    func = mod[function]
    blocks = [list(block.bindings) for block in func.body.blocks]
    seen: set = set()
    out: list[Candidate] = []
    for name in hot:
        for bi, bs in enumerate(blocks):
            names = [str(b.var.name) for b in bs]
            if name not in names:
                continue
            ip = names.index(name)
            if not isinstance(bs[ip].value, C.Call) or not isinstance(bs[ip].value.op, C.Op):
                continue  # a call of a chunk function: already chunked
            lo = max(0, ip - opts.window_before)
            hi = min(len(bs) - 1, ip + opts.window_after)
            for j in range(lo, ip + 1):
                if j == 0:
                    seeds = [p for p in func.params if isinstance(p.ty, C.TensorType)]
                else:
                    seeds = [bs[j - 1].var] if isinstance(bs[j - 1].var.ty, C.TensorType) else []
                for sv in seeds:
                    shape = C.tensor_shape(sv.ty) or []
                    for d, n in enumerate(shape):
                        if not isinstance(n, int) or n < opts.min_extent:
                            continue
                        key = (names[j], str(sv.name), d)
                        if key in seen:
                            continue
                        seen.add(key)
                        ra = _longest_legal(
                            mod, names, j, ip, hi, str(sv.name), d, function, reasons
                        )
                        if ra is not None and name in ra.body:
                            out.append(_candidate(ra, func))
    return out


def _candidate(ra: RegionAnalysis, func: relax.Function) -> Candidate:
    types = {n: b.var.ty for n, b in bindings_by_name(func).items()}

    def nbytes(name: str) -> int:
        ty = types.get(name)
        shape = C.tensor_shape(ty) if ty is not None else None
        if not shape or any(not isinstance(d, int) for d in shape):
            return 0
        return C.prod(shape) * C.dtype_bytes(C.tensor_dtype(ty))

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
    )


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


def auto_chunk(
    mod: tvm.IRModule,
    target,
    budget_bytes: int,
    *,
    options: SearchOptions | None = None,
    function: str = "main",
) -> tuple[tvm.IRModule, AutoChunkResult]:
    """Chunk ``mod`` until its estimated peak fits ``budget_bytes`` (or raise)."""
    opts = options or SearchOptions()
    t0 = time.perf_counter()
    evals = [0]

    def evaluate(m) -> tuple[int, object]:
        evals[0] += 1
        p = estimate_memory(m, target, entry=function)
        return need_bytes(p), p

    cur = mod
    unchunked, prof = evaluate(cur)
    need = unchunked
    user_budget = budget_bytes
    if unchunked > budget_bytes:  # chunking needed: aim under the budget by the safety margin
        budget_bytes = budget_bytes - max(
            2**20 if budget_bytes > 2**25 else 0, int(budget_bytes * opts.safety_margin)
        )
    stages: list[StageRecord] = []
    blockers: list[str] = []
    for _stage in range(opts.max_stages):
        if need <= budget_bytes:
            break
        if time.perf_counter() - t0 > opts.time_limit_s:
            blockers.append(f"search stopped after {opts.time_limit_s:.0f}s")
            break
        # the most memory-heavy bindings that are still plain ops (a chunk call is done)
        hot = [
            e.name
            for e in sorted(prof.timeline, key=lambda e: (-e.live_bytes, e.index))
            if not e.op.startswith("call ")
        ][: opts.hot_bindings]
        reasons: list[str] = []
        cands = enumerate_candidates(cur, hot, opts, function, reasons)
        if not cands:
            common = max(set(reasons), key=reasons.count) if reasons else "no legal seed dim"
            blockers.append(f"no chunkable region around '{hot[0] if hot else '?'}' ({common})")
            break

        def peak_with(cand: Candidate, chunk: int) -> int:
            return evaluate(apply_chunk_plan(cur, ChunkPlan((cand.region(chunk),))))[0]

        best = None
        for cand in rank_candidates(cands)[: opts.evaluate_top]:
            fit = fit_chunk(cand, budget_bytes, lambda c, cand=cand: peak_with(cand, c), opts)
            if fit is None:
                continue
            key = (fit.peak > budget_bytes, fit.peak if fit.peak > budget_bytes else fit.cost)
            if best is None or key < best[0]:
                best = (key, cand, fit)
        if best is None or best[2].peak >= need:
            blockers.append(f"no candidate lowers the peak below {need} bytes")
            break
        _, cand, fit = best
        region = cand.region(fit.chunk)
        cur = apply_chunk_plan(cur, ChunkPlan((region,)))
        new_need, prof = evaluate(cur)
        stages.append(
            StageRecord(
                region, -(-cand.extent // fit.chunk), cand.body_ops, need, new_need, fit.cost
            )
        )
        log.info(
            "stage %d: chunk %s..%s along %s[%d] by %d: %d -> %d bytes",
            len(stages),
            region.start,
            region.end,
            region.seed,
            region.dim,
            region.chunk,
            need,
            new_need,
        )
        need = new_need
    res = AutoChunkResult(
        user_budget,
        unchunked,
        need,
        tuple(stages),
        time.perf_counter() - t0,
        evals[0],
        tuple(blockers),
    )
    if need > budget_bytes:
        # the smallest budget whose margin-reduced target still admits the peak reached
        suggest = max(need + 2**20 if need > 2**25 else need, -(-need * 100 // 97))
        raise BudgetInfeasibleError(
            f"cannot fit the budget of {human_bytes(user_budget)} ({user_budget} bytes): the "
            f"unchunked module needs {human_bytes(unchunked)} and the smallest peak reached "
            f"is {human_bytes(need)} ({need} bytes) after {len(stages)} chunk region(s); the "
            f"peak is now after binding '{prof.peak_binding}' ({prof.peak_op}). Blocked by: "
            f"{'; '.join(blockers) or 'nothing left to chunk'}. Remedy: raise the budget to at "
            f"least {suggest} bytes, or shorten the input.",
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
