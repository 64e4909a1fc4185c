"""CPU speed side by side (issue 20): torch eager, TVM's default build, and ours, in one process.

Per family and size, interleaved rounds (median of ``--repeats``), every contender at the same
thread count (``--threads``, default every core; torch.set_num_threads and TVM's pool):

* ``torch``: the module in eager mode (no_grad);
* ``tvm_default``: ``tvm.compile(mod, Target("llvm"))``, what TVM gives without us;
* ``ours``: ``tvm_autochunk.build(mod, "llvm")`` unchunked, and at 20% and 10% of its peak;
  where a share is refused, also at the smallest budget that builds (the refusal's suggestion).

TVM's default build is slow (UNet: seconds per call), so it is timed ``--default-repeats``
times, after the others. Rows go to ``benchmarks/results/cpu_speed.jsonl``.

    .venv/bin/python benchmarks/cpu_speed.py                      # the sweep sizes
    .venv/bin/python benchmarks/cpu_speed.py --case gpt:1024:1 --repeats 9
    .venv/bin/python benchmarks/cpu_speed.py --quick              # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ["gpt:1024:1", "vit:1024:1", "evoformer:128", "unet:48"]
SHARES = (0.2, 0.1)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _timed_build(ac, mod, budget, compile_s, peaks, name):
    t = time.perf_counter()
    art = ac.build(mod, "llvm", budget=budget)
    compile_s[name] = time.perf_counter() - t
    peaks[name] = art.report.peak_bytes
    return art


def run(case: str, threads: int, repeats: int, default_repeats: int) -> dict:
    import torch
    import tvm
    from tvm import relax

    import tvm_autochunk as ac
    from benchmarks.env import env_info
    from benchmarks.models import workload
    from benchmarks.timing import interleaved_medians

    family, size, *rest = case.split(":")
    kw = {"layers": int(rest[0])} if rest else {}
    w = workload(family, int(size), **kw)
    mod = ac.from_torch(w.module, w.inputs)
    x = [t.numpy() for t in w.inputs]
    with torch.no_grad():
        ref = w.module(*w.inputs)
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()

    fns, compile_s, errs, peaks = {}, {}, {}, {}
    t = time.perf_counter()
    base = ac.build(mod, "llvm")
    compile_s["ours"] = time.perf_counter() - t
    peaks["ours"] = base.report.peak_bytes
    fns["ours"] = base
    refused, floor = [], None
    for share in SHARES:
        budget = int(base.report.peak_bytes * share)
        try:
            fns[f"ours_{share * 100:g}%"] = _timed_build(ac, mod, budget, compile_s, peaks,
                                                         f"ours_{share * 100:g}%")
        except ac.BudgetInfeasibleError as e:
            refused.append(f"{share * 100:g}%")
            floor = e.min_budget if e.min_budget and e.min_budget < peaks["ours"] else floor
    if refused and floor is not None:  # the smallest budget that builds: a refusal's suggestion
        fns["ours_floor"] = _timed_build(ac, mod, floor, compile_s, peaks, "ours_floor")
    used = ac.set_threads(threads)
    torch.set_num_threads(used)

    def eager(*args):
        with torch.no_grad():
            return w.module(*args)

    for name, art in fns.items():
        out = art(*x)
        errs[name] = _rel_err(out[0] if isinstance(out, tuple) else out, ref)
    ours = {k: (lambda *a, f=f: f(*[t.numpy() for t in a])) for k, f in fns.items()}
    medians = interleaved_medians({"torch": eager, **ours}, w.inputs, repeats)
    # TVM's own default build, as tvm.compile gives it (no schedule: slow, timed apart)
    t = time.perf_counter()
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    compile_s["tvm_default"] = time.perf_counter() - t
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in x]
    medians.update(interleaved_medians({"tvm_default": lambda: vm["main"](*args)}, (),
                                       default_repeats))
    row = {
        "family": family, "size": int(size), "layers": kw.get("layers"), "threads": used,
        "repeats": repeats,
        **{f"{k}_ms": round(v * 1e3, 2) for k, v in medians.items()},
        **{f"{k}_vs_torch": round(v / medians["torch"], 3) for k, v in medians.items()
           if k != "torch"},
        **{f"{k}_vs_ours": round(medians[k] / medians["ours"], 3) for k in fns if k != "ours"},
        "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
        "peak_bytes": peaks,
        "refused": refused,
        "floor_share": round(floor / peaks["ours"], 3) if "ours_floor" in fns else None,
        "max_rel_err_vs_torch": {k: float(f"{v:.2e}") for k, v in errs.items()},
        "env": env_info(),
    }
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="family:size[:layers] (repeatable)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--default-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu_speed.jsonl"))
    ap.add_argument("--quick", action="store_true", help="GPT S=128, 2 repeats: smoke test")
    args = ap.parse_args(argv)
    import tvm_autochunk as ac

    threads = ac.set_threads(args.threads)
    if args.quick:
        args.case, args.repeats, args.default_repeats = ["gpt:128:1"], 2, 1
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for case in args.case or CASES:
            row = run(case, threads, args.repeats, args.default_repeats)
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "env"}), flush=True)
    print("\n| model | threads | torch ms | TVM default ms | ours ms | ours / torch | "
          "20% ms | 10% ms | floor (share) ms | floor / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        floor = (f"{r['ours_floor_ms']} ({r['floor_share']:.0%})" if r.get("floor_share")
                 else "-")
        print(f"| {r['family']} {r['size']} | {r['threads']} | {r['torch_ms']} | "
              f"{r['tvm_default_ms']} | {r['ours_ms']} | {r['ours_vs_torch']} | "
              f"{r.get('ours_20%_ms', 'refused')} | {r.get('ours_10%_ms', 'refused')} | "
              f"{floor} | {r.get('ours_floor_vs_ours', '-')} |")
    print(f"\nJSON lines: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
