"""The chunk plans ``build`` picks, recorded, so that a refactor can show it changed none.

Points: the llvm budget sweep (the sweep's four default cases and the search-time cases, at
50/20/10/5% of the unchunked peak and at the smallest budget a refusal suggests) and the
CUDA search-time points (sm_90, 50/20/10%). Each row holds the plan (regions with their
chunk sizes) or the refusal's numbers. Builds only; nothing is run.

    .venv/bin/python benchmarks/plans.py --out /tmp/before.jsonl     # record
    .venv/bin/python benchmarks/plans.py --check /tmp/before.jsonl   # search again, compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLVM_CASES = [
    "evoformer:128", "gpt:1024:1", "vit:1024:1", "unet:48",
    "gpt:4096:1", "vit:2304:1", "evoformer:256", "unet:128",
]
CUDA_CASES = ["gpt:4096:1", "vit:2304:1", "evoformer:256", "unet:128"]


def _points(target: str, case: str, fractions, with_min: bool):
    import tvm_autochunk as ac
    from benchmarks.models import workload

    family, size, *rest = case.split(":")
    kw = {"layers": int(rest[0])} if rest else {}
    w = workload(family, int(size), **kw)
    mod = ac.from_torch(w.module, w.inputs)
    arch = {"arch": "sm_90"} if target == "cuda" else {}
    peak0 = ac.estimate(mod, target, **arch).peak_bytes
    budgets = [(f"{f * 100:g}%", int(peak0 * f)) for f in fractions]
    if with_min:
        try:
            ac.build(mod, target, budget=1, **arch)
        except ac.BudgetInfeasibleError as e:
            budgets.append(("min", e.min_budget))
    for label, budget in budgets:
        row = {"target": target, "case": case, "budget": label, "budget_bytes": budget}
        try:
            art = ac.build(mod, target, budget=budget, **arch)
        except ac.BudgetInfeasibleError as e:
            row.update(ok=False, best_peak=e.best_peak, min_budget=e.min_budget)
        else:
            ch = art.report.chunking or {}
            row.update(
                ok=True,
                regions=[
                    [r["start"], r["end"], r["seed"], r["dim"], r["chunk"], r["n_chunks"]]
                    for r in ch.get("regions", [])
                ],
                planned_peak=art.report.planned_peak_bytes,
            )
        yield row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the rows here (JSON lines)")
    ap.add_argument("--check", help="compare with the rows of an earlier run")
    ap.add_argument("--targets", nargs="+", default=["llvm", "cuda"])
    args = ap.parse_args(argv)
    rows = []
    for target in args.targets:
        cases = LLVM_CASES if target == "llvm" else CUDA_CASES
        fractions = (0.5, 0.2, 0.1, 0.05) if target == "llvm" else (0.5, 0.2, 0.1)
        for case in cases:
            for row in _points(target, case, fractions, with_min=target == "llvm"):
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.check:
        key = lambda r: (r["target"], r["case"], r["budget"])  # noqa: E731
        old = {key(r): r for r in map(json.loads, Path(args.check).read_text().splitlines())}
        diff = [(old.get(key(r)), r) for r in rows if old.get(key(r)) != r]
        for a, b in diff:
            print(f"CHANGED {key(b)}:\n  before {a}\n  after  {b}")
        print(f"{len(rows)} points, {len(diff)} changed")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
