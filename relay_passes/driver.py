"""The one build driver: what ``build()`` and the registered ``autochunk`` pipeline run.

``AutochunkPipeline(target, budget_bytes)`` is a module pass that takes a high-level Relax
module through TVM's whole Relax pipeline for the target, under the budget:

1. estimate the module (``estimate_memory``); over the budget, search chunk regions
   (``auto_chunk``). A refusal's ``min_budget`` is checked by searching at it
   (``confirm_min_budget``), and it names what sets the floor (``floor_note``);
2. lower and plan (``lowering.planning_passes``), then read TVM's own plan: over the budget,
   search again aiming 5% lower, at most ``MAX_ATTEMPTS`` times, then refuse;
3. finish TVM's pipeline (``lowering.finalize_passes``).

It keeps what a report needs (``profile``, ``result``, ``plan``, ``module``) and the error it
raised (``error``: with its fields; through TVM's FFI a caller sees its type and message).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import tvm
from tvm import relax

from . import _compat as C
from . import caches
from .auto_chunk import AutoChunkResult, auto_chunk, need_bytes
from .dynamic_chunk import (
    SHORT,
    add_short_entry,
    apply_plan,
    is_symbolic,
    short_bound,
    specialize,
    symbolic_bounds,
)
from .errors import BudgetInfeasibleError, UnsupportedTargetError
from .estimate_memory import estimate_memory
from .fold_weight_layouts import fold_weight_layouts
from .lower_bound import lower_bound
from .lowering import (
    as_target,
    finalize_passes,
    is_gpu,
    planning_passes,
    run_passes,
)
from .plan import ChunkPlan, format_bytes
from .planned_memory import read_plan
from .rewrite import apply_chunk_plan
from .search import SearchOptions
from .verify_memory_budget import plan_refusal

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # searches aiming lower when TVM's plan misses the budget
MIN_BUDGET_CHECKS = 2  # searches that check a refusal's suggested budget
DEEPER_AIMS = (0.75, 0.5)  # after a refusal, searches aiming this far under the budget
# a plan with a stage of this many calls or more is searched again fitting twice as many
# candidates per stage; the cheaper plan wins (``_second_look``)
WIDER_AT_CALLS = 32


def confirm_min_budget(err: BudgetInfeasibleError, search: Callable) -> BudgetInfeasibleError:
    """``err`` with a ``min_budget`` that builds. The search is greedy and its path depends
    on the budget: aiming at a refusal's suggestion it can take another path and miss it
    (found by fuzzing). So the suggestion is searched at (adopting each new refusal's), at
    most ``MIN_BUDGET_CHECKS`` times; failing that, it becomes the unchunked peak."""
    suggest, top = err.min_budget, err.unchunked_peak
    if suggest is None or top is None or suggest >= top:
        return err  # the unchunked module fits the suggestion: nothing to check
    reached = None
    for _ in range(MIN_BUDGET_CHECKS):
        try:
            search(suggest)
            break
        except BudgetInfeasibleError as again:
            reached = again.best_peak if reached is None else reached
            suggest = again.min_budget
            if suggest is None or suggest >= top:
                suggest = top
                break
    else:
        suggest = top  # not confirmed: only the unchunked peak is sure to work
    if reached is None:
        return err
    return _with(err, min_budget=suggest, aimed=(err.min_budget, reached))


def _with(err: BudgetInfeasibleError, **changes) -> BudgetInfeasibleError:
    return BudgetInfeasibleError(**{**err.fields(), **changes})


def floor_note(mod, prof, budget: int, best: int, unchunked: int | None, entry: str):
    """(what sets the floor, extra remedies) when chunking cannot help: most of the smallest
    peak is the module's outputs (one call allocates them whole) or tensors computed from
    weights alone (they depend on no input, so no dim could be chunked). ("", ()) else."""
    func = mod[entry]
    # what depends on a parameter; weights passed as parameters count too
    dep = set(func.params)
    from_weights: set[str] = set()
    for block in func.body.blocks:
        for b in block.bindings:
            if set(relax.analysis.free_vars(b.value)) & dep:
                dep.add(b.var)
            else:
                from_weights.add(str(b.var.name))
    outs = [o for o in prof.outputs if o.nbytes]
    const = [
        r for r in prof.live_at_peak if r.kind != "output" and r.name in from_weights and r.nbytes
    ]
    out_bytes = sum(o.nbytes for o in outs)
    const_bytes = sum(r.nbytes for r in const)
    if not best or 2 * (out_bytes + const_bytes) < best:
        return "", ()

    def desc(rs):
        shown = ", ".join(
            f"'{r.name}' {'x'.join(map(str, r.shape)) or 'scalar'} {r.dtype}" for r in rs[:4]
        )
        return shown + (f" and {len(rs) - 4} more" if len(rs) > 4 else "")

    parts, fixes = [], []
    if out_bytes:
        parts.append(
            f"{format_bytes(out_bytes)} are the module's outputs ({desc(outs)}), "
            "which one call must allocate whole"
        )
        fixes.append("return smaller outputs")
    if const_bytes:
        parts.append(
            f"{format_bytes(const_bytes)} are tensors computed from weights alone "
            f"({desc(const)}), which depend on no input dim that could be chunked"
        )
        fixes.append("precompute the weight-only tensors offline (e.g. store a weight transposed)")
    head = (
        "No chunking can help here"
        if unchunked is not None and best >= unchunked
        else "Chunking cannot go lower"
    )
    below = ", and the budget is below them alone" if budget < out_bytes + const_bytes else ""
    return f"{head}: of the smallest peak, {'; and '.join(parts)}{below}", tuple(fixes)


def chunk_to_budget(
    mod, target, aim: int, *, entry="main", profile=None, options=None, budget=None
) -> tuple[tvm.IRModule, AutoChunkResult]:
    """``auto_chunk`` aiming at ``aim`` bytes, whose refusal has a ``min_budget`` that builds
    (``confirm_min_budget``) and says what sets the floor (``floor_note``). ``budget``: the
    user's budget, named in the refusal (default ``aim``)."""
    budget = aim if budget is None else budget
    profile = profile or estimate_memory(mod, target, entry=entry)
    bound = _lower_bound(mod, target, entry, options)

    def search(b: int, explore: int | None = None):
        out, res = auto_chunk(
            mod, target, b, function=entry, profile=profile, options=options, explore=explore
        )
        return out, dataclasses.replace(res, lower_bound=bound)

    try:
        return _second_look(search(aim), mod, target, aim, entry, profile, options, bound)
    except BudgetInfeasibleError as e:
        first = lowest = e
    # greedy stages follow the aim: aiming lower can take a path that fits (Evoformer-128 with
    # weight layouts folded: stuck at 27% aiming at 20%, 12% aiming at 10%)
    for share in DEEPER_AIMS:
        try:
            out, res = search(aim, explore=int(aim * share))
        except BudgetInfeasibleError as e:
            lowest = e if e.best_peak < lowest.best_peak else lowest
            continue
        note = (f"found aiming at {share:.0%} of the budget, then re-fitted to it (aiming at the "
                f"budget itself, the search stopped at {format_bytes(first.best_peak)})")
        return out, dataclasses.replace(res, notes=(*res.notes, note))
    def deeper(b: int):  # how a refusal's suggestion is checked: as a build would search
        try:
            return search(b)
        except BudgetInfeasibleError:
            return search(b, explore=int(b * DEEPER_AIMS[-1]))

    err = confirm_min_budget(lowest, deeper)  # the refusal that got lowest
    floor, fixes = floor_note(mod, profile, budget, err.best_peak, err.unchunked_peak, entry)
    if floor:
        err = _with(err, floor=floor, remedies=fixes)
    if err.budget != budget:  # a search that aimed lower: name the user's budget
        err = _with(err, budget=budget)
    if bound is not None:
        err = _with(err, lower_bound=bound.nbytes, lower_bound_note=bound.describe())
    raise err from None


def _second_look(found, mod, target, aim: int, entry: str, profile, options, bound):
    """``found`` (a plan that fits), or the plan of a search that fits twice as many
    candidates per stage when ``found`` has a stage of ``WIDER_AT_CALLS`` calls or more and
    the other plan is predicted cheaper. The greedy stages fit only their top candidates, and
    the one that needs few calls can rank lower (transformers GPT2 at 50%: 114 calls of 9
    rows against 8 of 128 plus 2 of 512, 147 against 5 ms predicted). Wider is not better
    everywhere (Evoformer-128 at 20% is refused that way), so it is only a second look."""
    res = found[1]
    if max((s.n_chunks for s in res.stages), default=0) < WIDER_AT_CALLS:
        return found
    opts = options or SearchOptions.for_target(is_gpu(as_target(target)))
    wide = dataclasses.replace(opts, evaluate_top=2 * opts.evaluate_top)
    try:
        out2, res2 = auto_chunk(mod, target, aim, function=entry, profile=profile, options=wide)
    except BudgetInfeasibleError:
        return found
    if res2.predicted_overhead_us >= res.predicted_overhead_us:
        return found
    note = (f"found fitting {wide.evaluate_top} candidates per stage "
            f"({res2.predicted_overhead_us / 1e3:.1f} ms predicted, against "
            f"{res.predicted_overhead_us / 1e3:.1f} with {opts.evaluate_top})")
    return out2, dataclasses.replace(
        res2, cost_model=res.cost_model, lower_bound=bound, notes=(*res2.notes, note),
        search_seconds=res.search_seconds + res2.search_seconds,
        evaluations=res.evaluations + res2.evaluations,
    )


def _lower_bound(mod, target, entry: str, options):
    """``lower_bound.lower_bound``, or None (logged) when the analysis fails: it informs the
    report and a refusal, and must not stop a build."""
    try:
        return lower_bound(mod, target, function=entry, options=options)
    except Exception as e:  # an analysis bug: the build goes on without the bound
        log.warning("lower bound not computed: %s: %s", type(e).__name__, e)
        return None


@tvm.transform.module_pass(opt_level=0, name="AutochunkPipeline")
class AutochunkPipeline:
    """TVM's Relax pipeline for ``target`` with AutoChunk first and TVM's plan held to
    ``budget_bytes`` (None: no budget, the plan is only read). ``target`` None: the target in
    scope (``tvm.compile`` enters it). ``chunk_plan``: regions applied before anything else.
    ``options``: the search's ``SearchOptions`` (default: the target's)."""

    def __init__(
        self,
        target=None,
        budget_bytes: int | None = None,
        *,
        entry: str = "main",
        chunk_plan: ChunkPlan | None = None,
        options: SearchOptions | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.target = target
        self.budget_bytes = budget_bytes
        self.entry = entry
        self.chunk_plan = chunk_plan
        self.options = options
        self.progress = progress or log.info
        self.profile = None  # the estimate of the module built
        self.result: AutoChunkResult | None = None  # the search's, when it chunked
        self.plan = None  # TVM's plan (planned_memory.PlannedMemory)
        self.module = None  # the module built, before lowering (chunked)
        # the unchunked entry for short lengths, when one was added (``_check_short``)
        self.short: dict | None = None
        # a chunked symbolic module's peak at several lengths (``_length_table``)
        self.lengths: list[dict] | None = None
        self.error: Exception | None = None

    @property
    def chunking(self) -> dict | None:
        """The chunk plan as report data: the search's, or the caller's ``chunk_plan``."""
        if self.result is not None:
            return self.result.to_dict()
        if self.chunk_plan is not None and self.chunk_plan.regions:
            return self.chunk_plan.to_dict()
        return None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tgt = as_target(self.target) if self.target is not None else tvm.target.Target.current()
        if tgt is None:
            raise UnsupportedTargetError(
                "the 'autochunk' pipeline needs a target: call it through "
                "tvm.compile(mod, target, relax_pipeline=...) or pass target=..."
            )
        try:
            with caches.scope():
                planned = self._plan(mod, tgt)
                if self.result is not None and is_symbolic(self.module, self.entry):
                    self.lengths = self._length_table(tgt)
            # planning_passes ended with finalize_passes' first two (the planner, RestoreChunkCalls)
            return run_passes(planned, finalize_passes(tgt)[2:], tgt)
        except Exception as e:
            self.error = e
            raise

    def _plan(self, mod: tvm.IRModule, tgt) -> tvm.IRModule:
        """The module lowered and planned by TVM, within the budget (or raise)."""
        budget, entry = self.budget_bytes, self.entry
        symbolic = is_symbolic(mod, entry)  # its plan is searched at the bounds
        if self.chunk_plan is not None and self.chunk_plan.regions:
            self.progress(f"applying a chunk plan of {len(self.chunk_plan.regions)} region(s)")
            if symbolic:
                mod = apply_plan(mod, self.chunk_plan, entry=entry)
            else:
                mod = apply_chunk_plan(mod, self.chunk_plan)
        mod = fold_weight_layouts(mod)  # weights transposed once here, not in every call
        self.progress(f"estimating memory for {tgt.kind.name}")
        base = estimate_memory(mod, tgt, entry=entry)
        aim, self.short = budget, None
        gap = 0  # how much more than the plan searched at the bound its loops needed
        short = None  # (dim, bound): the lengths up to it fit unchunked (``short_bound``)
        if symbolic and budget is not None and need_bytes(base) > budget:
            short = self._short_bound(mod, tgt, budget)
        for attempt in range(MAX_ATTEMPTS):
            chunked, prof, self.result = mod, base, None
            if aim is not None and need_bytes(base) > aim:
                self.progress(
                    f"peak {format_bytes(need_bytes(base))} is over the budget "
                    f"{format_bytes(aim)}: searching chunk regions"
                )
                if symbolic:
                    chunked, self.result = self._chunk_symbolic(mod, tgt, aim, gap)
                else:
                    chunked, self.result = chunk_to_budget(
                        mod, tgt, aim, entry=entry, profile=base, options=self.options,
                        budget=budget,
                    )
                prof = self.result.profile
                self.progress(
                    f"chunked {len(self.result.stages)} region(s) in "
                    f"{self.result.search_seconds:.1f}s: estimated peak "
                    f"{format_bytes(self.result.final_peak)}"
                )
            if short is not None and self.result is not None:
                chunked = add_short_entry(chunked, mod, *short, entry=entry)
            self.progress(f"lowering and planning with TVM for {tgt.kind.name}")
            planned = run_passes(chunked, planning_passes(tgt), tgt)
            self.profile, self.module = prof, chunked
            self.plan = read_plan(planned, entry, tgt)
            peak = max(int(self.plan.peak_bytes), int(prof.runtime_peak_bytes))
            if budget is None or peak <= budget:
                if any(gv.name_hint == entry + SHORT for gv in chunked.get_global_vars()):
                    return self._check_short(planned, chunked, tgt, short)
                return planned
            if self.result is None or attempt == MAX_ATTEMPTS - 1:
                raise plan_refusal(self.plan, entry, budget, tgt, int(prof.runtime_peak_bytes))
            # the promise is checked on TVM's own plan: aim lower and search again
            aim = int(aim * 0.95)
            if symbolic:  # searched at the bound, the loops can need more (a tail's frame)
                gap = max(gap, peak - self.result.searched_peak)
                aim = min(aim, budget - gap)
            self.progress(f"TVM's plan is over the budget; searching again for {aim} bytes")
        raise AssertionError("unreachable")  # pragma: no cover

    def _symbolic_refusal(self, err, mod, tgt, gap: int) -> BudgetInfeasibleError:
        """``err`` (a refusal of the search at the bounds) with a suggested budget that the
        loops meet too: the plan searched at the suggestion, applied to ``mod``, can need more
        (``gap``, or what that plan's loops need beyond it)."""
        if not gap:
            try:
                _, res = chunk_to_budget(specialize(mod, entry=self.entry), tgt, err.min_budget,
                                         entry=self.entry, options=self.options)
            except BudgetInfeasibleError:
                return err
            loops = estimate_memory(apply_plan(mod, res.plan, entry=self.entry), tgt,
                                    entry=self.entry)
            gap = max(0, need_bytes(loops) - res.final_peak)
        return _with(err, min_budget=max(err.min_budget, err.best_peak + gap))

    def _short_bound(self, mod, tgt, budget: int):
        """``short_bound`` on the estimate, aiming the search's safety margin under the
        budget; logged."""
        aim = int(budget * (1 - (self.options or SearchOptions()).safety_margin))
        entry = self.entry
        found = short_bound(
            mod, lambda m: need_bytes(estimate_memory(m, tgt, entry=entry)) <= aim, entry
        )
        if found is not None:
            self.progress(f"lengths up to {found[0]}={found[1]} fit unchunked: they get "
                          f"'{entry}{SHORT}'")
        return found

    def _check_short(self, planned, chunked, tgt, short):
        """``planned`` when ``<entry>_short`` holds the budget on TVM's plan and the run-time
        model too (``self.short`` then describes it); else the module planned again without
        it."""
        name = self.entry + SHORT
        plan = read_plan(planned, name, tgt)
        prof = estimate_memory(chunked, tgt, entry=name)
        peak = max(int(plan.peak_bytes), int(prof.runtime_peak_bytes))
        if peak <= self.budget_bytes:
            self.short = {"function": name, "dim": short[0], "bound": short[1],
                          "planned_peak_bytes": int(plan.peak_bytes),
                          "estimated_peak_bytes": need_bytes(prof),
                          "storage_bytes": int(prof.frame.storage_bytes)}
            return planned
        self.progress(f"'{name}' misses the budget on TVM's plan ({format_bytes(peak)}): "
                      "left out, every length runs chunked")
        funcs = {gv: f for gv, f in chunked.functions_items() if gv.name_hint != name}
        self.module = tvm.IRModule(funcs, attrs=chunked.attrs, global_infos=chunked.global_infos)
        return run_passes(self.module, planning_passes(tgt), tgt)

    def _length_table(self, tgt) -> list[dict] | None:
        """The estimated peak of one call at a few lengths up to the bound, each in the function
        that runs it (``<entry>_short`` up to its bound): estimated at that length, plus the
        storage TVM plans at the function's bound beyond what the length needs (it is
        allocated whole). None with several symbolic dims."""
        mod, entry = self.module, self.entry
        bounds = symbolic_bounds(mod, entry)
        if len(bounds) != 1:
            return None
        (name, top), = bounds.items()
        lo = C.lower_bounds_of(mod[entry]).get(name, 1)
        short = self.short["bound"] if self.short else None
        lengths = {lo, top // 2 + 1, top, *((short, short + 1) if short else ())}
        storage = {entry: self.profile.frame.storage_bytes}
        if self.short:
            storage[self.short["function"]] = self.short["storage_bytes"]
        alone = {fn: relax.transform.DeadCodeElimination([fn])(mod) for fn in storage}
        rows = []
        for n in sorted(x for x in lengths if lo <= x <= top):
            fn = self.short["function"] if short and n <= short else entry
            prof = estimate_memory(specialize(alone[fn], {name: n}), tgt, entry=fn)
            extra = max(0, storage[fn] - prof.frame.storage_bytes)
            rows.append({"dim": name, "length": n, "function": fn,
                         "estimated_peak_bytes": need_bytes(prof) + extra})
        return rows

    def _chunk_symbolic(self, mod, tgt, aim: int, gap: int = 0):
        """Search on ``mod`` with its symbolic dims at their bounds; apply the plan found to
        ``mod`` itself, whose regions become run-time loops (``dynamic_chunk``). ``gap``: how
        much more than the searched plan an earlier attempt's loops needed; a refusal's
        suggested budget adds it, so that the suggestion builds."""
        entry = self.entry
        bounds = symbolic_bounds(mod, entry)
        self.progress(f"searching at the bounds {bounds}")
        try:
            _, res = chunk_to_budget(
                specialize(mod, entry=entry), tgt, aim, entry=entry, options=self.options,
                budget=self.budget_bytes,
            )
        except BudgetInfeasibleError as e:
            if e.min_budget is None or (e.unchunked_peak and e.min_budget >= e.unchunked_peak):
                raise
            raise self._symbolic_refusal(e, mod, tgt, gap) from None
        chunked = apply_plan(mod, res.plan, entry=entry)
        prof = estimate_memory(chunked, tgt, entry=entry)
        note = (f"symbolic dims {bounds}: searched at these bounds; each region is a run-time "
                "loop, and its chunk count is the one at the bound")
        return chunked, dataclasses.replace(
            res, profile=prof, final_peak=need_bytes(prof), notes=(*res.notes, note),
            searched_peak=res.final_peak,
        )
