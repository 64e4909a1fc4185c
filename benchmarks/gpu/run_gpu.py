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
    """The same torch model and inputs as prepare.py built from (same seeds). TF32 is off in
    torch (cuDNN convolutions use it by default): TVM's kernels compute in plain fp32, so the
    reference and the torch baselines do too."""
    import torch

    from benchmarks.models import FAMILIES

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    return FAMILIES[entry["family"]](entry["size"], **entry["kw"])


def _device(kind: str):
    """TVM's device; for CUDA, first the runtime-only TVM's CUDA library (a runtime-only TVM
    loads no backend at import: the artifact loader's own helper loads it)."""
    import tvm

    if kind != "cuda":
        return tvm.cpu(0)
    from tvm_autochunk.artifact import _cuda_runtime_problem

    why = _cuda_runtime_problem()
    if why is not None:
        raise SystemExit(f"TVM's CUDA runtime does not load here: {why}")
    dev = tvm.cuda(0)
    if not dev.exist:
        raise SystemExit("TVM sees no CUDA device")
    return dev


def _free_bytes(kind: str) -> tuple[int, int] | None:
    """(free, total) device memory; None on the CPU (a dry run of the script)."""
    if kind != "cuda":
        return None
    import torch

    return torch.cuda.mem_get_info()


def _worker_tvm(bundle: Path, entry: dict, repeats: int, kind: str = "cuda") -> dict:
    import numpy as np
    import torch  # for the reference output and cudaMemGetInfo
    import tvm
    from tvm.runtime.vm import VirtualMachine

    w = _inputs(entry)
    xs = [t.numpy() for t in w.inputs]
    tdev = "cuda" if kind == "cuda" else "cpu"
    with torch.no_grad():
        ref = w.module.to(tdev)(*[t.to(tdev) for t in w.inputs]).float().cpu().numpy()
    del w
    if kind == "cuda":
        torch.cuda.empty_cache()
    dev = _device(kind)
    t0 = time.perf_counter()
    lib = tvm.runtime.load_module(str(bundle / entry["file"]))
    vm = VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(x, dev) for x in xs]
    dev.sync()
    load_s = time.perf_counter() - t0
    before = _free_bytes(kind)
    out = vm["main"](*args)
    dev.sync()
    after = _free_bytes(kind)
    res = out if hasattr(out, "numpy") else out[0]
    got = res.numpy()
    err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-30))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        vm["main"](*args)
        dev.sync()
        times.append(time.perf_counter() - t)
    r = {"device_bytes": int(before[0] - after[0]) if before else None,
         "time_s": statistics.median(times), "load_s": round(load_s, 3), "max_rel_err": err}
    # the first call also pays one-time costs outside any plan (the CUDA modules load at the
    # first launch: 2 MiB on the H200 for these models): empty TVM's pooled allocator and
    # measure one more call, which allocates only what it plans
    clear = tvm.get_global_func("vm.builtin.memory_manager.clear", allow_missing=True)
    if before and clear is not None:
        del out, res
        dev.sync()
        clear()
        again = _free_bytes(kind)
        vm["main"](*args)
        dev.sync()
        r["steady_device_bytes"] = int(again[0] - _free_bytes(kind)[0])
    if kind == "cuda":
        r.update(gpu=torch.cuda.get_device_name(), total_bytes=int(before[1]))
    return r


def _worker_profile(bundle: Path, entry: dict) -> dict:
    """Where one call's device time goes: every kernel of one call (after a warm-up call),
    traced by torch's profiler (CUPTI sees TVM's launches too), summed by kernel name."""
    import numpy as np
    import tvm
    from torch.profiler import ProfilerActivity, profile
    from tvm.runtime.vm import VirtualMachine

    w = _inputs(entry)
    xs = [t.numpy() for t in w.inputs]
    del w
    dev = _device("cuda")
    vm = VirtualMachine(tvm.runtime.load_module(str(bundle / entry["file"])), dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in xs]
    vm["main"](*args)
    dev.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        vm["main"](*args)
        dev.sync()
        wall = time.perf_counter() - t
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us and ev.count:
            kernels.append({"kernel": ev.key[:120], "us": round(us, 1), "count": ev.count})
    kernels.sort(key=lambda k: -k["us"])
    return {"wall_s": wall, "kernel_us": round(sum(k["us"] for k in kernels), 1),
            "launches": sum(k["count"] for k in kernels), "top": kernels[:10]}


