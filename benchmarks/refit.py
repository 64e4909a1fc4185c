"""The joint re-fit on llvm: the greedy plan against the re-fitted one, timed in one process.

``SearchOptions.refit_evals`` is 4 on every target. This is the measurement behind it: for
each case, the module is built unchunked, with the greedy plan (``refit_evals=0``) and with
the re-fitted plan (``refit_evals=4``), and the three builds are timed in interleaved rounds
(median). Writes ``benchmarks/results/refit.jsonl``: the plans (chunk x calls per region),
TVM's planned bytes, the predicted added time of each plan and the measured time relative to
unchunked.

    python benchmarks/refit.py                   # Evoformer N=256 and N=128 at 20%: ~3 min
    python benchmarks/refit.py --quick           # Evoformer N=256 at 20%, 2 rounds
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = (("evoformer", 256, 0.2), ("evoformer", 128, 0.2))


def run_case(family: str, size: int, fraction: float, rounds: int) -> dict:
    import tvm_autochunk as ac
    from benchmarks.env import env_info
    from benchmarks.models import workload
    from benchmarks.timing import interleaved_medians
    from relay_passes.auto_chunk import auto_chunk
    from relay_passes.search import SearchOptions

    w = workload(family, size)
    mod = ac.from_torch(w.module, w.inputs)
    x = [t.numpy() for t in w.inputs]
    base = ac.build(mod, "llvm")
    budget = int(base.report.peak_bytes * fraction)
    row = {"family": family, "size": size, "budget": f"{fraction:.0%}", "budget_bytes": budget,
           "env": env_info(), "plans": {}}
    arts = {"unchunked": base}
    for name, opts in (("greedy", SearchOptions(refit_evals=0)),
                       ("refit", SearchOptions(refit_evals=4))):
        m, res = auto_chunk(mod, "llvm", budget, options=opts)
        arts[name] = ac.build(m, "llvm", budget=budget)  # fits already: no second search
        row["plans"][name] = {
            "regions": [[s.region.chunk, s.n_chunks] for s in res.stages],
            "refit_from": [s.refit_from for s in res.stages],
            "planned_bytes": arts[name].report.planned_peak_bytes,
            "predicted_overhead_us": round(res.predicted_overhead_us, 1),
            "evaluations": res.evaluations,
            "search_s": round(res.search_seconds, 3),
        }
    gc.freeze()
    med = interleaved_medians(arts, x, rounds)
    row["unchunked_s"] = round(med["unchunked"], 4)
    for k in ("greedy", "refit"):
        row["plans"][k]["time_s"] = round(med[k], 4)
        row["plans"][k]["vs_unchunked"] = round(med[k] / med["unchunked"], 3)
    row["rounds"] = rounds
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refit.jsonl"))
    args = ap.parse_args(argv)
    cases = CASES[:1] if args.quick else CASES
    rounds = 2 if args.quick else args.rounds
    rows = []
    for fam, size, frac in cases:
        r = run_case(fam, size, frac, rounds)
        rows.append(r)
        g, f = r["plans"]["greedy"], r["plans"]["refit"]
        print(f"{fam} {size} at {frac:.0%}: greedy {g['regions']} {g['vs_unchunked']}x, "
              f"re-fitted {f['regions']} {f['vs_unchunked']}x (predicted added "
              f"{g['predicted_overhead_us'] / 1e3:.2f} vs {f['predicted_overhead_us'] / 1e3:.2f}"
              " ms)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
