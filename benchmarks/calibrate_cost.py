"""Calibrate AutoChunk's cost model on this machine: the run time one more chunk adds.

The search predicts the time chunking adds to a region as ``n_chunks x (call_overhead +
body_ops x op_overhead + reread_KiB x reread_overhead)`` microseconds (x ``small_penalty`` below
``small_rows`` rows; ``relay_passes.search.Candidate.cost``). This measures the constants on
small synthetic regions whose compute does not change with the number of chunks, so that the
time added per chunk is not lost in the noise of a long run (a GPT attention region at
S=1024 runs 3 s, and its per-chunk cost is a few microseconds):

* two elementwise chains of 3 and 17 ops on a (1024, 4) tensor: the call and the per-op cost;
* a (1024, w) @ (w, w) matmul for w = 128 and 256: the cost of reading the weight whole in
  every chunk.

Each region is chunked into n = 1, 2, 4, ..., 1024 calls (1024 rows: down to 1-row chunks),
every variant is built for llvm and timed in interleaved rounds (median), and a line
``t(n) = t0 + n * per_chunk`` is fitted per region over all n (many calls are where the
per-chunk cost shows: at 64 calls of a 256-wide matmul it is under 1% of the run, inside the
noise). The constants are the least-squares solution of ``per_chunk = call + ops x op + KiB x
reread`` over the four regions, with ops and KiB counted by the search's own ``_candidate``.
``small_penalty`` is the time 1-row chunks add over the line fitted to chunks of at least 4
rows (median over the regions; 1 when short chunks cost no more than their calls).
A last experiment is recorded, not modelled: an 8-op elementwise chain on (8192, 1024) tensors
(32 MiB each) chunked into 1 to 1024 calls, to show what cache locality does to the run time
(``cache`` in the summary: the time relative to unchunked, by the MiB one chunk's tensors
take). Writes ``benchmarks/results/cost_calibration.jsonl``;
``SearchOptions``' defaults are the summary row's constants (``tests/test_auto_chunk.py``
keeps them within run-to-run spread of it).

    python benchmarks/calibrate_cost.py            # under a minute on 2 cores
    python benchmarks/calibrate_cost.py --quick    # tiny, for the smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, ops in the chain or None for one matmul, width)
EXPERIMENTS = (("chain3", 2, 4), ("chain17", 16, 4), ("matmul128", None, 128),
               ("matmul256", None, 256))


def _model(k: int | None, width: int):
    import torch
    from torch import nn

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(width, width, bias=False) if k is None else None

        def forward(self, x):
            y = x + 1.0  # outside the region: the seed is a binding
            if self.lin is not None:
                y = self.lin(y)
            else:
                for i in range(k):
                    y = y * 0.5 if i % 2 else y + 0.25
            return y - 1.0  # outside the region

    torch.manual_seed(0)
    return Chain().eval()


def _variants(k, width: int, rows: int, ns: list[int]):
    """The region's candidate (as the search sees it) and one llvm build per number of
    calls in ``ns`` (1 = unchunked)."""
    import torch

    import tvm_autochunk as ac
    from relay_passes.auto_chunk import _candidate
    from relay_passes.chunk_region import bindings_by_name, legal_dims
    from relay_passes.plan import ChunkPlan
    from relay_passes.rewrite import apply_chunk_plan

    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(1))
    mod = ac.from_torch(_model(k, width), [x])
    names = list(bindings_by_name(mod["main"]))
    start, end = names[1], names[-2]
    ra = next(r for r in legal_dims(mod, start, end) if r.legal and r.extent == rows)
    cand = _candidate(ra, mod["main"])
    out = []
    for n in ns:
        if n == 1:
            m = mod
        else:
            plan = ChunkPlan.region(mod, start=start, end=end,
                                    dim={ra.seed.name: ra.seed.dim}, chunk=rows // n)
            m = apply_chunk_plan(mod, plan)
        out.append({"n_chunks": n, "chunk": rows // n, "art": ac.build(m, "llvm")})
    return cand, out, [x.numpy()]


def _time_all(variants, x, rounds: int) -> None:
    """Each variant's ``median_us``: interleaved rounds after a warm-up call."""
    from benchmarks.timing import interleaved_medians

    med = interleaved_medians({i: v["art"] for i, v in enumerate(variants)}, x, rounds)
    for i, v in enumerate(variants):
        v["median_us"] = med[i] * 1e6


def _line(ns, ts) -> tuple[float, float]:
    a = np.vstack([np.ones(len(ns)), np.asarray(ns, float)]).T
    (t0, per), *_ = np.linalg.lstsq(a, np.asarray(ts, float), rcond=None)
    return float(t0), float(per)


