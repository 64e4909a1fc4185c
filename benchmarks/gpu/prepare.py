"""Prepare the GPU benchmark on a build machine (TVM compiler + nvcc; no GPU needed).

Builds, for each family at a GPU size, the unchunked CUDA artifact and AutoChunk artifacts at
fractions of its peak, each exported with an embedded fatbin for ``--arch``; writes
``manifest.json``; and bundles a runtime-only TVM (``tvm`` without libtvm_compiler.so, headers
and sources; ``tvm_ffi``; ``ml_dtypes``; libcudart) so that a GPU host with only Python, numpy
and torch can run ``run_gpu.py``. The whole bundle must stay under ``--max-mib`` (the device
tool carries at most 64 MiB).

    python benchmarks/gpu/prepare.py --python 3.12 --calibration --out benchmarks/gpu/bundle \
        --pack benchmarks/gpu/bundle.tar.gz                                  # ~8 min, 2 cores
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


_FFI_PRUNE_DIRS = ("3rdparty", "include", "src", "cython")
_FFI_PRUNE_FILES: tuple = ()  # core.so links libtvm_ffi_testing.so


def _local_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _ffi_for(python: str, cache: Path) -> Path:
    """The ``tvm_ffi`` package built for another CPython (its extension module is per
    version): this environment's apache-tvm-ffi version, from PyPI's wheel for ``python``."""
    import zipfile
    from importlib.metadata import version

    ver = version("apache-tvm-ffi")
    tag = "cp" + python.replace(".", "")
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"apache_tvm_ffi-{ver}-{tag}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp", "-d", str(cache)]
        for plat in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                     "manylinux2014_x86_64"):
            cmd += ["--platform", plat]
        p = subprocess.run([*cmd, f"apache-tvm-ffi=={ver}"], capture_output=True, text=True)
        wheels = sorted(cache.glob(f"apache_tvm_ffi-{ver}-{tag}-*.whl"))
        if p.returncode != 0 or not wheels:
            raise SystemExit(f"could not fetch apache-tvm-ffi=={ver} for Python {python} "
                             f"(pip download needs the network; or put the wheel in {cache}):\n"
                             f"{p.stderr[-1500:]}")
    dst = cache / f"ffi-{tag}"
    if not (dst / "tvm_ffi").exists():
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extractall(dst, [n for n in z.namelist() if n.startswith("tvm_ffi/")])
    return dst / "tvm_ffi"


def bundle_runtime(out: Path, python: str | None = None) -> Path:
    """A runtime-only Python TVM under ``out/py`` (import with TVM_USE_RUNTIME_LIB=1), for this
    Python or for the GPU host's (``python``, e.g. "3.12": ``tvm_ffi`` comes from PyPI's wheel
    for it, and ``ml_dtypes`` and ``typing_extensions`` are left to the host, whose own builds
    match its numpy; the nvidia-h200 machines have both)."""
    import ml_dtypes
    import tvm
    import tvm_ffi

    foreign = python is not None and python != _local_python()
    py = out / "py"
    if py.exists():
        shutil.rmtree(py)
    py.mkdir(parents=True)
    _copy_tree(Path(tvm.__file__).parent, py / "tvm", _PRUNE_DIRS, _PRUNE_FILES)
    ffi = _ffi_for(python, out.parent / "_wheels") if foreign else Path(tvm_ffi.__file__).parent
    _copy_tree(ffi, py / "tvm_ffi", _FFI_PRUNE_DIRS, _FFI_PRUNE_FILES)
    if not foreign:
        _copy_tree(Path(ml_dtypes.__file__).parent, py / "ml_dtypes")
        import typing_extensions  # tvm_ffi needs it; a single module

        shutil.copy2(typing_extensions.__file__, py / "typing_extensions.py")
    for name in ("libcudart.so.13",):
        for d in ("/usr/local/cuda/lib64", os.environ.get("CUDA_HOME", "") + "/lib64"):
            if Path(d, name).exists():
                shutil.copy2(Path(d, name), py / "tvm" / "lib" / name)
                break
    return py


def _interpreter(python: str | None) -> str | None:
    """A local interpreter for ``python`` ("3.12"), this one when None or the same."""
    if python is None or python == _local_python():
        return sys.executable
    for c in (shutil.which(f"python{python}"),
              *sorted(Path.home().glob(f".pyenv/versions/{python}.*/bin/python{python}"))):
        if c and subprocess.run([str(c), "-V"], capture_output=True).returncode == 0:
            return str(c)
    return None


def selftest_runtime(py: Path, artifact: Path, inputs: Path, python: str | None = None) -> float:
    """Load and run an llvm artifact with the bundle only (python -S: no site-packages but
    numpy, in a scratch folder), under this Python or a local ``python`` interpreter (which
    gets numpy, ml_dtypes and typing_extensions from pip, as the GPU host has its own).
    Returns the seconds the import + load + run took; raises if the output differs from the
    same artifact run here."""
    import numpy

    import tvm_autochunk as ac

    exe = _interpreter(python)
    if exe is None:
        raise SystemExit(f"no Python {python} here to self-test the bundle with (pyenv install "
                         f"{python}, or --python {_local_python()})")
    scratch = py.parent / "_np"
    scratch.mkdir(exist_ok=True)
    if exe == sys.executable:
        link = scratch / "numpy"
        if not link.exists():
            link.symlink_to(Path(numpy.__file__).parent)
    else:
        p = subprocess.run([exe, "-m", "pip", "install", "-q", "--target", str(scratch),
                            "numpy", "ml_dtypes", "typing_extensions"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"could not install numpy for {exe}:\n{p.stderr[-1500:]}")
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
    p = subprocess.run([exe, "-S", "-c", code], capture_output=True, text=True,
                       env=env, timeout=600)
    shutil.rmtree(scratch)
    if p.returncode != 0:
        raise SystemExit(f"runtime-only bundle self-test failed ({exe}):\n{p.stderr[-2000:]}")
    got, secs = (float(v) for v in p.stdout.split()[-2:])
    x = numpy.load(inputs)
    want = float(numpy.abs(ac.load(artifact)(*[x[k] for k in sorted(x.files)])).sum())
    if abs(got - want) > 1e-4 * abs(want):
        raise SystemExit(f"runtime-only bundle self-test: output sum {got} != {want} here")
    return secs


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
    ap.add_argument("--python", default=_local_python(),
                    help="the GPU host's Python (X.Y): tvm_ffi's extension is built per version "
                         "(the nvidia-h200 machines run 3.12)")
    ap.add_argument("--calibration", action="store_true",
                    help="also the cost-model calibration variants (benchmarks/calibrate_cost.py"
                         " --export-cuda) under calib/, for run_gpu.py --calibration")
    ap.add_argument("--families", nargs="*", help="only these model families")
    ap.add_argument("--pack", metavar="TAR_GZ",
                    help="also pack the bundle into one .tar.gz (what travels to the GPU host; "
                         "--max-mib then applies to it)")
    ap.add_argument("--target", choices=("cuda", "llvm"), default="cuda",
                    help="llvm: a bundle for a dry run of run_gpu.py --device cpu")
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    cases = QUICK if args.quick else CASES
    cases = [c for c in cases if not args.families or c[0] in args.families]
    fractions = (0.7,) if args.quick else FRACTIONS
    manifest = {"arch": args.arch, "tvm": __import__("tvm").__version__, "entries": []}
    for fam, size, kw in cases:
        w = FAMILIES[fam](size, **kw)
        mod = ac.from_torch(w.module, w.inputs)
        t = time.perf_counter()
        bkw = {"arch": args.arch} if args.target == "cuda" else {}
        base = ac.build(mod, target=args.target, **bkw)
        peak = int(base.report.peak_bytes)
        todo = [("unchunked", None, base, time.perf_counter() - t)]
        for f in fractions:
            t = time.perf_counter()
            try:
                art = ac.build(mod, target=args.target, budget=int(peak * f), **bkw)
            except ac.BudgetInfeasibleError as e:
                print(f"{fam} {size}: {f:.0%} refused: {str(e)[:160]}", flush=True)
                continue
            todo.append((f"{f:.0%}", int(peak * f), art, time.perf_counter() - t))
        for label, budget, art, build_s in todo:
            name = f"{fam}_{size}_{label.replace('%', 'pct')}.so"
            path = art.export(out / "artifacts" / name)
            dc = ac.artifact.device_code(path) if args.target == "cuda" else {}
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
    if args.calibration:
        from benchmarks.calibrate_cost import export_variants

        export_variants(out / "calib", args.arch, args.target, quick=args.quick)
    py = bundle_runtime(out, args.python)
    # self-test the runtime-only bundle on an llvm artifact of a tiny model (outside the bundle)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        w = FAMILIES["gpt"](64, layers=1)
        cpu = ac.build(ac.from_torch(w.module, w.inputs), "llvm").export(Path(tmp, "t.so"))
        np.savez(Path(tmp, "x.npz"), arg0=w.inputs[0].numpy())
        secs = selftest_runtime(py, cpu, Path(tmp, "x.npz"), args.python)
    total = _dir_bytes(out)
    print(f"bundle {out}: {total / MIB:.1f} MiB (runtime {_dir_bytes(py) / MIB:.1f} MiB for "
          f"Python {args.python}; runtime-only import+load+run {secs:.2f} s)")
    if args.pack:
        # one gzip'd tarball: the runtime libraries and the calibration kernels shrink ~3x, and
        # an unchunked GPT's causal mask (a folded S x S bool constant: 256 MiB at S=16384) to
        # almost nothing; random fp32 weights do not shrink
        import tarfile

        packed = Path(args.pack)
        with tarfile.open(packed, "w:gz", compresslevel=6) as tar:
            tar.add(out, arcname="bundle")
        total = packed.stat().st_size
        print(f"packed {packed}: {total / MIB:.1f} MiB (run_gpu.py --bundle {packed})")
    if total > args.max_mib * MIB:
        raise SystemExit(f"bundle is {total / MIB:.1f} MiB > {args.max_mib} MiB: drop cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
