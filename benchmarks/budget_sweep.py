"""Issue 4 budget sweep: AutoChunk at 50/20/10/5% of the unchunked peak and at the minimum.

Per family and budget: build with ``tvm_autochunk.build(budget=...)``; check TVM's plan <= budget;
export and measure one call's peak RSS in a fresh process (<= budget + max(1 MiB, 1%): allocator
and page rounding); compare outputs with the unchunked build (max relative error); time both
builds in the same process, interleaved, median of ``--repeats`` runs.

    python benchmarks/budget_sweep.py                       # default sizes (~20 min on 2 cores)
    python benchmarks/budget_sweep.py --quick               # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20
FRACTIONS = (0.5, 0.2, 0.1, 0.05)


def sweep(family: str, size: int, repeats: int, measure: bool, kw: dict,
          fractions=FRACTIONS, with_min: bool = True) -> list[dict]:
    import tvm_autochunk as ac
    from benchmarks.env import env_info
    from benchmarks.models import workload
    from benchmarks.timing import interleaved_medians
    from relay_passes.fold_weight_layouts import fold_weight_layouts
    from relay_passes.lower_bound import lower_bound
    from tvm_autochunk.measure import allowance, measure_peak

    w = workload(family, size, **kw)
    mod = ac.from_torch(w.module, w.inputs)
    x = [t.numpy() for t in w.inputs]
    base = ac.build(mod, "llvm")
    ref = base(*x)
    peak0 = base.report.peak_bytes
    budgets = [(f"{f * 100:g}%", int(peak0 * f)) for f in fractions]
    # no chunking the search can build peaks lower, on the module build() searches
    bound = lower_bound(fold_weight_layouts(mod), ac.resolve_target("llvm")).nbytes
    if with_min:
        try:
            ac.build(mod, "llvm", budget=1)
        except ac.BudgetInfeasibleError as e:
            if e.min_budget:
                budgets.append(("min", int(e.min_budget)))
    rows = []
    for label, budget in budgets:
        row = {
            "family": family,
            "size": size,
            "budget": label,
            "budget_bytes": budget,
            "unchunked_peak_bytes": peak0,
            "lower_bound_bytes": bound,
            "layers": kw.get("layers"),
            "env": env_info(),
        }
        t = time.perf_counter()
        try:
            art = ac.build(mod, "llvm", budget=budget)
        except ac.BudgetInfeasibleError as e:
            row.update(ok=False, error=str(e)[:1500], build_s=round(time.perf_counter() - t, 2))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "env"}), flush=True)
            continue
        row["build_s"] = round(time.perf_counter() - t, 2)
        ch = art.report.chunking or {}
        out = art(*x)
        row.update(
            ok=True,
            plan_bytes=art.report.planned_peak_bytes,
            peak_bytes=art.report.peak_bytes,
            plan_within_budget=art.report.planned_peak_bytes <= budget,
            cut_pct=round(100 * (1 - art.report.peak_bytes / peak0), 1),
            regions=[
                (r["start"], r["end"], r["chunk"], r["n_chunks"]) for r in ch.get("regions", [])
            ],
            search_s=ch.get("search_seconds"),
            max_rel_err=float(np.abs(out - ref).max() / np.abs(ref).max()),
        )
        if measure:
            with tempfile.TemporaryDirectory() as tmp:
                m = measure_peak(art.export(Path(tmp) / "a.so"), x)
            tol = allowance(budget)
            row.update(measured_bytes=m.peak_bytes, measured_within=m.peak_bytes <= budget + tol)
        if repeats:
            med = interleaved_medians({"unchunked": base, "chunked": art}, x, repeats,
                                      warm_up=False)
            tc, tu = med["chunked"], med["unchunked"]
            row.update(
                time_chunked_s=round(tc, 3),
                time_unchunked_s=round(tu, 3),
                slowdown=round(tc / tu, 3),
            )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "env"}), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--families", nargs="*")
    ap.add_argument("--case", action="append", default=[],
                    help="FAMILY:SIZE[:LAYERS] instead of the default cases (repeatable)")
    ap.add_argument("--fractions", nargs="*", type=float, default=list(FRACTIONS))
    ap.add_argument("--no-min", action="store_true", help="skip the minimum reachable budget")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "budget_sweep.jsonl"))
    args = ap.parse_args(argv)
    if args.quick:
        cases = [("gpt", 256, {"layers": 1})]
        repeats, measure = 1, False
    else:
        cases = [
            ("evoformer", 128, {}),
            ("gpt", 1024, {"layers": 1}),
            ("vit", 1024, {"layers": 1}),
            ("unet", 48, {}),
        ]
        repeats, measure = args.repeats, True
    if args.case:
        cases = []
        for c in args.case:
            parts = c.split(":")
            kw = {"layers": int(parts[2])} if len(parts) > 2 else {}
            cases.append((parts[0], int(parts[1]), kw))
    if args.families:
        cases = [c for c in cases if c[0] in args.families]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with out.open("w") as f:
        for fam, size, kw in cases:
            for r in sweep(fam, size, repeats, measure, kw, tuple(args.fractions),
                           not args.no_min):
                rows.append(r)
                f.write(json.dumps(r) + "\n")
    print(
        "\n| model | size | budget | plan MiB | measured MiB | lower bound MiB | cut | slowdown "
        "| regions (chunk x n) | max rel err | search s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        lb = r.get("lower_bound_bytes")
        lb = f"{lb / MIB:.1f}" if lb is not None else "-"
        if not r["ok"]:
            print(
                f"| {r['family']} | {r['size']} | {r['budget']} ({r['budget_bytes'] / MIB:.1f}"
                f" MiB) | refused | - | {lb} | - | - | - | - | - |"
            )
            continue
        regs = ", ".join(f"{c}x{n}" for _, _, c, n in r["regions"]) or "none"
        meas = f"{r['measured_bytes'] / MIB:.1f}" if "measured_bytes" in r else "-"
        print(
            f"| {r['family']} | {r['size']} | {r['budget']} ({r['budget_bytes'] / MIB:.1f} MiB)"
            f" | {r['plan_bytes'] / MIB:.1f} | {meas} | {lb} | {r['cut_pct']}% | "
            f"{r.get('slowdown', '-')} | {regs} | {r['max_rel_err']:.1e} | {r['search_s']} |"
        )
    bad = [
        r
        for r in rows
        if r["ok"]
        and (
            not r["plan_within_budget"]
            or r.get("measured_within") is False
            or r["max_rel_err"] > 1e-5
        )
    ]
    print(f"\n{len(rows)} points, {sum(r['ok'] for r in rows)} built, violations: {len(bad)}")
    print(f"JSON lines: {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
