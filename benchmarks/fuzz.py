"""Fuzz AutoChunk with random Relax graphs (issue 7, the long profile).

    .venv/bin/python benchmarks/fuzz.py --graphs 1000 [--seed 0] [--budgets 2] [--jobs 2]
                                        [--minutes 60] [--out benchmarks/results/fuzz.jsonl]

For each graph of ``benchmarks/fuzz_graphs.py`` (``RandomDraw(seed)``, seeds ``seed ..
seed+graphs-1``):

* build it unchunked (``tvm_autochunk.build``) and run it on random inputs: the reference;
  TVM's plan vs our estimate (within 2%). If TVM itself cannot build the graph, the error must
  be one of ours (``AutochunkError``, e.g. a ``BuildError`` naming the op); it is counted as
  "unbuildable" and the graph is skipped;
* draw ``--budgets`` budgets, uniform in [0.1, 1) of the unchunked peak. The first goes through
  ``build(budget=...)`` and is run (outputs equal to the reference, rel err <= 1e-5); the
  others go through the same search (``relay_passes.driver.chunk_to_budget``) and TVM's static
  plan only (no codegen), which is much cheaper. For every budget: TVM's plan <= budget, the
  estimate within 2% of the plan; the only error allowed is ``BudgetInfeasibleError``, and then
  its ``min_budget`` must work (same checks, once per distinct ``min_budget``). The lower
  bound (``relay_passes.lower_bound``) is never above the peak reached, built or refused;
* the caller's IRModule is never mutated.

Prints a summary (graphs, budgets tried, builds, refusals, failures by kind) and writes one
JSON line per graph, then the summary line, to ``--out``; a failing graph's line carries its
recipe (``Recipe.from_json`` replays it; so does ``--seed N --graphs 1``). ``check_graph`` is
also what ``tests/test_fuzz.py`` runs (the fast profile). Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fuzz_graphs import FuzzGraph, RandomDraw, generate  # noqa: E402

EST_TOL = 0.02  # estimate vs TVM's plan
REL_TOL = 1e-5  # chunked vs unchunked outputs


@dataclass
class CaseResult:
    seed: int | None
    recipe: str
    need: int = 0
    budgets: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    unbuildable: str | None = None  # the unchunked build raised a documented error

    def fail(self, kind: str, detail: str) -> None:
        self.failures.append((kind, detail))

    def to_dict(self) -> dict:
        d = {
            "seed": self.seed,
            "need_bytes": self.need,
            "budgets": self.budgets,
            "failures": [{"kind": k, "detail": v} for k, v in self.failures],
            "seconds": round(self.seconds, 3),
        }
        if self.unbuildable:
            d["unbuildable"] = self.unbuildable
        if self.failures:
            d["recipe"] = json.loads(self.recipe)
        return d

    def describe(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.failures]
        return "\n".join(lines) + f"\nrecipe: {self.recipe}"


def _rel_err(out, ref) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    if len(outs) != len(refs):
        return math.inf
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = np.asarray(o), np.asarray(r)
        if o.shape != r.shape:
            return math.inf
        fin = np.isfinite(r)
        if not np.array_equal(fin, np.isfinite(o)) or not np.array_equal(o[~fin], r[~fin]):
            return math.inf  # nan/inf must appear in the same places, with the same value
        if fin.any():
            scale = max(float(np.abs(r[fin]).max()), 1e-30)
            worst = max(worst, float(np.abs(o[fin] - r[fin]).max()) / scale)
    return worst


def _est_vs_plan(est: int, plan: int) -> float:
    if plan == est:
        return 0.0
    return abs(est - plan) / max(plan, 1)


def check_graph(
    g: FuzzGraph,
    fractions: list[float],
    *,
    full_builds: int = 1,
    seed: int | None = None,
    target: str = "llvm",
) -> CaseResult:
    """Run every property on one graph; returns the record (``failures`` empty when all hold).

    ``fractions`` (each in (0, 1]) are budgets as fractions of the unchunked peak; the first
    ``full_builds`` of them go through ``build`` and are run, the rest only through the search
    and TVM's static plan.
    """
    import tvm_ffi

    import tvm_autochunk as ac
    from relay_passes.driver import chunk_to_budget
    from relay_passes.errors import AutochunkError, BudgetInfeasibleError
    from relay_passes.estimate_memory import estimate_memory
    from relay_passes.lowering import as_target
    from relay_passes.planned_memory import planned_memory

    t0 = time.perf_counter()
    res = CaseResult(seed, g.recipe.to_json())
    mod = g.mod
    h0 = tvm_ffi.structural_hash(mod)
    script0 = mod.script()
    xs = g.inputs(0)

    def unexpected(where: str, e: BaseException) -> None:
        kind = "error:" + type(e).__name__
        if not isinstance(e, AutochunkError):
            kind = "undocumented-" + kind
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        res.fail(kind, f"{where}: {tb[:800]}")

    try:
        base = ac.build(mod, target)
        ref = base(*xs)
    except AutochunkError as e:  # TVM cannot build the graph itself: a documented refusal
        res.unbuildable = f"{type(e).__name__}: {str(e)[:300]}"
        res.seconds = time.perf_counter() - t0
        return res
    except Exception as e:
        unexpected("unchunked build", e)
        res.seconds = time.perf_counter() - t0
        return res
    rep = base.report
    res.need = need = int(rep.peak_bytes)
    err = _est_vs_plan(rep.estimated_peak_bytes, rep.planned_peak_bytes)
    if err > EST_TOL:
        res.fail(
            "estimate-vs-plan-unchunked",
            f"estimate {rep.estimated_peak_bytes} vs TVM plan {rep.planned_peak_bytes}",
        )

    def check_built(budget: int, art, rec: dict) -> None:
        r = art.report
        rec.update(
            outcome="built",
            plan=r.planned_peak_bytes,
            estimate=r.estimated_peak_bytes,
            peak=r.peak_bytes,
            regions=[(x["chunk"], x["n_chunks"]) for x in (r.chunking or {}).get("regions", [])],
        )
        lb = (r.chunking or {}).get("lower_bound_bytes")
        if lb is not None and lb > r.estimated_peak_bytes:
            res.fail("lower-bound-above-peak", f"lower bound {lb} > estimate "
                     f"{r.estimated_peak_bytes}: {r.chunking.get('lower_bound')}")
        if r.planned_peak_bytes > budget:
            res.fail("plan-over-budget", f"TVM plan {r.planned_peak_bytes} > budget {budget}")
        if r.peak_bytes > budget:
            res.fail("peak-over-budget", f"report peak {r.peak_bytes} > budget {budget}")
        e = _est_vs_plan(r.estimated_peak_bytes, r.planned_peak_bytes)
        if e > EST_TOL:
            res.fail(
                "estimate-vs-plan-chunked",
                f"budget {budget}: estimate {r.estimated_peak_bytes} vs plan "
                f"{r.planned_peak_bytes}",
            )
        out = art(*xs)
        rel = _rel_err(out, ref)
        rec["rel_err"] = rel if math.isfinite(rel) else "inf"
        if not rel <= REL_TOL:
            res.fail("numerics", f"budget {budget}: rel err {rel:.3g} vs the unchunked build")

    def check_planned(budget: int, rec: dict) -> None:
        # the search build() runs (auto_chunk; a refusal's min_budget is confirmed)
        out_mod, search = chunk_to_budget(mod, as_target(target), budget)
        plan = planned_memory(out_mod, target).peak_bytes
        prof = estimate_memory(out_mod, target)
        rec.update(
            outcome="planned",
            plan=int(plan),
            estimate=int(prof.peak_bytes),
            peak=max(int(prof.peak_bytes), int(prof.runtime_peak_bytes)),
            regions=[(s.region.chunk, s.n_chunks) for s in search.stages],
        )
        lb = search.lower_bound
        if lb is not None and lb.nbytes > prof.peak_bytes:
            res.fail("lower-bound-above-peak", f"lower bound {lb.describe()} > estimate "
                     f"{prof.peak_bytes} (search only)")
        if plan > budget:
            res.fail("plan-over-budget", f"TVM plan {plan} > budget {budget} (search only)")
        if rec["peak"] > budget:
            res.fail("peak-over-budget", f"estimated peak {rec['peak']} > budget {budget}")
        if _est_vs_plan(int(prof.peak_bytes), int(plan)) > EST_TOL:
            res.fail(
                "estimate-vs-plan-chunked",
                f"budget {budget}: estimate {prof.peak_bytes} vs plan {plan} (search only)",
            )

    checked_min: dict[int, dict] = {}
    for i, frac in enumerate(fractions):
        budget = max(1, int(need * frac))
        full = i < full_builds
        rec: dict = {"budget": budget, "fraction": round(frac, 4), "full": full}
        res.budgets.append(rec)
        try:
            if full:
                check_built(budget, ac.build(mod, target, budget=budget), rec)
            else:
                check_planned(budget, rec)
            continue
        except BudgetInfeasibleError as e:
            rec.update(outcome="refused", min_budget=e.min_budget, best_peak=e.best_peak)
            if budget >= need:
                res.fail("refused-above-peak", f"budget {budget} >= unchunked peak {need}: {e}")
            if "Remedy" not in str(e) or str(budget) not in str(e):
                res.fail("refusal-message", str(e)[:400])
            if e.min_budget is None or e.best_peak is None or e.unchunked_peak is None:
                res.fail("refusal-numbers", f"min_budget/best_peak/unchunked_peak missing: {e}")
                continue
            if e.lower_bound is not None and e.lower_bound > e.best_peak:
                res.fail("lower-bound-above-peak", f"refusal: lower bound {e.lower_bound} > "
                         f"smallest peak reached {e.best_peak}")
            if e.min_budget <= budget:
                res.fail("refusal-min-budget", f"min_budget {e.min_budget} <= budget {budget}")
                continue
            mb = int(e.min_budget)
        except Exception as e:
            unexpected(f"budget {budget} ({'build' if full else 'search'})", e)
            continue
        # refused: the suggested minimum must be accepted (each distinct one checked once)
        if mb in checked_min:
            rec["at_min_budget"] = {**checked_min[mb], "repeat": True}
            continue
        sub: dict = {"budget": mb, "full": full}
        rec["at_min_budget"] = checked_min[mb] = sub
        try:
            if full:
                check_built(mb, ac.build(mod, target, budget=mb), sub)
            else:
                check_planned(mb, sub)
        except BudgetInfeasibleError as e2:
            sub["outcome"] = "refused"
            res.fail("min-budget-refused", f"min_budget {mb} (for budget {budget}) refused: {e2}")
        except Exception as e2:
            unexpected(f"min_budget {mb} ({'build' if full else 'search'})", e2)

    if tvm_ffi.structural_hash(mod) != h0 or mod.script() != script0:
        res.fail("mutated-input", "build/auto_chunk changed the caller's IRModule")
    res.seconds = time.perf_counter() - t0
    return res


def draw_fractions(seed: int, n: int) -> list[float]:
    """Budgets as fractions of the unchunked peak, uniform in [0.1, 1): the floor AutoChunk
    reaches on these graphs is mostly 0.2-0.9 of the peak, so budgets land on both sides of it
    (a refusal then checks its ``min_budget``, the tightest budget that should work)."""
    rng = np.random.default_rng(seed + 7919)
    return [float(rng.uniform(0.1, 1.0)) for _ in range(n)]


def _run_one(job: tuple[int, int, int]) -> dict:
    seed, n_budgets, max_steps = job
    try:
        g = generate(RandomDraw(seed), max_steps)
    except Exception as e:  # the generator itself must never fail
        return {"seed": seed, "generator_error": repr(e)}
    return check_graph(g, draw_fractions(seed, n_budgets), seed=seed).to_dict()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graphs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", type=int, default=2, help="budgets per graph (first is built)")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this long")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz.jsonl"))
    args = ap.parse_args(argv)

    import logging
    import multiprocessing

    logging.disable(logging.WARNING)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_graphs = n_budgets = n_built = n_planned = n_refused = n_min = n_unbuildable = 0
    kinds: collections.Counter = collections.Counter()
    failing: list[int] = []
    stopped = None
    jobs = [(args.seed + k, args.budgets, args.max_steps) for k in range(args.graphs)]
    pool = multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else None
    results = pool.imap(_run_one, jobs) if pool else map(_run_one, jobs)
    with out.open("w") as f:
        for d in results:
            if args.minutes is not None and time.perf_counter() - t0 > args.minutes * 60:
                stopped = f"time limit of {args.minutes} min reached after {n_graphs} graphs"
                print(stopped, flush=True)
                break
            seed = d["seed"]
            if "generator_error" in d:
                kinds["generator-error"] += 1
                failing.append(seed)
                f.write(json.dumps(d) + "\n")
                continue
            n_graphs += 1
            n_unbuildable += "unbuildable" in d
            for b in d["budgets"]:
                n_budgets += 1
                o = b.get("outcome")
                n_built += o == "built"
                n_planned += o == "planned"
                n_refused += o == "refused"
                sub = b.get("at_min_budget")
                if sub and not sub.get("repeat"):
                    n_min += 1
                    n_built += sub.get("outcome") == "built"
                    n_planned += sub.get("outcome") == "planned"
            for fl in d["failures"]:
                kinds[fl["kind"]] += 1
            if d["failures"]:
                failing.append(seed)
                detail = "\n".join(f"  {fl['kind']}: {fl['detail']}" for fl in d["failures"])
                print(
                    f"seed {seed}: FAIL\n{detail}\n  recipe: {json.dumps(d['recipe'])}", flush=True
                )
            f.write(json.dumps(d) + "\n")
            f.flush()
            if n_graphs % 50 == 0:
                print(
                    f"[{time.perf_counter() - t0:7.1f}s] {n_graphs} graphs, {n_refused} "
                    f"refusals, {sum(kinds.values())} failures",
                    flush=True,
                )
    if pool:
        pool.terminate()
    wall = time.perf_counter() - t0
    summary = {
        "summary": True,
        "graphs": n_graphs,
        "unbuildable_by_tvm": n_unbuildable,
        "budgets_tried": n_budgets,
        "min_budget_checks": n_min,
        "builds_run_and_compared": n_built,
        "searched_and_planned": n_planned,
        "refusals": n_refused,
        "failures": sum(kinds.values()),
        "failures_by_kind": dict(kinds),
        "failing_seeds": failing,
        "stopped": stopped,
        "wall_seconds": round(wall, 1),
        "command": "benchmarks/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with out.open("a") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps(summary, indent=2))
    return 1 if kinds else 0


if __name__ == "__main__":
    sys.exit(main())