def calibration(bundle: Path, rounds: int, kind: str, out: Path) -> list[dict]:
    """Time the cost-model calibration variants (``bundle/calib``, made by
    ``benchmarks/calibrate_cost.py --export-cuda``) in one process, interleaved, median of
    ``rounds``; every variant's output must equal the unchunked one's. Writes one row per
    variant to ``out`` for ``calibrate_cost.py --fit-timings``."""
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from benchmarks.timing import interleaved_medians

    man = json.loads((bundle / "calib" / "manifest.json").read_text())
    dev = _device(kind)
    gpu = None
    if kind == "cuda":
        import torch

        gpu = torch.cuda.get_device_name()
    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for region in dict.fromkeys(e["region"] for e in man["entries"]):
            es = sorted((e for e in man["entries"] if e["region"] == region),
                        key=lambda e: e["n_chunks"])
            rng = np.random.default_rng(1)
            xs = [rng.standard_normal(tuple(s), dtype=np.float32) for s in es[0]["inputs"]]
            if len(xs) > 1:  # the weight input: keep the values O(1)
                xs[1] /= np.float32(np.sqrt(xs[1].shape[0]))
            args = [tvm.runtime.tensor(x, dev) for x in xs]
            fns, errs, ref = {}, {}, None
            for e in es:
                f = VirtualMachine(tvm.runtime.load_module(str(bundle / "calib" / e["file"])),
                                   dev)["main"]

                def call(*a, f=f):
                    r = f(*a)
                    dev.sync()
                    return r

                got = call(*args)
                got = (got if hasattr(got, "numpy") else got[0]).numpy()
                ref = got if ref is None else ref
                errs[e["file"]] = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-30))
                fns[e["file"]] = call
            med = interleaved_medians(fns, args, rounds)
            for e in es:
                row = {**{k: v for k, v in e.items() if k != "inputs"},
                       "median_us": round(med[e["file"]] * 1e6, 2), "rounds": rounds,
                       "max_rel_err": errs[e["file"]], "arch": man["arch"], "device": kind}
                if gpu:
                    row["gpu"] = gpu
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
            print(f"calibration {region}: " + ", ".join(
                f"n={e['n_chunks']} {med[e['file']] * 1e6:.0f} us" for e in es), flush=True)
            bad = {k: v for k, v in errs.items() if v > 1e-5}
            if bad:
                print(f"  OUTPUTS DIFFER from unchunked: {bad}", flush=True)
    return rows


def _worker_torch(entry: dict, repeats: int, backend: str, kind: str = "cuda") -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kind != "cuda":
        raise SystemExit("the torch baselines run on CUDA only")
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


def _spawn(args: list[str], bundle: Path, timeout: float, extra=()) -> dict:
    """One measurement in a fresh process with the bundle's runtime-only TVM."""
    env = dict(os.environ)
    env["TVM_USE_RUNTIME_LIB"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    py = bundle / "py"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(py), env.get("PYTHONPATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(py / "tvm" / "lib"),
                                              env.get("LD_LIBRARY_PATH", "")])
    cmd = [sys.executable, __file__, "--worker", *args, "--bundle", str(bundle), *extra]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"ok": False, "error": f"timed out after {timeout:.0f} s\n{err[-1000:]}"}
    if p.returncode != 0:
        return {"ok": False, "error": (p.stderr or p.stdout)[-1500:]}
    if args[0] == "calib":
        print(p.stdout, end="", flush=True)
        return {"ok": True}
    return {"ok": True, **json.loads(p.stdout.strip().splitlines()[-1])}


