"""How close is our memory estimate to TVM's plan and to the real peak?

For each model family and size: import (torch.export -> Relax), estimate with
``relay_passes.estimate_memory``, build with TVM for llvm (our pipeline, which reads TVM's
``StaticPlanBlockMemory`` result), export the library, and measure the peak RSS of one call in a
fresh process (``tvm_autochunk.measure``). Two estimates are compared:

* ``estimate`` (``peak_bytes``): our replay of TVM's static plan + workspace, vs TVM's plan;
* ``runtime estimate`` (``runtime_peak_bytes``): our simulation of the VM's pools, vs measured.

Targets (issue 2): estimate within 2% of the plan; within 5% of the measured peak for peaks
>= 64 MiB. Writes JSON lines to ``benchmarks/results/estimator_accuracy.jsonl`` and prints a
markdown table.

    python benchmarks/estimator_accuracy.py                 # full sweep (minutes)
    python benchmarks/estimator_accuracy.py --quick         # one small size per family
    python benchmarks/estimator_accuracy.py --families gpt --sizes 512 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20


def _pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b if b else 0.0


def run_one(family: str, size: int, measure: bool = True) -> dict:
    import tvm

    import tvm_autochunk as ac
    from benchmarks.models import workload
    from relay_passes.estimate_memory import estimate_memory
    from relay_passes.fold_weight_layouts import fold_weight_layouts
    from tvm_autochunk.measure import measure_peak

    w = workload(family, size)
    t = time.perf_counter()
    mod = ac.from_torch(w.module, w.inputs)
    t_import = time.perf_counter() - t
    t = time.perf_counter()
    # what build() estimates: its target, weight layouts folded
    est = estimate_memory(fold_weight_layouts(mod), ac.resolve_target("llvm"))
    t_est = time.perf_counter() - t
    t = time.perf_counter()
    art = ac.build(mod, "llvm")
    t_build = time.perf_counter() - t
    plan = art.report.planned_peak_bytes
    row = {
        "family": family,
        "size": size,
        "description": w.description,
        "estimate_bytes": est.peak_bytes,
        "plan_bytes": plan,
        "runtime_estimate_bytes": est.runtime_peak_bytes,
        "err_estimate_vs_plan_pct": round(_pct(est.peak_bytes, plan), 3),
        "weights_bytes": est.weight_bytes,
        "inputs_bytes": est.input_bytes,
        "peak_binding": est.peak_binding,
        "import_s": round(t_import, 2),
        "estimate_s": round(t_est, 3),
        "build_s": round(t_build, 2),
        "tvm": tvm.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    if measure:
        with tempfile.TemporaryDirectory() as tmp:
            path = art.export(Path(tmp) / f"{family}_{size}.so")
            m = measure_peak(path, [x.numpy() for x in w.inputs])
        row.update(
            measured_bytes=m.peak_bytes,
            run_s=round(m.seconds, 2),
            err_runtime_vs_measured_pct=round(_pct(est.runtime_peak_bytes, m.peak_bytes), 3),
            err_estimate_vs_measured_pct=round(_pct(est.peak_bytes, m.peak_bytes), 3),
        )
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| model | size | estimate MiB | TVM plan MiB | err vs plan | runtime est. MiB "
        "| measured MiB | err vs measured | estimate s | build s | run s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        meas = r.get("measured_bytes")
        lines.append(
            f"| {r['family']} | {r['size']} | {r['estimate_bytes'] / MIB:.1f} "
            f"| {r['plan_bytes'] / MIB:.1f} | {r['err_estimate_vs_plan_pct']:+.2f}% "
            f"| {r['runtime_estimate_bytes'] / MIB:.1f} "
            + (
                f"| {meas / MIB:.1f} | {r['err_runtime_vs_measured_pct']:+.2f}% "
                if meas is not None
                else "| - | - "
            )
            + f"| {r['estimate_s']:.2f} | {r['build_s']:.1f} | {r.get('run_s', '-')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    from benchmarks.models import SIZES, SMALL_SIZES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=list(SIZES))
    ap.add_argument("--sizes", nargs="*", type=int, help="sizes (default: the family's sweep)")
    ap.add_argument("--quick", action="store_true", help="one small size per family")
    ap.add_argument("--no-measure", action="store_true", help="skip the fresh-process run")
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "estimator_accuracy.jsonl")
    )
    args = ap.parse_args(argv)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for fam in args.families:
            sizes = [SMALL_SIZES[fam]] if args.quick else (args.sizes or SIZES[fam])
            for s in sizes:
                print(f"[estimator_accuracy] {fam} size={s} ...", file=sys.stderr, flush=True)
                r = run_one(fam, s, measure=not args.no_measure)
                rows.append(r)
                f.write(json.dumps(r) + "\n")
                f.flush()
    print(table(rows))
    bad_plan = [r for r in rows if abs(r["err_estimate_vs_plan_pct"]) > 2.0]
    bad_meas = [
        r
        for r in rows
        if r.get("measured_bytes", 0) >= 64 * MIB and abs(r["err_runtime_vs_measured_pct"]) > 5.0
    ]
    print(
        f"\n{len(rows)} rows; estimate within 2% of plan: {len(rows) - len(bad_plan)}/{len(rows)}; "
        f"runtime estimate within 5% of measured (peaks >= 64 MiB): "
        f"{sum(1 for r in rows if r.get('measured_bytes', 0) >= 64 * MIB) - len(bad_meas)}"
        f"/{sum(1 for r in rows if r.get('measured_bytes', 0) >= 64 * MIB)}"
    )
    print(f"JSON lines: {out}")
    return 1 if bad_plan or bad_meas else 0


if __name__ == "__main__":
    sys.exit(main())
