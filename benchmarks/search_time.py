"""AutoChunk search time against TVM's own build time, per target (issue 4: search + rewrite
must stay under 20% of TVM's build of the model).

For each model and budget: ``tvm_autochunk.build(mod, target, budget)`` once, after one warm-up
build (first-use costs: TVM's lazy imports, TVMScript parsing); ``search s`` is the AutoChunk
search (estimates, candidate analysis, every trial rewrite), ``TVM build s`` is
``tvm.compile`` of the chunked module with our pipeline (for CUDA this includes nvcc). Builds
only: no GPU is needed, nothing is run.

    .venv/bin/python benchmarks/search_time.py                     # llvm and cuda (sm_90)
    .venv/bin/python benchmarks/search_time.py --targets llvm --case gpt:4096:1
    .venv/bin/python benchmarks/search_time.py --quick          # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ["gpt:4096:1", "vit:2304:1", "evoformer:256", "unet:128"]
FRACTIONS = (0.5, 0.2, 0.1)


def run(case: str, target: str, fractions, arch: str) -> list[dict]:
    import tvm_autochunk as ac
    from benchmarks.env import env_info
    from benchmarks.models import workload

    parts = case.split(":")
    family, size = parts[0], int(parts[1])
    kw = {"layers": int(parts[2])} if len(parts) > 2 else {}
    w = workload(family, size, **kw)
    mod = ac.from_torch(w.module, w.inputs)
    arch_kw = {"arch": arch} if target == "cuda" else {}
    base = ac.build(mod, target, **arch_kw)  # warm-up, and the unchunked peak
    peak0 = base.report.peak_bytes
    rows = []
    for f in fractions:
        budget = int(peak0 * f)
        row = {"family": family, "size": size, "layers": kw.get("layers"), "target": target,
               "budget": f"{f * 100:g}%", "budget_bytes": budget,
               "unchunked_peak_bytes": peak0, "env": env_info()}
        t = time.perf_counter()
        try:
            art = ac.build(mod, target, budget=budget, **arch_kw)
        except ac.BudgetInfeasibleError as e:
            row.update(ok=False, error=str(e)[:200], total_s=round(time.perf_counter() - t, 2))
        else:
            ch = art.report.chunking or {}
            tvm_s = art.report.extra.get("build_seconds")
            row.update(
                ok=True,
                total_s=round(time.perf_counter() - t, 2),
                search_s=ch.get("search_seconds"),
                evaluations=ch.get("evaluations"),
                tvm_build_s=tvm_s,
                search_over_build=round(ch.get("search_seconds", 0) / tvm_s, 3) if tvm_s else None,
                regions=[(r["chunk"], r["n_chunks"]) for r in ch.get("regions", [])],
                plan_bytes=art.report.planned_peak_bytes,
                plan_within_budget=art.report.planned_peak_bytes <= budget,
            )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "env"}), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="family:size[:layers] (repeatable)")
    ap.add_argument("--targets", nargs="+", default=["llvm", "cuda"])
    ap.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    ap.add_argument("--arch", default="sm_90", help="CUDA arch for target cuda (default sm_90)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/search_time.jsonl"))
    ap.add_argument("--quick", action="store_true", help="GPT S=512, llvm, 70%%: smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.case, args.targets, args.fractions = ["gpt:512:1"], ["llvm"], [0.7]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with out.open("w") as f:
        for target in args.targets:
            for case in args.case or CASES:
                for r in run(case, target, args.fractions, args.arch):
                    rows.append(r)
                    f.write(json.dumps(r) + "\n")
    print("\n| model | target | budget | search s | evals | TVM build s | search / build |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["ok"]:
            print(f"| {r['family']} {r['size']} | {r['target']} | {r['budget']} | "
                  f"{r['search_s']:.2f} | {r['evaluations']} | {r['tvm_build_s']:.2f} | "
                  f"{r['search_over_build']:.2f} |")
        else:
            print(f"| {r['family']} {r['size']} | {r['target']} | {r['budget']} | refused | | | |")
    bad = [r for r in rows if r["ok"] and not r["plan_within_budget"]]
    print(f"\n{len(rows)} points; over budget: {len(bad)}; JSON lines: {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
