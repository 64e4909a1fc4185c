"""Issue 5: the longest input that fits a fixed budget, unchunked TVM vs AutoChunk vs torch eager.

Per family: the budget is the unchunked TVM peak at a base size (``MemoryReport.peak_bytes`` of
``build(model)``: max of TVM's static plan and the simulated run-time peak). Then

* **unchunked**: the largest size whose unchunked estimate fits the budget (binary search; the
  estimate equals TVM's plan, see ``estimator_accuracy.py``), verified by building it and
  measuring one call in a fresh process;
* **autochunk**: the largest size for which ``build(model, budget=budget)`` succeeds
  (exponential then binary search on the search alone), verified by building, checking TVM's
  plan <= budget, measuring one call in a fresh process (<= budget + max(1 MiB, 1%): allocator
  and page rounding) and comparing outputs with the unchunked build at that size;
* **torch eager**: one ``forward`` under ``no_grad`` measured the same way (fresh process, peak
  RSS above the baseline after the model and inputs exist) at the base size and both maxima.

Sizes move on a per-family grid (GPT: multiples of 64 tokens; ViT: square token counts;
Evoformer: multiples of 16 residues; UNet: even latent sides). One JSON line per measurement
(``kind``: probe / verify / torch / summary), each with ``env`` (versions, machine).

    python benchmarks/max_length.py                  # default cases (~20 min on 2 cores)
    python benchmarks/max_length.py --quick          # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20

# family -> (size of grid step k, k of a size)
GRID = {
    "gpt": (lambda k: 64 * k, lambda s: s // 64),
    "vit": (lambda k: k * k, lambda s: math.isqrt(s)),
    "evoformer": (lambda k: 16 * k, lambda s: s // 16),
    "unet": (lambda k: 4 * k, lambda s: s // 4),
}
DEFAULT_CASES = [("gpt", 512, {"layers": 1}), ("vit", 576, {"layers": 1}),
                 ("evoformer", 64, {}), ("unet", 32, {})]


def _allowance(budget: int) -> int:
    from tvm_autochunk.measure import allowance

    return allowance(budget)


def _workload(family: str, size: int, kw: dict):
    from benchmarks.models import workload

    return workload(family, size, **kw)


def _module(family: str, size: int, kw: dict):
    import tvm_autochunk as ac

    w = _workload(family, size, kw)
    return ac.from_torch(w.module, w.inputs), [t.numpy() for t in w.inputs]


def _torch_worker(family: str, size: int, kw_json: str, out: str) -> None:
    """Fresh process: peak RSS of one eager forward above the RSS once model and inputs exist."""
    import torch

    from tvm_autochunk.measure import _hwm_bytes, _rss_bytes

    torch.set_num_threads(os.cpu_count() or 1)
    w = _workload(family, size, json.loads(kw_json))
    with torch.no_grad():
        # the first call, as for the TVM artifacts: after a warm-up call, freed memory kept by
        # malloc would hide the second call's allocations from the RSS high-water mark
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_bytes()
        t = time.perf_counter()
        w.module(*w.inputs)
        sec = time.perf_counter() - t
        peak = _hwm_bytes() - base
    Path(out).write_text(json.dumps({"peak": peak, "seconds": sec}))


def torch_peak(family: str, size: int, kw: dict, timeout: float = 1800.0) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "benchmarks.max_length", "--torch-worker", family,
               str(size), json.dumps(kw), out]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=ROOT)
        if p.returncode != 0:
            return {"ok": False, "error": p.stderr[-500:]}
        r = json.loads(Path(out).read_text())
        return {"ok": True, "peak_bytes": int(r["peak"]), "seconds": round(r["seconds"], 3)}


def _fits_unchunked(family, size, kw, budget) -> tuple[bool, dict]:
    import tvm_autochunk as ac

    mod, _ = _module(family, size, kw)
    rep = ac.estimate(mod, "llvm")
    return rep.peak_bytes <= budget, {"estimate_bytes": int(rep.peak_bytes)}


def _fits_autochunk(family, size, kw, budget) -> tuple[bool, dict]:
    from relay_passes.auto_chunk import auto_chunk
    from relay_passes.errors import BudgetInfeasibleError

    mod, _ = _module(family, size, kw)
    t = time.perf_counter()
    try:
        _, res = auto_chunk(mod, "llvm", budget)
    except BudgetInfeasibleError as e:
        return False, {"best_bytes": int(e.best_peak or 0),
                       "search_s": round(time.perf_counter() - t, 2)}
    return True, {"estimate_bytes": int(res.final_peak), "regions": len(res.plan.regions),
                  "search_s": round(res.search_seconds, 2)}


def _largest(pred, k_lo: int, k_cap: int, emit) -> int:
    """Largest k in [k_lo, k_cap] with pred(k), given pred(k_lo); doubling, then bisection."""
    lo, hi = k_lo, None
    k = k_lo
    while hi is None:
        nk = min(k_cap, k * 2)
        if nk == k:
            return k
        ok = pred(nk)
        emit(nk, ok)
        if ok:
            lo = k = nk
            if nk == k_cap:
                return nk
        else:
            hi = nk
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = pred(mid)
        emit(mid, ok)
        if ok:
            lo = mid
        else:
            hi = mid
    return lo


def _verify(family, size, kw, budget, chunked: bool) -> dict:
    """Build at ``size`` (under ``budget`` if chunked), measure in a fresh process, compare."""
    import tvm_autochunk as ac
    from tvm_autochunk.measure import measure_peak

    mod, x = _module(family, size, kw)
    t = time.perf_counter()
    art = ac.build(mod, "llvm", budget=budget if chunked else None)
    row = {"build_s": round(time.perf_counter() - t, 2),
           "plan_bytes": int(art.report.planned_peak_bytes or art.report.estimated_peak_bytes),
           "peak_bytes": int(art.report.peak_bytes)}
    with tempfile.TemporaryDirectory() as d:
        path = art.export(os.path.join(d, "m.so"))
        m = measure_peak(path, x)
    row["measured_bytes"] = m.peak_bytes
    row["run_s"] = round(m.seconds, 3)
    row["measured_within"] = m.peak_bytes <= budget + _allowance(budget)
    if chunked:
        ref = ac.build(mod, "llvm")(*x)
        out = art(*x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        refs = ref if isinstance(ref, (list, tuple)) else [ref]
        err = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                  for a, b in zip(outs, refs))
        row["max_rel_err"] = err
        row["plan_within_budget"] = row["plan_bytes"] <= budget
    return row


def run_case(family: str, base: int, kw: dict, cap_factor: int, measure: bool, emit) -> dict:
    import tvm_autochunk as ac
    from benchmarks.env import env_info

    size_of, k_of = GRID[family]
    k0 = k_of(base)
    if size_of(k0) != base:
        raise SystemExit(f"{family}: base size {base} is not on the grid (e.g. {size_of(k0)})")
    mod, _ = _module(family, base, kw)
    budget = int(ac.build(mod, "llvm").report.peak_bytes)
    common = {"family": family, "base_size": base, "budget_bytes": budget, "kw": kw,
              "env": env_info()}

    def probe(who, fits):
        def pred(k):
            ok, info = fits(family, size_of(k), kw, budget)
            emit({**common, "kind": "probe", "who": who, "size": size_of(k), "fits": ok, **info})
            return ok
        return pred

    noop = lambda k, ok: None  # noqa: E731  (probe() already emitted the row)
    k_cap = k_of(base * cap_factor)  # sizes up to cap_factor x the base size
    t = time.perf_counter()
    k_un = _largest(probe("unchunked", _fits_unchunked), k0, k_cap, noop)
    k_ac = _largest(probe("autochunk", _fits_autochunk), max(k0, k_un), k_cap, noop)
    search_s = round(time.perf_counter() - t, 1)
    s_un, s_ac = size_of(k_un), size_of(k_ac)
    summary = {**common, "kind": "summary", "max_unchunked": s_un, "max_autochunk": s_ac,
               "ratio": round(s_ac / s_un, 2), "capped": k_ac == k_cap, "search_s": search_s}
    if measure:
        for who, s, chunked in (("unchunked", s_un, False), ("autochunk", s_ac, True)):
            v = _verify(family, s, kw, budget, chunked)
            emit({**common, "kind": "verify", "who": who, "size": s, **v})
            summary[f"{who}_verified"] = bool(
                v["measured_within"] and v.get("plan_within_budget", True)
                and v.get("max_rel_err", 0.0) <= 1e-5
            )
        for s in sorted({base, s_un, s_ac}):
            tp = torch_peak(family, s, kw)
            emit({**common, "kind": "torch", "who": "torch_eager", "size": s, **tp})
            summary[f"torch_peak_at_{s}"] = tp.get("peak_bytes")
    emit(summary)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny case, no measurement (smoke)")
    ap.add_argument("--case", action="append", default=[],
                    help="family:base[:layers], e.g. gpt:512:1 (repeatable)")
    ap.add_argument("--cap", type=int, default=16, help="search sizes up to cap x the base size")
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "max_length.jsonl"))
    ap.add_argument("--torch-worker", nargs=4, metavar=("FAMILY", "SIZE", "KW", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_worker:
        fam, size, kw, out = args.torch_worker
        _torch_worker(fam, int(size), kw, out)
        return 0
    if args.quick:
        cases, cap, measure = [("gpt", 128, {"layers": 1})], 2, False
    else:
        cases, cap, measure = DEFAULT_CASES, args.cap, not args.no_measure
    if args.case:
        cases = []
        for c in args.case:
            p = c.split(":")
            cases.append((p[0], int(p[1]), {"layers": int(p[2])} if len(p) > 2 else {}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    summaries = []
    with open(args.out, "w") as f:
        def emit(row):
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps({k: v for k, v in row.items() if k != "env"}), flush=True)

        for fam, base, kw in cases:
            summaries.append(run_case(fam, base, kw, cap, measure, emit))
    print("\n| family | budget | max unchunked | max AutoChunk | ratio | verified |")
    print("|---|---|---|---|---|---|")
    for s in summaries:
        ver = "yes" if s.get("autochunk_verified") and s.get("unchunked_verified") else (
            "not measured" if "autochunk_verified" not in s else "NO")
        print(f"| {s['family']} | {s['budget_bytes'] / MIB:.1f} MiB | {s['max_unchunked']} | "
              f"{s['max_autochunk']}{' (cap)' if s['capped'] else ''} | {s['ratio']}x | {ver} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
