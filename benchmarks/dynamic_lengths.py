"""Dynamic lengths (issue 23): one artifact for every length up to a bound, under one budget.

Per case ``family:bound`` (the model exported with ``Dim("S", min=2, max=bound)``):

* the dynamic build under ``--share`` of its unchunked peak at the bound, exported once;
* at each length L (the minimum, an odd length, half the bound, the bound): the dynamic
  artifact's peak measured in a fresh process and its error against torch; torch eager, a
  static build at L under the same budget, and that static build with attention left
  unfused, timed interleaved with it in one process at the same threads (median of
  ``--repeats``); TVM's default build of the symbolic module (``tvm.compile``, nothing
  scheduled: slow, so timed apart, median of ``--default-repeats``);
* the peak in a fresh process at evenly spaced lengths (the memory curve, printed as bars);
* compile time (search and build) of the dynamic build at each of ``--bounds``.

Rows go to ``benchmarks/results/dynamic_lengths.jsonl``.

    .venv/bin/python benchmarks/dynamic_lengths.py
    .venv/bin/python benchmarks/dynamic_lengths.py --case gpt:4096 --share 0.5
    .venv/bin/python benchmarks/dynamic_lengths.py --quick     # tiny, for the smoke test
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


def _export(family: str, bound: int, lo: int = 2):
    import torch

    import tvm_autochunk as ac
    from benchmarks.models import workload

    w = workload(family, bound)
    S = torch.export.Dim("S", min=lo, max=bound)
    return w, ac.from_torch(w.module, w.inputs, dynamic_shapes=({1: S},))


def _inputs(w, n: int):
    shape = list(w.inputs[0].shape)
    shape[1] = n
    return [np.random.default_rng(n).standard_normal(shape).astype("float32")]


def run_case(case: str, share: float, threads: int, repeats: int, lengths=None,
             default_repeats: int = 1, points: int = 9) -> dict:
    import torch

    import tvm_autochunk as ac
    from benchmarks.env import env_info
    from benchmarks.models import workload
    from benchmarks.timing import interleaved_medians
    from relay_passes.attention import leave_unfused
    from relay_passes.dynamic_chunk import symbolic_bounds
    from tvm_autochunk.measure import measure_peak

    family, bound = case.split(":")
    bound = int(bound)
    w, dyn = _export(family, bound)
    (dim,) = symbolic_bounds(dyn)
    full = ac.estimate(dyn, target="llvm").peak_bytes
    budget = int(full * share)
    t0 = time.perf_counter()
    art = ac.build(dyn, target="llvm", budget=budget)
    build_s = time.perf_counter() - t0
    # TVM's default build of the same symbolic module (no schedules: slow, timed apart)
    import tvm

    default_vm = tvm.relax.VirtualMachine(tvm.compile(dyn, target=tvm.target.Target("llvm")),
                                          tvm.cpu())
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = art.export(Path(tmp) / "dyn.so")
        for n in lengths or (2, 37, bound // 2 + 1, bound):
            x = _inputs(w, n)
            with torch.no_grad():
                ref = w.module(torch.from_numpy(x[0]))
            ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
            m = measure_peak(path, x, entry=art.entry_for({dim: n}))
            ws = workload(family, n)
            static_mod = ac.from_torch(ws.module, ws.inputs)
            builds = {"dynamic": art}
            variants = (("static", static_mod), ("static_unfused", leave_unfused(static_mod)))
            for name, mod in variants:
                try:
                    builds[name] = ac.build(mod, target="llvm", budget=budget)
                except (ac.BudgetError, ac.BudgetInfeasibleError) as e:  # noted in the row
                    builds[name] = None
                    print(f"  {case} L={n}: {name} refused: {str(e)[:160]}")
            fns = {k: (lambda *_, a=a: a(*x)) for k, a in builds.items() if a is not None}
            tx = torch.from_numpy(x[0])

            def eager(tx=tx):
                with torch.no_grad():
                    return w.module(tx)

            med = interleaved_medians({**fns, "torch": eager}, (), repeats)
            tv = tvm.runtime.tensor(x[0])
            med.update(interleaved_medians({"tvm_default": lambda: default_vm["main"](tv)}, (),
                                           default_repeats))
            row = {
                "length": n,
                "function": art.entry_for({dim: n}),
                "measured_peak_bytes": m.peak_bytes,
                "max_abs_err_vs_torch": float(np.abs(art(*x) - ref).max()),
                **{f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()},
                **{f"dynamic_vs_{k}": round(med["dynamic"] / v, 3)
                   for k, v in med.items() if k != "dynamic"},
                "static_peak_bytes": {k: (a.report.peak_bytes if a is not None else None)
                                      for k, a in builds.items() if k != "dynamic"},
            }
            rows.append(row)
        # the memory curve: the peak in a fresh process at evenly spaced lengths
        curve = []
        for n in sorted({max(2, bound * k // (points - 1)) for k in range(points)}):
            fn = art.entry_for({dim: n})
            curve.append({"length": n, "function": fn, "measured_peak_bytes":
                          measure_peak(path, _inputs(w, n), entry=fn).peak_bytes})
    return {
        "case": case, "bound": bound, "share": share, "budget_bytes": budget,
        "unchunked_peak_bytes": full, "planned_peak_bytes": art.report.planned_peak_bytes,
        "estimated_peak_bytes": art.report.estimated_peak_bytes, "build_seconds": build_s,
        "regions": len((art.report.chunking or {}).get("regions", [])),
        "threads": threads, "repeats": repeats, "default_repeats": default_repeats,
        "rows": rows, "curve": curve, "short_entry": art.meta.get("short_entry"),
        "report_lengths": art.report.to_dict().get("lengths"), "env": env_info(),
    }


def compile_times(family: str, bounds, share: float) -> list[dict]:
    import tvm_autochunk as ac

    out = []
    for b in bounds:
        _w, dyn = _export(family, b)
        full = ac.estimate(dyn, target="llvm").peak_bytes
        t0 = time.perf_counter()
        art = ac.build(dyn, target="llvm", budget=int(full * share))
        secs = time.perf_counter() - t0
        out.append({"bound": b, "build_seconds": round(secs, 2),
                    "planned_peak_bytes": art.report.planned_peak_bytes,
                    "unchunked_peak_bytes": full})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="family:bound (repeatable); default gpt:2048")
    ap.add_argument("--share", type=float, default=0.75)
    ap.add_argument("--bounds", type=int, nargs="*", default=[2048, 32768],
                    help="bounds whose compile times are compared (gpt)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--default-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/dynamic_lengths.jsonl"))
    ap.add_argument("--quick", action="store_true", help="GPT bound 128, 1 repeat: smoke test")
    args = ap.parse_args(argv)
    import tvm_autochunk as ac

    threads = ac.set_threads(args.threads)
    lengths, points = None, 9
    if args.quick:
        args.case, args.repeats, args.share, args.bounds = ["gpt:128"], 1, 0.8, []
        lengths, points = (2, 37), 3
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for case in args.case or ["gpt:2048"]:
            r = run_case(case, args.share, threads, args.repeats, lengths, args.default_repeats,
                         points)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"\n{case}: budget {r['budget_bytes'] / MIB:.1f} MiB ({args.share:.0%} of "
                  f"{r['unchunked_peak_bytes'] / MIB:.1f}), TVM's plan at the bound "
                  f"{r['planned_peak_bytes'] / MIB:.2f} MiB, {r['regions']} region(s), "
                  f"built in {r['build_seconds']:.1f} s")
            if r["short_entry"]:
                print(f"lengths up to {r['short_entry']['bound']} run main_short (unchunked)")
            print("| L | runs | measured peak MiB | max err | torch ms | TVM default ms | "
                  "dynamic ms | static ms | static, attention unfused, ms | dynamic / torch | "
                  "dynamic / static |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for row in r["rows"]:
                print(f"| {row['length']} | {row['function']} | "
                      f"{row['measured_peak_bytes'] / MIB:.2f} | "
                      f"{row['max_abs_err_vs_torch']:.1e} | {row['torch_ms']} | "
                      f"{row['tvm_default_ms']} | {row['dynamic_ms']} | "
                      f"{row.get('static_ms', '-')} | {row.get('static_unfused_ms', '-')} | "
                      f"{row['dynamic_vs_torch']} | {row.get('dynamic_vs_static', '-')} |",
                      flush=True)
            top = max(c["measured_peak_bytes"] for c in r["curve"])
            print(f"measured peak by length (budget {r['budget_bytes'] / MIB:.1f} MiB):")
            for c in r["curve"]:
                bar = "#" * max(1, round(40 * c["measured_peak_bytes"] / top))
                print(f"  {c['length']:>6} {c['measured_peak_bytes'] / MIB:7.2f} MiB "
                      f"{c['function']:<10} {bar}")
        if args.bounds:
            ct = compile_times("gpt", args.bounds, args.share)
            f.write(json.dumps({"compile_times": ct, "share": args.share}) + "\n")
            for c in ct:
                print(f"bound {c['bound']}: built in {c['build_seconds']} s, TVM's plan "
                      f"{c['planned_peak_bytes'] / MIB:.1f} of "
                      f"{c['unchunked_peak_bytes'] / MIB:.1f} MiB")
    print(f"\nJSON lines: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
