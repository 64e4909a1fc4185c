"""Prepare the GPU benchmark on a build machine (TVM compiler + nvcc; no GPU needed).

Builds, for each family at a GPU size, the unchunked CUDA artifact and AutoChunk artifacts at
fractions of its peak, each exported with an embedded fatbin for ``--arch``; writes
``manifest.json``; and bundles a runtime-only TVM (``tvm`` without libtvm_compiler.so, headers
and sources; ``tvm_ffi``; ``ml_dtypes``; libcudart) so that a GPU host with only Python, numpy
and torch can run ``run_gpu.py``. The whole bundle must stay under ``--max-mib`` (the device
tool carries at most 64 MiB).

    python benchmarks/gpu/prepare.py --out benchmarks/gpu/bundle            # ~5 min, 2 cores
    python benchmarks/gpu/prepare.py --quick --out /tmp/b --arch sm_90       # smoke

Then, on the GPU host, from the repository root:

    python benchmarks/gpu/run_gpu.py --bundle benchmarks/gpu/bundle
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
MIB = 2**20

# family, size, model kwargs: sizes where the unchunked attention alone is 0.2-4 GiB
CASES = [
    ("gpt", 16384, {"layers": 1}),
    ("vit", 4096, {"layers": 1}),
    ("evoformer", 384, {}),
    ("unet", 128, {}),
]
QUICK = [("gpt", 512, {"layers": 1})]
FRACTIONS = (0.2, 0.1)

# what a runtime-only TVM does not need (notes §6: "tvm.relax is then absent")
_PRUNE_DIRS = ("3rdparty", "src", "include", "web", "relax", "topi", "s_tir", "meta_schedule",
               "dlight", "testing")
_PRUNE_FILES = ("libtvm_compiler.so",)


def _copy_tree(src: Path, dst: Path, prune_dirs=(), prune_files=()) -> None:
    def ignore(d, names):
        out = {n for n in names if n in prune_files or n == "__pycache__"}
        if Path(d) == src:
            out |= {n for n in names if n in prune_dirs}
        return out

    shutil.copytree(src, dst, ignore=ignore, symlinks=False)


def bundle_runtime(out: Path) -> Path:
    """A runtime-only Python TVM under ``out/py`` (import with TVM_USE_RUNTIME_LIB=1)."""
    import ml_dtypes
    import tvm
    import tvm_ffi

    py = out / "py"
    if py.exists():
        shutil.rmtree(py)
    py.mkdir(parents=True)
    _copy_tree(Path(tvm.__file__).parent, py / "tvm", _PRUNE_DIRS, _PRUNE_FILES)
    _copy_tree(Path(tvm_ffi.__file__).parent, py / "tvm_ffi", (), _PRUNE_FILES)
    _copy_tree(Path(ml_dtypes.__file__).parent, py / "ml_dtypes")
    import typing_extensions  # tvm_ffi needs it; a single module

    shutil.copy2(typing_extensions.__file__, py / "typing_extensions.py")
    for name in ("libcudart.so.13",):
        for d in ("/usr/local/cuda/lib64", os.environ.get("CUDA_HOME", "") + "/lib64"):
            if Path(d, name).exists():
                shutil.copy2(Path(d, name), py / "tvm" / "lib" / name)
                break
    return py


def selftest_runtime(py: Path, artifact: Path, inputs: Path) -> float:
    """Load and run an llvm artifact with the bundle only (python -S: no site-packages but
    numpy, linked in a scratch folder). Returns the seconds the import + load + run took."""
    import numpy

    scratch = py.parent / "_np"
    scratch.mkdir(exist_ok=True)
    link = scratch / "numpy"
    if not link.exists():
        link.symlink_to(Path(numpy.__file__).parent)
    code = (
        "import sys, time; t=time.perf_counter(); import numpy as np, tvm; "
        "assert 'torch' not in sys.modules; "
        "from tvm.runtime.vm import VirtualMachine; "
        f"lib=tvm.runtime.load_module({str(artifact)!r}); vm=VirtualMachine(lib, tvm.cpu()); "
        f"x=np.load({str(inputs)!r}); "
        "r=vm['main'](*[tvm.runtime.tensor(x[k]) for k in sorted(x.files)]); "
        "r=r[0] if not hasattr(r,'numpy') else r; "
        "print(float(np.abs(r.numpy()).sum()), time.perf_counter()-t)"
    )
    env = {"PATH": os.environ.get("PATH", ""), "TVM_USE_RUNTIME_LIB": "1",
           "PYTHONPATH": f"{py}{os.pathsep}{scratch}"}
    p = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       env=env, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"runtime-only bundle self-test failed:\n{p.stderr[-2000:]}")
    shutil.rmtree(scratch)
    return float(p.stdout.split()[-1])


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main(argv=None) -> int:
    import numpy as np

    import tvm_autochunk as ac
    from benchmarks.models import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu" / "bundle"))
    ap.add_argument("--arch", default="sm_90", help="GPU arch of the embedded fatbin")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-mib", type=float, default=62.0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    cases = QUICK if args.quick else CASES
    fractions = (0.5,) if args.quick else FRACTIONS
    manifest = {"arch": args.arch, "tvm": __import__("tvm").__version__, "entries": []}
    for fam, size, kw in cases:
        w = FAMILIES[fam](size, **kw)
        mod = ac.from_torch(w.module, w.inputs)
        t = time.perf_counter()
        base = ac.build(mod, target="cuda", arch=args.arch)
        peak = int(base.report.peak_bytes)
        todo = [("unchunked", None, base, time.perf_counter() - t)]
        for f in fractions:
            t = time.perf_counter()
            try:
                art = ac.build(mod, target="cuda", arch=args.arch, budget=int(peak * f))
            except ac.BudgetInfeasibleError as e:
                print(f"{fam} {size}: {f:.0%} refused: {str(e)[:160]}", flush=True)
                continue
            todo.append((f"{f:.0%}", int(peak * f), art, time.perf_counter() - t))
        for label, budget, art, build_s in todo:
            name = f"{fam}_{size}_{label.replace('%', 'pct')}.so"
            path = art.export(out / "artifacts" / name)
            dc = ac.artifact.device_code(path) if hasattr(ac, "artifact") else {}
            if dc and args.arch not in dc.get("archs", []):
                raise SystemExit(f"{name}: no {args.arch} device code embedded ({dc})")
            ch = art.report.chunking or {}
            manifest["entries"].append({
                "family": fam, "size": size, "kw": kw, "label": label, "budget_bytes": budget,
                "file": f"artifacts/{name}", "planned_peak_bytes": int(art.report.peak_bytes),
                "unchunked_peak_bytes": peak, "build_s": round(build_s, 2),
                "regions": [(r["chunk"], r["n_chunks"]) for r in ch.get("regions", [])],
                "input_shapes": [list(x.shape) for x in w.inputs], "seed": 1,
                "so_bytes": path.stat().st_size,
            })
            print(f"built {name}: plan {art.report.peak_bytes / MIB:.1f} MiB, "
                  f"{path.stat().st_size / MIB:.2f} MiB file", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    py = bundle_runtime(out)
    # self-test the runtime-only bundle on an llvm artifact of a tiny model
    w = FAMILIES["gpt"](64, layers=1)
    cpu = ac.build(ac.from_torch(w.module, w.inputs), "llvm").export(out / "selftest_llvm.so")
    np.savez(out / "selftest_inputs.npz", arg0=w.inputs[0].numpy())
    secs = selftest_runtime(py, cpu, out / "selftest_inputs.npz")
    total = _dir_bytes(out)
    print(f"bundle {out}: {total / MIB:.1f} MiB (runtime {_dir_bytes(py) / MIB:.1f} MiB; "
          f"runtime-only import+load+run {secs:.2f} s)")
    if total > args.max_mib * MIB:
        raise SystemExit(f"bundle is {total / MIB:.1f} MiB > {args.max_mib} MiB: drop cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
