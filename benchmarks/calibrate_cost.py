"""Calibrate AutoChunk's cost model on this machine: what one more chunk costs in run time.

The search's cost of a candidate is ``n_chunks x (call_overhead + body_ops x op_overhead)``
(x ``small_penalty`` below ``small_rows`` rows), in microseconds. This measures it: the
attention region of a model (``benchmarks.regions``) is chunked into n = 1, 2, 4, ... chunks,
each variant is built and timed (interleaved rounds, median), and a least-squares line
``t(n) = t0 + n * per_chunk`` is fitted over the chunk sizes >= ``small_rows``. Then
``per_chunk = call_overhead + body_ops * op_overhead`` is split by fitting two regions with
different op counts (the attention region and the region extended by the output projection),
and the small-chunk penalty is the measured time at the smallest chunk over the line's
prediction. Writes ``benchmarks/results/cost_calibration.jsonl`` and prints the constants.

    python benchmarks/calibrate_cost.py                       # GPT S=1024, ~5 min on 2 cores
    python benchmarks/calibrate_cost.py --quick               # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _variants(family: str, size: int, chunks: list[int], kw: dict, extend: int):
    import tvm_autochunk as ac
    from benchmarks.models import FAMILIES
    from benchmarks.regions import attention_regions
    from relay_passes.chunk_region import analyze_region, bindings_by_name
    from relay_passes.plan import ChunkPlan
    from relay_passes.rewrite import apply_chunk_plan

    w = FAMILIES[family](size, **kw)
    mod = ac.from_torch(w.module, w.inputs)
    x = [t.numpy() for t in w.inputs]
    r = attention_regions(mod)[0]
    names = list(bindings_by_name(mod["main"]))
    end = r.end
    if extend:
        # the longest legal extension by up to ``extend`` bindings: more ops per chunk
        for k in range(extend, 0, -1):
            j = names.index(r.end) + k
            if j < len(names) and analyze_region(mod, r.start, names[j], r.seed, r.dim).legal:
                end = names[j]
                break
    ra = analyze_region(mod, r.start, end, r.seed, r.dim)
    out = []
    for c in chunks:
        if c > ra.extent:
            continue
        if c == ra.extent:
            m = mod
        else:
            plan = ChunkPlan.region(mod, start=r.start, end=end, dim={r.seed: r.dim}, chunk=c)
            m = apply_chunk_plan(mod, plan)
        art = ac.build(m, "llvm")
        out.append({"chunk": c, "n_chunks": -(-ra.extent // c), "art": art})
    return out, x, len(ra.body), ra.extent, end


def _time_all(variants, x, repeats: int) -> None:
    for v in variants:
        v["art"](*x)  # warm-up: first-call costs are not per-chunk costs
        v["times"] = []
    for _ in range(repeats):
        for v in variants:
            t = time.perf_counter()
            v["art"](*x)
            v["times"].append(time.perf_counter() - t)
    for v in variants:
        v["median_s"] = statistics.median(v["times"])


def _line(ns, ts):
    a = np.vstack([np.ones(len(ns)), np.asarray(ns, float)]).T
    (t0, per), *_ = np.linalg.lstsq(a, np.asarray(ts, float), rcond=None)
    return float(t0), float(per)


def main(argv=None) -> int:
    from relay_passes.search import SearchOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="gpt")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "cost_calibration.jsonl"))
    args = ap.parse_args(argv)
    size, repeats = (128, 1) if args.quick else (args.size, args.repeats)
    small = SearchOptions().small_rows
    ks = (1, 4, 16) if args.quick else (1, 2, 4, 8, 16, 32, 64, 128)
    chunks = [size // k for k in ks if size // k >= 1]
    rows, fits = [], {}
    for label, extend in (("attention", 0), ("attention+proj", 6)):
        variants, x, ops, extent, end = _variants(args.family, size, chunks, {"layers": 1},
                                                  extend)
        _time_all(variants, x, repeats)
        big = [v for v in variants if v["chunk"] >= small]
        t0, per = _line([v["n_chunks"] for v in big], [v["median_s"] for v in big])
        tiny = min(variants, key=lambda v: v["chunk"])
        pred = t0 + per * tiny["n_chunks"]
        fits[label] = (ops, per, tiny["median_s"] / pred if pred > 0 else 1.0, tiny["chunk"])
        for v in variants:
            rows.append({"region": label, "end": end, "body_ops": ops, "extent": extent,
                         "chunk": v["chunk"], "n_chunks": v["n_chunks"],
                         "median_s": round(v["median_s"], 5), "family": args.family,
                         "size": size})
        print(f"{label}: {ops} ops, t(n) = {t0 * 1e3:.2f} ms + n x {per * 1e6:.1f} us "
              f"(chunk >= {small}); chunk {tiny['chunk']}: {fits[label][2]:.2f}x the line",
              flush=True)
    (o1, p1, pen1, _), (o2, p2, pen2, tiny_chunk) = fits["attention"], fits["attention+proj"]
    if o2 != o1:
        op_us = max(0.0, (p2 - p1) / (o2 - o1) * 1e6)
    else:
        op_us = 0.0
    call_us = max(0.0, p1 * 1e6 - o1 * op_us)
    summary = {"kind": "summary", "family": args.family, "size": size,
               "call_overhead_us": round(call_us, 1), "op_overhead_us": round(op_us, 2),
               "small_chunk_penalty": round(max(pen1, pen2), 2), "smallest_chunk": tiny_chunk,
               "defaults": {"call_overhead": SearchOptions().call_overhead,
                            "op_overhead": SearchOptions().op_overhead,
                            "small_penalty": SearchOptions().small_penalty}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in [*rows, summary]:
            f.write(json.dumps(r) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
