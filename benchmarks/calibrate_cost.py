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
reread`` over the four regions, with ops and KiB counted by the search's own ``candidate_of``.
``small_penalty`` is the time 1-row chunks add over the line fitted to chunks of at least 4
rows (median over the regions; 1 when short chunks cost no more than their calls).
A last experiment is recorded, not modelled: an 8-op elementwise chain on (8192, 1024) tensors
(32 MiB each) chunked into 1 to 1024 calls, to show what cache locality does to the run time
(``cache`` in the summary: the time relative to unchunked, by the MiB one chunk's tensors
take). Writes ``benchmarks/results/cost_calibration.jsonl``;
``SearchOptions``' defaults are the summary row's constants (``tests/test_search.py``
keeps them within run-to-run spread of it).

    python benchmarks/calibrate_cost.py            # under a minute on 2 cores
    python benchmarks/calibrate_cost.py --quick    # tiny, for the smoke test

CUDA, where the GPU is on another host: ``--export-cuda DIR`` builds the same regions (and a
1024-wide matmul whose weight is an input, and the cache chain on 128 MiB tensors) as sm_90
artifacts (``benchmarks/gpu/prepare.py --calibration`` does this into its bundle);
``benchmarks/gpu/run_gpu.py`` times them there; ``--fit-timings JSONL`` fits what it measured
into ``benchmarks/results/cost_calibration_cuda.jsonl``, whose summary ``search.CUDA_COSTS``
holds (a test keeps them equal).
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


def _model(k: int | None, width: int, weight_input: bool = False):
    """The region to chunk between two bindings outside it: ``k`` alternating elementwise ops,
    or (``k`` None) one matmul with a (width, width) weight, a constant, or with
    ``weight_input`` the module's second input (the GPU's 4 MiB weight would otherwise be
    embedded in each of its 11 exported variants)."""
    import torch
    from torch import nn

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = (nn.Linear(width, width, bias=False) if k is None and not weight_input
                        else None)

        def forward(self, x, *w):
            y = x + 1.0  # outside the region: the seed is a binding
            if w:
                y = y @ w[0]
            elif self.lin is not None:
                y = self.lin(y)
            else:
                for i in range(k):
                    y = y * 0.5 if i % 2 else y + 0.25
            return y - 1.0  # outside the region

    torch.manual_seed(0)
    return Chain().eval()