def main(argv=None) -> int:
    from benchmarks.env import env_info
    from relay_passes.search import SearchOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=0,
                    help="timed rounds per variant (default: 40 for the chains, 15 for matmuls)")
    ap.add_argument("--quick", action="store_true", help="64 rows, 2 rounds: a smoke test")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "cost_calibration.jsonl"))
    args = ap.parse_args(argv)
    small = SearchOptions().small_rows
    rows = 64 if args.quick else 1024
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if rows // n >= 4]
    gc.freeze()  # as in the search and the benchmarks: no cyclic-GC pauses in the timings
    out_rows, fits = [], []
    for label, k, width in EXPERIMENTS:
        rounds = args.rounds or (2 if args.quick else (40 if k is not None else 15))
        cand, variants, x = _variants(k, width, rows, [*ns, rows])
        _time_all(variants, x, rounds)
        t0, per = _line([v["n_chunks"] for v in variants], [v["median_us"] for v in variants])
        # 1-row chunks against the line through chunks of >= 4 rows
        rest = [v for v in variants if v["chunk"] >= 4]
        r0, rper = _line([v["n_chunks"] for v in rest], [v["median_us"] for v in rest])
        one = variants[-1]
        ratio = (one["median_us"] - r0) / (rper * one["n_chunks"]) if rper > 0 else None
        reread_kib = cand.reread_bytes / 1024
        fits.append({"label": label, "ops": cand.body_ops, "reread_kib": reread_kib,
                     "t0": t0, "per": per, "one_row_ratio": ratio})
        for v in variants:
            out_rows.append({"region": label, "body_ops": cand.body_ops,
                             "reread_bytes": cand.reread_bytes, "rows": rows,
                             "chunk": v["chunk"], "n_chunks": v["n_chunks"],
                             "median_us": round(v["median_us"], 1), "rounds": rounds})
        print(f"{label}: {cand.body_ops} ops, reads {reread_kib:.0f} KiB whole per chunk; "
              f"t(n) = {t0:.0f} us + n x {per:.2f} us", flush=True)
    # per_chunk = call + ops * op + KiB * reread, least squares over the regions (>= 0)
    a = np.array([[1.0, f["ops"], f["reread_kib"]] for f in fits])
    b = np.array([f["per"] for f in fits])
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    call, op, reread = (max(0.0, float(s)) for s in sol)
    # cache locality (recorded, not modelled): a memory-bound chain with large tensors
    crow, cwidth = (256, 64) if args.quick else (8192, 1024)
    cns = [1, 4, 16] if args.quick else [1, 4, 16, 64, 256, 1024]
    _, cvars, cx = _variants(8, cwidth, crow, cns)
    _time_all(cvars, cx, 2 if args.quick else 7)
    cbase = cvars[0]["median_us"]
    cache = {}
    for v in cvars:
        mib = v["chunk"] * cwidth * 4 / 2**20  # one tensor of one chunk
        cache[f"{mib:g}"] = round(v["median_us"] / cbase, 3)
        out_rows.append({"region": "cache", "body_ops": 9, "rows": crow, "width": cwidth,
                         "chunk": v["chunk"], "n_chunks": v["n_chunks"],
                         "median_us": round(v["median_us"], 1), "tensor_mib": mib})
    print("cache: time / unchunked by MiB per tensor of a chunk:", cache, flush=True)
    ratios = [f["one_row_ratio"] for f in fits if f["one_row_ratio"] is not None]
    penalty = max(1.0, statistics.median(ratios)) if ratios else 1.0
    summary = {
        "kind": "summary", "target": "llvm", "commit": env_info()["commit"], "env": env_info(),
        "rows": rows,
        "call_overhead": round(call, 2), "op_overhead": round(op, 3),
        "reread_overhead": round(reread, 4), "small_penalty": round(penalty, 2),
        "small_rows": small, "one_row_ratios": [round(r, 2) for r in ratios],
        "per_chunk_us": {f["label"]: round(f["per"], 2) for f in fits},
        "cache": cache,
        "predicted_per_chunk_us": {
            f["label"]: round(call + f["ops"] * op + f["reread_kib"] * reread, 2) for f in fits
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        for r in [*out_rows, summary]:
            fh.write(json.dumps(r) + "\n")
    print(f"call_overhead {call:.2f} us, op_overhead {op:.3f} us, reread_overhead "
          f"{reread:.4f} us/KiB, small_penalty {penalty:.2f} (1-row chunks: "
          f"{', '.join(f'{r:.2f}' for r in ratios)} x the prediction)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
