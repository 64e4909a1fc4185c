"""How low each model goes: the peak the search reaches at budgets given as shares of the
unchunked peak (llvm), searched as ``build`` searches (``driver.chunk_to_budget``: weight
layouts folded, deeper aims after a refusal), without building. A refused share prints the
smallest peak reached in brackets; the lower bound (``relay_passes.lower_bound``) is the least
peak any chunking the search can build could reach.

    .venv/bin/python benchmarks/floors.py                     # the four models of cpu_speed.py
    .venv/bin/python benchmarks/floors.py --case vit:1024:1 --shares 0.3 0.25
    .venv/bin/python benchmarks/floors.py --quick             # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ["gpt:1024:1", "vit:1024:1", "evoformer:128", "unet:48"]
SHARES = (0.3, 0.2, 0.15, 0.1)
MIB = 2**20


def run(case: str, shares) -> dict:
    import tvm_autochunk as ac
    from benchmarks.models import workload
    from relay_passes.auto_chunk import need_bytes
    from relay_passes.driver import chunk_to_budget
    from relay_passes.estimate_memory import estimate_memory
    from relay_passes.fold_weight_layouts import fold_weight_layouts
    from relay_passes.lower_bound import lower_bound

    family, size, *rest = case.split(":")
    w = workload(family, int(size), **({"layers": int(rest[0])} if rest else {}))
    mod = fold_weight_layouts(ac.from_torch(w.module, w.inputs))
    target = ac.resolve_target("llvm")
    prof = estimate_memory(mod, target)
    peak = need_bytes(prof)
    bound = lower_bound(mod, target)
    row = {"case": case, "unchunked_bytes": peak, "lower_bound_bytes": bound.nbytes,
           "lower_bound": bound.describe(), "points": []}
    for share in shares:
        t = time.perf_counter()
        try:
            _, res = chunk_to_budget(mod, target, int(peak * share), profile=prof)
            point = {"share": share, "ok": True, "peak_bytes": res.final_peak,
                     "stages": len(res.stages), "deeper": any("found aiming" in n
                                                              for n in res.notes)}
        except ac.BudgetInfeasibleError as e:
            point = {"share": share, "ok": False, "peak_bytes": e.best_peak}
        point["search_s"] = round(time.perf_counter() - t, 2)
        row["points"].append(point)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="family:size[:layers] (repeatable)")
    ap.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    ap.add_argument("--quick", action="store_true", help="GPT S=256, 70%%: smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.case, args.shares = ["gpt:256:1"], [0.7]
    shares = args.shares
    print("| model | unchunked MiB | lower bound MiB | "
          + " | ".join(f"{s:.0%}" for s in shares) + " |")
    print("|---|---|---|" + "---|" * len(shares))
    for case in args.case or CASES:
        row = run(case, shares)
        cells = [f"{p['peak_bytes'] / MIB:.1f}" if p["ok"] else f"- ({p['peak_bytes'] / MIB:.1f})"
                 for p in row["points"]]
        print(f"| {case} | {row['unchunked_bytes'] / MIB:.1f} | "
              f"{row['lower_bound_bytes'] / MIB:.1f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