def _variants(k, width: int, rows: int, ns: list[int], target: str = "llvm",
              weight_input: bool = False, **build_kw):
    """The region's candidate (as the search sees it), one build for ``target`` per number of
    calls in ``ns`` (1 = unchunked), and the inputs."""
    import torch

    import tvm_autochunk as ac
    from relay_passes.candidates import candidate_of
    from relay_passes.chunk_region import legal_dims
    from relay_passes.ir_index import bindings_by_name
    from relay_passes.plan import ChunkPlan
    from relay_passes.rewrite import apply_chunk_plan

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(rows, width, generator=g)]
    if weight_input:
        xs.append(torch.randn(width, width, generator=g) / width**0.5)
    mod = ac.from_torch(_model(k, width, weight_input), xs)
    names = list(bindings_by_name(mod["main"]))
    start, end = names[1], names[-2]
    ra = next(r for r in legal_dims(mod, start, end) if r.legal and r.extent == rows)
    cand = candidate_of(ra, mod["main"])
    out = []
    for n in ns:
        if n == 1:
            m = mod
        else:
            plan = ChunkPlan.region(mod, start=start, end=end,
                                    dim={ra.seed.name: ra.seed.dim}, chunk=rows // n)
            m = apply_chunk_plan(mod, plan)
        out.append({"n_chunks": n, "chunk": rows // n, "art": ac.build(m, target, **build_kw)})
    return cand, out, [x.numpy() for x in xs]


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


def fit(timed: list[dict], small_rows: int) -> dict:
    """The cost constants from timed variants (rows with ``region``, ``body_ops``,
    ``reread_bytes``, ``chunk``, ``n_chunks``, ``median_us``; ``region == "cache"`` rows are
    the cache experiment's, with ``tensor_mib``): a line per region, then least squares."""
    fits = []
    regions = [r for r in dict.fromkeys(t["region"] for t in timed) if r != "cache"]
    for label in regions:
        vs = sorted((t for t in timed if t["region"] == label), key=lambda t: t["n_chunks"])
        t0, per = _line([v["n_chunks"] for v in vs], [v["median_us"] for v in vs])
        # 1-row chunks against the line through chunks of >= 4 rows
        rest = [v for v in vs if v["chunk"] >= 4]
        r0, rper = _line([v["n_chunks"] for v in rest], [v["median_us"] for v in rest])
        one = vs[-1]
        ratio = ((one["median_us"] - r0) / (rper * one["n_chunks"])
                 if rper > 0 and one["chunk"] == 1 else None)
        fits.append({"label": label, "ops": vs[0]["body_ops"],
                     "reread_kib": vs[0]["reread_bytes"] / 1024, "t0": t0, "per": per,
                     "one_row_ratio": ratio})
        print(f"{label}: {vs[0]['body_ops']} ops, reads {fits[-1]['reread_kib']:.0f} KiB whole "
              f"per chunk; t(n) = {t0:.0f} us + n x {per:.2f} us", flush=True)
    # per_chunk = call + ops * op + KiB * reread, least squares of the relative errors over
    # the regions (>= 0): plain least squares fits the costly matmul regions and misses the
    # cheap chains by 2x (the chains' per-chunk cost is a few us, the matmuls' tens)
    a = np.array([[1.0, f["ops"], f["reread_kib"]] for f in fits])
    b = np.array([f["per"] for f in fits])
    sol, *_ = np.linalg.lstsq(a / b[:, None], np.ones_like(b), rcond=None)
    call, op, reread = (max(0.0, float(s)) for s in sol)
    cvars = sorted((t for t in timed if t["region"] == "cache"), key=lambda t: t["n_chunks"])
    cache = {f"{v['tensor_mib']:g}": round(v["median_us"] / cvars[0]["median_us"], 3)
             for v in cvars}
    if cache:
        print("cache: time / unchunked by MiB per tensor of a chunk:", cache, flush=True)
    ratios = [f["one_row_ratio"] for f in fits if f["one_row_ratio"] is not None]
    penalty = max(1.0, statistics.median(ratios)) if ratios else 1.0
    return {
        "call_overhead": round(call, 2), "op_overhead": round(op, 3),
        "reread_overhead": round(reread, 4), "small_penalty": round(penalty, 2),
        "small_rows": small_rows, "one_row_ratios": [round(r, 2) for r in ratios],
        "per_chunk_us": {f["label"]: round(f["per"], 2) for f in fits},
        "cache": cache,
        "predicted_per_chunk_us": {
            f["label"]: round(call + f["ops"] * op + f["reread_kib"] * reread, 2) for f in fits
        },
    }


def _row(label, cand, rows, width, v) -> dict:
    r = {"region": label, "body_ops": cand.body_ops, "reread_bytes": cand.reread_bytes,
         "rows": rows, "width": width, "chunk": v["chunk"], "n_chunks": v["n_chunks"]}
    if label == "cache":
        r["tensor_mib"] = v["chunk"] * width * 4 / 2**20  # one tensor of one chunk
    return r


def _write(path, rows, summary) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in [*rows, summary]:
            fh.write(json.dumps(r) + "\n")
    print(f"call_overhead {summary['call_overhead']:.2f} us, op_overhead "
          f"{summary['op_overhead']:.3f} us, reread_overhead {summary['reread_overhead']:.4f} "
          f"us/KiB, small_penalty {summary['small_penalty']:.2f} (1-row chunks: "
          f"{', '.join(f'{r:.2f}' for r in summary['one_row_ratios'])} x the line)")
    print(json.dumps(summary))


# CUDA: the same regions, plus a 1024-wide matmul (its weight an input: 4 MiB would be embedded
# in every variant) whose 1-row chunks are where a GPU matmul loses its efficiency; the cache
# experiment on tensors larger than an H200's 60 MB L2
CUDA_EXPERIMENTS = (*EXPERIMENTS, ("matmul1024", None, 1024))
CUDA_CACHE = (32768, 1024, [1, 4, 16, 64, 256, 1024])


def export_variants(out: Path, arch: str, target: str = "cuda", quick: bool = False) -> Path:
    """Build every variant for ``target`` (CUDA: ``arch`` fatbins, checked) and export them to
    ``out`` with a ``manifest.json``, for ``benchmarks/gpu/run_gpu.py --calibration`` to time
    on a GPU host (that has no TVM compiler); ``--fit-timings`` then fits what it measured.
    ``target="llvm"`` and ``quick`` (64 rows) make a bundle for a dry run of that script."""
    import tvm_autochunk as ac

    out.mkdir(parents=True, exist_ok=True)
    rows = 64 if quick else 1024
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if rows // n >= 4] + [rows]
    crows, cwidth, cns = (256, 64, [1, 4, 16]) if quick else CUDA_CACHE
    entries = []
    todo = [(label, k, w, rows, ns) for label, k, w in CUDA_EXPERIMENTS]
    todo.append(("cache", 8, cwidth, crows, cns))
    kw = {"arch": arch} if target == "cuda" else {}
    for label, k, width, nrows, vns in todo:
        wi = label == "matmul1024"
        cand, variants, xs = _variants(k, width, nrows, vns, target, weight_input=wi, **kw)
        for v in variants:
            name = f"{label}_n{v['n_chunks']}.so"
            path = v["art"].export(out / name)
            if target == "cuda":
                archs = ac.artifact.device_code(path)["archs"]
                if arch not in archs:
                    raise SystemExit(f"{name}: no {arch} device code embedded ({archs})")
            entries.append({**_row(label, cand, nrows, width, v), "file": name,
                            "inputs": [list(x.shape) for x in xs]})
        print(f"{label}: {len(variants)} {target} variants exported", flush=True)
    (out / "manifest.json").write_text(json.dumps(
        {"arch": arch if target == "cuda" else None, "target": target, "entries": entries},
        indent=1))
    return out


def main(argv=None) -> int:
    from benchmarks.env import env_info
    from relay_passes.search import CUDA_COSTS, SearchOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=0,
                    help="timed rounds per variant (default: 40 for the chains, 15 for matmuls)")
    ap.add_argument("--quick", action="store_true", help="64 rows, 2 rounds: a smoke test")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/"
                    "cost_calibration.jsonl (llvm), cost_calibration_cuda.jsonl (--fit-timings)")
    ap.add_argument("--export-cuda", metavar="DIR",
                    help="build the CUDA variants into DIR (for run_gpu.py --calibration)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--fit-timings", metavar="JSONL",
                    help="fit the CUDA constants from run_gpu.py --calibration's timings")
    args = ap.parse_args(argv)
    if args.export_cuda:
        export_variants(Path(args.export_cuda), args.arch, quick=args.quick)
        return 0
    if args.fit_timings:
        timed = [json.loads(x) for x in Path(args.fit_timings).read_text().splitlines()
                 if x.strip()]
        timed = [t for t in timed if t.get("median_us")]
        if not timed:
            raise SystemExit(f"{args.fit_timings}: no timed rows")
        head = {k: timed[0][k] for k in ("gpu", "commit", "arch", "env") if k in timed[0]}
        target = "cuda" if timed[0].get("device", "cuda") == "cuda" else "llvm"
        summary = {"kind": "summary", "target": target, **head,
                   **fit(timed, CUDA_COSTS["small_rows"])}
        _write(args.out or ROOT / "benchmarks" / "results" / "cost_calibration_cuda.jsonl",
               timed, summary)
        return 0
    small = SearchOptions().small_rows
    rows = 64 if args.quick else 1024
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if rows // n >= 4]
    gc.freeze()  # as in the search and the benchmarks: no cyclic-GC pauses in the timings
    timed = []
    for label, k, width in EXPERIMENTS:
        rounds = args.rounds or (2 if args.quick else (40 if k is not None else 15))
        cand, variants, x = _variants(k, width, rows, [*ns, rows])
        _time_all(variants, x, rounds)
        timed += [{**_row(label, cand, rows, width, v), "median_us": round(v["median_us"], 1),
                   "rounds": rounds} for v in variants]
    # cache locality (recorded, not modelled): a memory-bound chain with large tensors
    crow, cwidth = (256, 64) if args.quick else (8192, 1024)
    cns = [1, 4, 16] if args.quick else [1, 4, 16, 64, 256, 1024]
    cand, cvars, cx = _variants(8, cwidth, crow, cns)
    _time_all(cvars, cx, 2 if args.quick else 7)
    timed += [{**_row("cache", cand, crow, cwidth, v), "median_us": round(v["median_us"], 1)}
              for v in cvars]
    summary = {"kind": "summary", "target": "llvm", "commit": env_info()["commit"],
               "env": env_info(), "rows": rows, **fit(timed, small)}
    _write(args.out or ROOT / "benchmarks" / "results" / "cost_calibration.jsonl", timed,
           summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
