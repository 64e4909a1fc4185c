"""Run the GPU benchmark on a CUDA host that has torch but no TVM compiler.

Reads the bundle made by ``prepare.py`` (fatbin artifacts + a runtime-only TVM) and measures,
each in a fresh process so that no allocator pool is shared:

* every TVM artifact: device memory one call adds (free device memory before minus after the
  first call: TVM's pooled allocator keeps its blocks, so the drop is the call's high-water
  mark), device time (median of ``--repeats`` synchronised calls after one warm-up), and the
  max relative error against torch on the same inputs;
* torch eager with the math attention kernel and torch with its default SDPA backend
  (Flash / memory-efficient where it applies): ``max_memory_allocated`` above the baseline and
  CUDA-event time, same inputs.

Writes ``benchmarks/results/gpu.jsonl`` (one row per measurement, with versions and the GPU
name) and prints a table. Sized to finish within one 10-minute run on an H200.

    python benchmarks/gpu/run_gpu.py --bundle benchmarks/gpu/bundle
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


def _inputs(entry):
    """The same torch model and inputs as prepare.py built from (same seeds)."""
    from benchmarks.models import FAMILIES

    return FAMILIES[entry["family"]](entry["size"], **entry["kw"])


def _worker_tvm(bundle: Path, entry: dict, repeats: int) -> dict:
    import numpy as np
    import torch  # for the reference output and cudaMemGetInfo
    import tvm
    from tvm.runtime.vm import VirtualMachine

    w = _inputs(entry)
    xs = [t.numpy() for t in w.inputs]
    with torch.no_grad():
        ref = w.module.cuda()(*[t.cuda() for t in w.inputs]).float().cpu().numpy()
    del w
    torch.cuda.empty_cache()
    dev = tvm.cuda(0)
    t0 = time.perf_counter()
    lib = tvm.runtime.load_module(str(bundle / entry["file"]))
    vm = VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(x, dev) for x in xs]
    dev.sync()
    load_s = time.perf_counter() - t0
    free0, total = torch.cuda.mem_get_info()
    out = vm["main"](*args)
    dev.sync()
    free1, _ = torch.cuda.mem_get_info()
    res = out if hasattr(out, "numpy") else out[0]
    got = res.numpy()
    err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-30))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        vm["main"](*args)
        dev.sync()
        times.append(time.perf_counter() - t)
    return {"device_bytes": int(free0 - free1), "time_s": statistics.median(times),
            "load_s": round(load_s, 3), "max_rel_err": err, "gpu": torch.cuda.get_device_name(),
            "total_bytes": int(total)}


def _worker_torch(entry: dict, repeats: int, backend: str) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    w = _inputs(entry)
    m = w.module.cuda().eval()
    xs = [t.cuda() for t in w.inputs]
    ctx = sdpa_kernel(SDPBackend.MATH) if backend == "eager_math" else sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    with torch.no_grad(), ctx:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        m(*xs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            m(*xs)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1000)
    return {"device_bytes": int(peak), "time_s": statistics.median(times),
            "gpu": torch.cuda.get_device_name()}


def _spawn(args: list[str], bundle: Path, timeout: float) -> dict:
    env = dict(os.environ)
    env["TVM_USE_RUNTIME_LIB"] = "1"
    py = bundle / "py"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(py), env.get("PYTHONPATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(py / "tvm" / "lib"),
                                              env.get("LD_LIBRARY_PATH", "")])
    p = subprocess.run([sys.executable, __file__, "--worker", *args, "--bundle", str(bundle)],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if p.returncode != 0:
        return {"ok": False, "error": (p.stderr or p.stdout)[-1500:]}
    return {"ok": True, **json.loads(p.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "benchmarks" / "gpu" / "bundle"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.jsonl"))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement")
    ap.add_argument("--families", nargs="*")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bundle = Path(args.bundle).resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    entries = [e for e in manifest["entries"]
               if not args.families or e["family"] in args.families]
    if args.worker:
        kind, idx = args.worker
        sys.path.insert(0, str(ROOT))
        e = manifest["entries"][int(idx)]
        r = (_worker_tvm(bundle, e, args.repeats) if kind == "tvm"
             else _worker_torch(e, args.repeats, kind))
        print(json.dumps(r))
        return 0
    t_start = time.perf_counter()
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    seen_torch = set()
    with open(args.out, "w") as f:
        for e in entries:
            idx = manifest["entries"].index(e)
            jobs = [("tvm", f"tvm {e['label']}")]
            key = (e["family"], e["size"])
            if key not in seen_torch:
                seen_torch.add(key)
                jobs += [("eager_math", "torch eager (math)"), ("sdpa", "torch SDPA")]
            for kind, who in jobs:
                r = _spawn([kind, str(idx)], bundle, args.timeout)
                row = {"family": e["family"], "size": e["size"], "who": who,
                       "label": e["label"] if kind == "tvm" else None,
                       "budget_bytes": e["budget_bytes"] if kind == "tvm" else None,
                       "planned_peak_bytes": e["planned_peak_bytes"] if kind == "tvm" else None,
                       "arch": manifest["arch"], "tvm": manifest["tvm"], **r}
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(json.dumps({k: v for k, v in row.items() if k != "error"})
                      + (f"\n  error: {r['error'][-300:]}" if not r["ok"] else ""), flush=True)
    print("\n| model | size | who | device MiB | planned MiB | time ms | max rel err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["ok"]:
            print(f"| {r['family']} | {r['size']} | {r['who']} | failed | | | |")
            continue
        plan = f"{r['planned_peak_bytes'] / MIB:.1f}" if r["planned_peak_bytes"] else ""
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
        print(f"| {r['family']} | {r['size']} | {r['who']} | {r['device_bytes'] / MIB:.1f} | "
              f"{plan} | {r['time_s'] * 1e3:.2f} | {err} |")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