def _table(rows: list[dict]) -> None:
    print("\n| model | size | who | device MiB (first call) | device MiB (after clearing "
          "the pool) | planned MiB | budget MiB | time ms | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")

    def mib(b):
        return f"{b / MIB:.1f}" if b else ""

    for r in rows:
        if not r["ok"]:
            print(f"| {r['family']} | {r['size']} | {r['who']} | failed | | | | | |")
            continue
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
        print(f"| {r['family']} | {r['size']} | {r['who']} | {mib(r['device_bytes'])} | "
              f"{mib(r.get('steady_device_bytes'))} | "
              f"{mib(r['planned_peak_bytes'])} | {mib(r['budget_bytes'])} | "
              f"{r['time_s'] * 1e3:.2f} | {err} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "benchmarks" / "gpu" / "bundle"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.jsonl"))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement")
    ap.add_argument("--families", nargs="*")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a dry run of the script with llvm artifacts (no torch baselines, "
                         "no device memory)")
    ap.add_argument("--calibration", choices=("first", "only", "no"), default="first",
                    help="time the cost-model calibration variants (bundle/calib) first, only "
                         "them, or not")
    ap.add_argument("--calibration-out", default=str(
        ROOT / "benchmarks" / "results" / "gpu_calibration_timings.jsonl"))
    ap.add_argument("--rounds", type=int, default=30, help="calibration: timed rounds")
    ap.add_argument("--profile", nargs="+", metavar="FAMILY:LABEL",
                    help="instead: the kernels of one call of these artifacts (e.g. gpt:10%%), "
                         "by device time, to --out")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bundle = Path(args.bundle).resolve()
    if bundle.suffixes[-2:] == [".tar", ".gz"]:  # prepare.py --pack: unpack next to /tmp
        import tarfile

        dest = Path(os.environ.get("TMPDIR", "/tmp")) / f"autochunk_{bundle.stem[:-4]}"
        if not (dest / "bundle" / "manifest.json").exists():
            t = time.perf_counter()
            with tarfile.open(bundle) as tar:
                tar.extractall(dest, filter="data")
            print(f"unpacked {bundle} in {time.perf_counter() - t:.1f} s", flush=True)
        bundle = dest / "bundle"
    if args.worker:
        kind, idx = args.worker
        sys.path.insert(0, str(ROOT))
        if kind == "calib":
            calibration(bundle, args.rounds, args.device, Path(args.calibration_out))
            return 0
        e = json.loads((bundle / "manifest.json").read_text())["entries"][int(idx)]
        if kind == "profile":
            r = _worker_profile(bundle, e)
        else:
            r = (_worker_tvm(bundle, e, args.repeats, args.device) if kind == "tvm"
                 else _worker_torch(e, args.repeats, kind, args.device))
        print(json.dumps(r))
        return 0
    t_start = time.perf_counter()
    if args.profile:
        manifest = json.loads((bundle / "manifest.json").read_text())
        ok = True
        with open(args.out, "w") as f:
            for want in args.profile:
                fam, label = want.split(":", 1)
                idx = next(i for i, e in enumerate(manifest["entries"])
                           if e["family"] == fam and e["label"] == label)
                e = manifest["entries"][idx]
                r = _spawn(["profile", str(idx)], bundle, args.timeout)
                row = {"family": fam, "size": e["size"], "label": label,
                       "regions": e["regions"], **r}
                f.write(json.dumps(row) + "\n")
                ok &= r["ok"]
                if not r["ok"]:
                    print(f"{want}: failed: {r['error'][-800:]}", flush=True)
                    continue
                print(f"{want} {e['regions']}: {r['wall_s'] * 1e3:.2f} ms wall, "
                      f"{r['kernel_us'] / 1e3:.2f} ms in {r['launches']} kernels", flush=True)
                for k in r["top"][:6]:
                    print(f"  {k['us'] / 1e3:8.2f} ms {k['count']:5d}x {k['kernel']}", flush=True)
        return 0 if ok else 1
    ok = True
    if args.calibration != "no" and (bundle / "calib" / "manifest.json").exists():
        r = _spawn(["calib", "0"], bundle, 4 * args.timeout,
                   ["--device", args.device, "--rounds", str(args.rounds),
                    "--calibration-out", str(Path(args.calibration_out).resolve())])
        if not r["ok"]:
            ok = False
            print(f"calibration failed: {r['error'][-1500:]}", flush=True)
        print(f"calibration done at {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.calibration == "only":
        return 0 if ok else 1
    manifest = json.loads((bundle / "manifest.json").read_text())
    entries = [e for e in manifest["entries"]
               if not args.families or e["family"] in args.families]
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    seen_torch = set()
    with open(args.out, "w") as f:
        for e in entries:
            idx = manifest["entries"].index(e)
            jobs = [("tvm", f"tvm {e['label']}")]
            key = (e["family"], e["size"])
            if key not in seen_torch and args.device == "cuda":
                seen_torch.add(key)
                jobs += [("eager_math", "torch eager (math)"), ("sdpa", "torch SDPA")]
            for kind, who in jobs:
                r = _spawn([kind, str(idx)], bundle, args.timeout,
                           ["--device", args.device, "--repeats", str(args.repeats)])
                tvm_row = kind == "tvm"
                row = {"family": e["family"], "size": e["size"], "who": who,
                       "label": e["label"] if tvm_row else None,
                       "budget_bytes": e["budget_bytes"] if tvm_row else None,
                       "planned_peak_bytes": e["planned_peak_bytes"] if tvm_row else None,
                       "regions": e.get("regions") if tvm_row else None,
                       "arch": manifest["arch"], "tvm": manifest["tvm"],
                       "device": args.device, **r}
                if tvm_row and r["ok"] and r.get("device_bytes") is not None and e["budget_bytes"]:
                    slack = max(MIB, 0.01 * e["budget_bytes"])
                    row["within_budget"] = r["device_bytes"] <= e["budget_bytes"] + slack
                    if r.get("steady_device_bytes") is not None:
                        row["steady_within_budget"] = (
                            r["steady_device_bytes"] <= e["budget_bytes"] + slack)
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(json.dumps({k: v for k, v in row.items() if k != "error"})
                      + (f"\n  error: {r['error'][-600:]}" if not r["ok"] else ""), flush=True)
    _table(rows)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0 if ok and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
