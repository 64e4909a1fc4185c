"""Issue 3 measurements: hand-picked chunk regions, memory before/after, compile time.

For each family, the first attention region (``benchmarks.regions``) is chunked along the query
rows. Per row of the table: our estimate, TVM's plan, the measured peak RSS of one call in a
fresh process (before and after), the output error against the unchunked build, and build time.
A second table compares TVM build time for 8 vs 256 chunks of the same region.

    python benchmarks/chunk_regions.py                      # GPT S=4096 + the families
    python benchmarks/chunk_regions.py --quick              # small sizes, no measurement
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


def _measure(art, inputs):
    from tvm_autochunk.measure import measure_peak

    with tempfile.TemporaryDirectory() as tmp:
        path = art.export(Path(tmp) / "m.so")
        m = measure_peak(path, inputs, keep_outputs=True)
        out = np.load(m.outputs_path)["arr_0"]
    return m, out


def region_row(family: str, size: int, chunk: int, measure: bool, **kw) -> dict:
    import tvm_autochunk as ac
    from benchmarks.models import workload
    from benchmarks.regions import attention_regions
    from relay_passes.plan import ChunkPlan
    from relay_passes.rewrite import apply_chunk_plan

    w = workload(family, size, **kw)
    mod = ac.from_torch(w.module, w.inputs)
    x = [t.numpy() for t in w.inputs]
    r = attention_regions(mod)[0]
    plan = ChunkPlan.region(mod, start=r.start, end=r.end, dim={r.seed: r.dim}, chunk=chunk)
    t = time.perf_counter()
    chunked = apply_chunk_plan(mod, plan)
    rewrite_s = time.perf_counter() - t
    t = time.perf_counter()
    base = ac.build(mod, "llvm")
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    art = ac.build(chunked, "llvm")
    build_s = time.perf_counter() - t
    row = {
        "family": family,
        "size": size,
        "region": f"{r.start}..{r.end}",
        "seed": f"{r.seed}[{r.dim}]",
        "chunk": chunk,
        "n_chunks": -(-r.extent // chunk),
        "est_before": base.report.estimated_peak_bytes,
        "plan_before": base.report.planned_peak_bytes,
        "est_after": art.report.estimated_peak_bytes,
        "plan_after": art.report.planned_peak_bytes,
        "runtime_est_before": base.report.runtime_peak_bytes,
        "runtime_est_after": art.report.runtime_peak_bytes,
        "rewrite_s": round(rewrite_s, 3),
        "build_before_s": round(base_s, 2),
        "build_after_s": round(build_s, 2),
    }
    if measure:
        mb, ob = _measure(base, x)
        ma, oa = _measure(art, x)
        row.update(
            measured_before=mb.peak_bytes,
            measured_after=ma.peak_bytes,
            run_before_s=round(mb.seconds, 2),
            run_after_s=round(ma.seconds, 2),
            max_rel_err=float(np.abs(oa - ob).max() / np.abs(ob).max()),
        )
    return row


def compile_time(family: str, size: int, chunks: tuple[int, ...], **kw) -> list[dict]:
    import tvm_autochunk as ac
    from benchmarks.models import workload
    from benchmarks.regions import attention_regions
    from relay_passes.plan import ChunkPlan

    w = workload(family, size, **kw)
    mod = ac.from_torch(w.module, w.inputs)
    r = attention_regions(mod)[0]
    rows = []
    for n in chunks:
        chunk = r.extent // n
        plan = ChunkPlan.region(mod, start=r.start, end=r.end, dim={r.seed: r.dim}, chunk=chunk)
        t = time.perf_counter()
        art = ac.build(mod, "llvm", chunk_plan=plan)
        rows.append({"family": family, "size": size, "n_chunks": n, "chunk": chunk,
                     "build_s": round(time.perf_counter() - t, 2),
                     "plan": art.report.planned_peak_bytes})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chunk_regions.jsonl"))
    args = ap.parse_args(argv)
    if args.quick:
        cases = [("gpt", 256, 32, {}), ("vit", 256, 40, {}), ("evoformer", 32, 128, {}),
                 ("unet", 16, 64, {})]
        ct = ("gpt", 256, (8, 64))
    else:
        cases = [
            ("gpt", 4096, 256, {"layers": 1}),
            ("gpt", 2048, 100, {"layers": 1}),
            ("vit", 2304, 256, {"layers": 1}),
            ("evoformer", 128, 1024, {}),
            ("unet", 64, 512, {}),
        ]
        ct = ("gpt", 4096, (8, 256))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with out.open("w") as f:
        for fam, size, chunk, kw in cases:
            print(f"[chunk_regions] {fam} {size} chunk {chunk} ...", file=sys.stderr, flush=True)
            r = region_row(fam, size, chunk, measure=not args.quick, **kw)
            rows.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
        print(f"[chunk_regions] compile time {ct} ...", file=sys.stderr, flush=True)
        cts = compile_time(ct[0], ct[1], ct[2], **({} if args.quick else {"layers": 1}))
        for r in cts:
            f.write(json.dumps({"compile_time": r}) + "\n")
    print("| model | size | region (seed) | chunk x n | estimate MiB before -> after | TVM plan "
          "MiB before -> after | measured MiB before -> after | max rel err | build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        meas = (f"{r['measured_before'] / MIB:.1f} -> {r['measured_after'] / MIB:.1f}"
                if "measured_before" in r else "-")
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
        print(f"| {r['family']} | {r['size']} | {r['region']} ({r['seed']}) | {r['chunk']} x "
              f"{r['n_chunks']} | {r['est_before'] / MIB:.1f} -> {r['est_after'] / MIB:.1f} | "
              f"{r['plan_before'] / MIB:.1f} -> {r['plan_after'] / MIB:.1f} | {meas} | {err} | "
              f"{r['build_before_s']} -> {r['build_after_s']} |")
    print("\n| model | size | chunks | chunk | TVM build s | plan MiB |\n|---|---|---|---|---|---|")
    for r in cts:
        print(f"| {r['family']} | {r['size']} | {r['n_chunks']} | {r['chunk']} | {r['build_s']} "
              f"| {r['plan'] / MIB:.1f} |")
    if len(cts) == 2:
        print(f"\ncompile time ratio {cts[1]['n_chunks']} vs {cts[0]['n_chunks']} chunks: "
              f"{cts[1]['build_s'] / cts[0]['build_s']:.2f}x")
    print(f"JSON lines: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
