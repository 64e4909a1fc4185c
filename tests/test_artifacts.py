"""Ahead-of-time artifacts: export -> inspect -> runtime-only load -> run; CUDA fatbins; aarch64.

One tiny GPT (1 layer, d=64, S=16) is imported once and built per target. The llvm artifact is
loaded in a fresh interpreter that sees only a runtime-only copy of TVM (the package without
lib/libtvm_compiler.so) plus tvm_ffi, ml_dtypes and numpy: no torch, no onnx, no compiler.
CUDA builds run without a GPU (they need nvcc) and are checked by reading the device code in
the exported library; running them needs a GPU (``-m gpu``). aarch64 builds need the
``aarch64-linux-gnu-gcc`` cross compiler; with ``qemu-aarch64`` two kernels of the artifact are
also run under emulation. A model imported with its weights as parameters
(``keep_params_as_input``) is built at two budgets that share one weights file, written by
``export(..., params=FILE)`` and loaded, checked, by ``load(..., params=FILE)`` (runtime-only too).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _helpers import attention as _attention
from _helpers import op
from _helpers import relax_module as _module
from _helpers import same_arrays as _same

import tvm_autochunk as ac
from tvm_autochunk import cli
from tvm_autochunk.artifact import FATBIN_MAGIC, Artifact, device_code, fatbin_entries

ROOT = Path(__file__).resolve().parents[1]
CROSS_GCC = "aarch64-linux-gnu-gcc"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
EM_X86_64, EM_AARCH64, EM_CUDA = 62, 183, 190

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed: cannot build fatbins"
)
needs_cross = pytest.mark.skipif(
    shutil.which(CROSS_GCC) is None,
    reason=f"{CROSS_GCC} not installed (apt-get install gcc-aarch64-linux-gnu; .ci/run does)",
)


def _has_cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


# decided at import: a CUDA build in this process may load a stub libcuda.so.1 (targets.py)
HAS_CUDA_DRIVER = _has_cuda_driver()


# ------------------------------------------------------------------------------------ fixtures
def _matmul_softmax():
    """softmax(x @ w): two kernels; cheap to compile for CUDA and aarch64."""
    import torch

    class MatmulSoftmax(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(16, 32, generator=g))

        def forward(self, x):
            return torch.softmax(x @ self.w, dim=-1)

    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    return MatmulSoftmax().eval(), x


@pytest.fixture(scope="module")
def small():
    m, x = _matmul_softmax()
    return {"module": m, "x": x, "mod": ac.from_torch(m, (x,))}


@pytest.fixture(scope="module")
def tiny():
    import torch

    from benchmarks.models import gpt

    w = gpt(16, d=64, heads=2, layers=1)
    with torch.no_grad():
        ref = w.module(*w.inputs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    return {"mod": ac.from_torch(w.module, w.inputs), "x": w.inputs[0].numpy(),
            "ref": ref.numpy()}


@pytest.fixture(scope="module")
def llvm_art(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("llvm_art")
    art = ac.build(tiny["mod"], "llvm", budget="64MiB")
    path = art.export(d / "tiny_gpt.so")
    # the build host's output: the artifact loaded by the full TVM install in this process
    # (calling ``art`` directly would JIT-compile the kernels a second time, ~10 s here)
    out = ac.load(path)(tiny["x"])
    np.testing.assert_allclose(out, tiny["ref"], rtol=1e-4, atol=1e-4)
    np.save(d / "x.npy", tiny["x"])
    return {"art": art, "path": path, "out": out, "dir": d}


def _runtime_only_site(dst: Path) -> Path:
    """A site dir holding TVM without libtvm_compiler.so, tvm_ffi, ml_dtypes, numpy, our code.

    Every file is a symlink (cheap), except that the compiler library is left out. Python keeps
    the symlinked paths in ``__file__``, so TVM looks for its libraries in ``dst/tvm/lib``.
    """
    def link_tree(src: Path, out: Path, skip: tuple[str, ...] = ()) -> None:
        for root, dirs, files in os.walk(src):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            r = Path(root)
            o = out / r.relative_to(src)
            o.mkdir(parents=True, exist_ok=True)
            for f in files:
                if f not in skip:
                    os.symlink(r / f, o / f)

    def origin(name: str) -> Path:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        return Path(spec.origin)

    link_tree(origin("tvm").parent, dst / "tvm", skip=("libtvm_compiler.so",))
    for name in ("tvm_ffi", "ml_dtypes", "numpy"):
        pkg = origin(name).parent
        link_tree(pkg, dst / name)
        libs = pkg.parent / f"{name}.libs"  # vendored shared libraries of manylinux wheels
        if libs.is_dir():
            link_tree(libs, dst / libs.name)
    te = origin("typing_extensions")
    os.symlink(te, dst / te.name)
    for name in ("tvm_autochunk", "relay_passes"):
        link_tree(ROOT / name, dst / name)
    assert not list(dst.rglob("libtvm_compiler.so"))
    return dst


def _bare_python(site: Path, args: list[str], cwd: Path, timeout: int = 300, **env_extra):
    """``python -S -s`` with only ``site`` on PYTHONPATH: no site-packages, no user site."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(site),
           "HOME": str(cwd), "PYTHONDONTWRITEBYTECODE": "1", **env_extra}
    return subprocess.run([sys.executable, "-S", "-s", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------- export -> inspect -> run (llvm)
def test_export_embeds_metadata_and_inspect_prints_it(llvm_art, tiny, capsys):
    meta = ac.read_metadata(llvm_art["path"])
    art = llvm_art["art"]
    assert meta == json.loads(json.dumps(art.meta))  # the record round-trips exactly
    assert meta["target"]["kind"] == "llvm" and meta["cross"] is False
    assert meta["inputs"] == [{"name": "x", "shape": [1, 16, 64], "dtype": "float32"}]
    assert meta["outputs"][0]["shape"] == [1, 16, 64]
    assert meta["budget_bytes"] == 64 * 2**20
    assert meta["report"]["peak_bytes"] == art.report.peak_bytes
    import tvm

    assert meta["tvm_version"] == tvm.__version__
    assert meta["tvm_ffi_version"] and meta["tvm_autochunk_version"] == ac.__version__
    assert cli.main(["inspect", str(llvm_art["path"])]) == 0
    out = capsys.readouterr().out
    assert f"TVM {tvm.__version__}" in out and "target        llvm" in out
    assert "1x16x64" in out and "budget        64.00 MiB" in out
    assert cli.main(["inspect", "--json", str(llvm_art["path"])]) == 0
    assert json.loads(capsys.readouterr().out) == meta


def test_runtime_only_copy_loads_and_runs(llvm_art, tmp_path):
    """A deploy host with the TVM runtime only: no compiler library, no torch, no onnx."""
    site = _runtime_only_site(tmp_path / "site")
    y = tmp_path / "y.npy"
    code = textwrap.dedent(f"""
        import importlib.util, json, sys, time
        t0 = time.perf_counter()
        visible = [n for n in ("torch", "onnx", "onnxscript") if importlib.util.find_spec(n)]
        assert not visible, f"the runtime-only interpreter sees {{visible}}"
        import numpy as np
        import tvm_autochunk as ac
        assert "tvm" not in sys.modules, "import tvm_autochunk imported tvm"
        t1 = time.perf_counter()
        art = ac.load({str(llvm_art["path"])!r})
        t2 = time.perf_counter()
        out = art(np.load({str(llvm_art["dir"] / "x.npy")!r}))
        t3 = time.perf_counter()
        np.save({str(y)!r}, out)
        import tvm
        assert tvm.base._RUNTIME_ONLY and "tvm_compiler" not in tvm.base._LOADED_LIBS
        heavy = ["tvm.relax", "torch", "onnx", "tvm_autochunk.api", "tvm_autochunk.frontends",
                 "relay_passes.pipeline", "relay_passes.estimate_memory"]
        loaded = [m for m in heavy if m in sys.modules]
        assert not loaded, f"loading and running imported {{loaded}}"
        print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "run_s": t3 - t2,
                          "tvm_file": tvm.__file__}}))
    """)
    proc = _bare_python(site, ["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["tvm_file"].startswith(str(site))  # the copy, not the full install
    # same kernels, same inputs: the deploy host computes what the build host computed
    np.testing.assert_allclose(np.load(y), llvm_art["out"], rtol=0, atol=1e-6)
    print(f"runtime-only: import {info['import_s']:.2f}s, load {info['load_s']:.2f}s, "
          f"run {info['run_s']:.3f}s")

    # the CLI works there too: inspect (no TVM) and run
    inp = tmp_path / "in.npz"
    np.savez(inp, x=np.load(llvm_art["dir"] / "x.npy"))
    proc = _bare_python(site, ["-m", "tvm_autochunk", "inspect", str(llvm_art["path"])],
                        tmp_path)
    assert proc.returncode == 0 and "target        llvm" in proc.stdout, proc.stderr[-2000:]
    outs = tmp_path / "out.npz"
    proc = _bare_python(site, ["-m", "tvm_autochunk", "run", str(llvm_art["path"]), "--inputs",
                               str(inp), "-o", str(outs)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(outs) as z:
        np.testing.assert_allclose(z["out0"], llvm_art["out"], rtol=0, atol=1e-6)


def test_loaded_artifact_has_the_build_interface(llvm_art, tiny):
    art = ac.load(llvm_art["path"])
    assert isinstance(art, Artifact)
    assert [s.name for s in art.inputs] == ["x"] and art.inputs[0].shape == (1, 16, 64)
    assert art.report["peak_bytes"] == llvm_art["art"].report.peak_bytes
    np.testing.assert_allclose(art(tiny["x"]), tiny["ref"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ac.InputError, match="expected 1 input"):
        art()


def test_version_mismatch_is_a_clear_error(llvm_art, tmp_path):
    import tvm

    # the artifact as a TVM of another version would have written it: same bytes, except the
    # version in the metadata record (same length, so the ELF file stays valid)
    have = tvm.__version__
    other = ("9" + have[1:]) if have[0] != "9" else ("8" + have[1:])
    data = llvm_art["path"].read_bytes()
    field = f'"tvm_version": "{have}"'.encode()
    assert data.count(field) == 1
    path = tmp_path / "other_tvm.so"
    path.write_bytes(data.replace(field, f'"tvm_version": "{other}"'.encode()))
    assert ac.read_metadata(path)["tvm_version"] == other  # inspecting still works
    with pytest.raises(ac.ArtifactError, match=rf"built with TVM {re.escape(other)} but this "
                       rf"runtime is TVM {re.escape(have)}.*apache-tvm=={re.escape(other)}"):
        ac.load(path)


def _expect_cli_error(args, capsys, match: str) -> None:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert any(line.startswith("error: ") for line in err.splitlines()), err
    assert match in err, err


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("half", "truncated or corrupted"),
        ("tail", "truncated or corrupted"),
        ("head", "not an ELF shared library"),
        ("empty", "not an ELF shared library"),
        ("garbage", "not an ELF shared library"),
        ("elf_garbage", "truncated or corrupted"),
        ("metadata", "metadata record is corrupted"),
    ],
)
def test_corrupted_artifacts_are_artifact_errors(llvm_art, tmp_path, capsys, how, match):
    data = llvm_art["path"].read_bytes()
    rng = np.random.default_rng(0)
    if how == "half":
        bad = data[: len(data) // 2]
    elif how == "tail":  # a copy that stopped 100 bytes short
        bad = data[:-100]
    elif how == "head":
        bad = data[:10]
    elif how == "empty":
        bad = b""
    elif how == "garbage":
        bad = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif how == "elf_garbage":
        bad = b"\x7fELF\x02\x01\x01" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    else:  # flip bytes inside the embedded JSON record
        i = data.index(b'{"bounds"')
        bad = data[: i + 5] + b"\xff\xfe" * 8 + data[i + 21 :]
        assert len(bad) == len(data)
    path = tmp_path / f"{how}.so"
    path.write_bytes(bad)
    with pytest.raises(ac.ArtifactError, match=match):
        ac.load(path)
    with pytest.raises(ac.ArtifactError, match=match):
        ac.read_metadata(path)
    _expect_cli_error(["inspect", str(path)], capsys, match)
    inp = tmp_path / "in.npz"
    np.savez(inp, x=np.zeros((1, 16, 64), "float32"))
    _expect_cli_error(["run", str(path), "--inputs", str(inp)], capsys, match)


def test_foreign_shared_library_is_not_an_artifact(tmp_path):
    ext = Path(importlib.util.find_spec("numpy._core._multiarray_umath").origin)
    with pytest.raises(ac.ArtifactError, match="has no tvm_autochunk metadata"):
        ac.load(ext)


# ------------------------------------------------------------------------------- CUDA fatbins
@pytest.fixture(scope="module")
def cuda_arts(small, tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_art")
    arts = {}
    for arch in ("sm_80", "sm_90"):
        art = ac.build(small["mod"], "cuda", arch=arch)
        arts[arch] = (art, art.export(d / f"tiny_gpt_{arch}.so"))
    return arts


def _sass(path: Path) -> list[dict]:
    return [e for f in fatbin_entries(path.read_bytes()) for e in f["entries"]
            if e["kind"] == "elf"]


@needs_nvcc
@pytest.mark.cuda_build
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_artifact_embeds_a_fatbin_for_the_requested_arch(cuda_arts, arch):
    art, path = cuda_arts[arch]
    assert art.meta["target"] == {"kind": "cuda", "arch": arch}
    rec = ac.read_metadata(path)["device_code"]
    assert rec["format"] == "fatbin" and rec["arch"] == arch and rec["compiler"].startswith("nvcc")
    data = path.read_bytes()
    assert struct.pack("<I", FATBIN_MAGIC) in data
    found = device_code(path)
    assert found["archs"] == [arch]
    assert not found["cuda_source"], "the CUDA source should not be shipped"
    (fat,) = found["fatbins"]
    kinds = sorted((e["kind"], e["arch"]) for e in fat["entries"])
    assert kinds == [("elf", arch), ("ptx", arch)]  # SASS for the arch + PTX for newer GPUs
    (sass,) = _sass(path)
    # the cubin's own ELF header agrees with the fatbin entry
    assert sass["machine"] == EM_CUDA and sass["elf_arch"] == arch
    assert rec["device_code_bytes"] == fat["size"]


@needs_nvcc
@pytest.mark.cuda_build
def test_two_archs_give_different_device_code(cuda_arts):
    blobs = {}
    for arch, (_, path) in cuda_arts.items():
        data = path.read_bytes()
        (fat,) = fatbin_entries(data)
        blobs[arch] = data[fat["offset"] : fat["offset"] + fat["size"]]
    assert blobs["sm_80"] != blobs["sm_90"]
    assert {e["elf_arch"] for e in _sass(cuda_arts["sm_80"][1])} == {"sm_80"}


@needs_nvcc
@pytest.mark.cuda_build
@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="cuobjdump not installed")
def test_cuobjdump_lists_the_arch(cuda_arts, tmp_path):
    _, path = cuda_arts["sm_90"]
    data = path.read_bytes()
    (fat,) = fatbin_entries(data)
    blob = tmp_path / "device.fatbin"
    blob.write_bytes(data[fat["offset"] : fat["offset"] + fat["size"]])
    out = subprocess.run(["cuobjdump", "--list-elf", "--list-ptx", str(blob)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sm_90.cubin" in out.stdout and "sm_90.ptx" in out.stdout, out.stdout


@needs_nvcc
@pytest.mark.cuda_build
def test_inspect_shows_the_device_code(cuda_arts, capsys):
    _, path = cuda_arts["sm_90"]
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "device code   fatbin for sm_90 (nvcc" in out
    assert "embedded: sm_90 SASS + sm_90 PTX" in out


@needs_nvcc
@pytest.mark.cuda_build
@pytest.mark.skipif(HAS_CUDA_DRIVER, reason="an NVIDIA driver is installed here")
def test_loading_cuda_artifact_without_cuda_runtime_is_clear(cuda_arts, tmp_path):
    """In a fresh process (no stub driver loaded) a CUDA artifact fails to load, clearly."""
    _, path = cuda_arts["sm_90"]
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import tvm_autochunk as ac
        try:
            ac.load({str(path)!r})
        except ac.ArtifactError as e:
            print("ArtifactError:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ArtifactError:" in proc.stdout and "no CUDA support" in proc.stdout, proc.stdout


def _has_cudart() -> bool:
    try:
        ctypes.CDLL("libcudart.so.13")  # what TVM 0.27's libtvm_runtime_cuda.so links
        return True
    except OSError:
        return False


@needs_nvcc
@pytest.mark.cuda_build
@pytest.mark.skipif(not _has_cudart(), reason="libcudart.so.13 (CUDA 13 runtime) not installed")
def test_cuda_fatbin_loads_runtime_only_without_a_compiler(cuda_arts, tmp_path):
    """A deploy host: runtime-only TVM, no nvcc, an NVIDIA driver (here a stub libcuda.so.1).

    The fatbin module loads with no compile step (a CUDA-source module would need nvrtc or
    nvcc here); running then says that there is no GPU.
    """
    from tvm_autochunk.targets import build_stub_libcuda

    _, path = cuda_arts["sm_90"]
    site = _runtime_only_site(tmp_path / "site")
    driver = build_stub_libcuda(tmp_path / "driver").parent
    code = textwrap.dedent(f"""
        import shutil, sys
        import numpy as np
        assert shutil.which("nvcc") is None, "nvcc is visible"
        import tvm_autochunk as ac
        art = ac.load({str(path)!r})
        import tvm
        assert tvm.base._RUNTIME_ONLY and "tvm_runtime_cuda" in tvm.base._LOADED_LIBS
        def kinds(m):
            return [m.kind] + [k for i in m.imports for k in kinds(i)]
        assert "cuda" in kinds(art._exec), kinds(art._exec)
        try:
            art(np.zeros((4, 16), "float32"))
        except ac.ArtifactError as e:
            print("ArtifactError:", e)
        assert "tvm.relax" not in sys.modules
    """)
    proc = _bare_python(site, ["-c", code], tmp_path, PATH="/usr/bin:/bin",
                        LD_LIBRARY_PATH=str(driver))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ArtifactError:" in proc.stdout and "no such device" in proc.stdout, proc.stdout


@pytest.mark.cuda_build
def test_cuda_without_nvcc_keeps_source_and_says_so(small, tmp_path, monkeypatch, caplog):
    if HAS_CUDA_DRIVER:
        pytest.skip("with a CUDA runtime TVM compiles with its own (nvrtc) callback")
    monkeypatch.setattr("tvm_autochunk.targets.find_nvcc", lambda: None)
    lines = []
    with caplog.at_level("WARNING", logger="tvm_autochunk.targets"):
        art = ac.build(small["mod"], "cuda", arch="sm_90", progress=lines.append)
    rec = art.meta["device_code"]
    assert rec["format"] == "cuda-source" and "nvcc not found" in rec["reason"]
    assert "the CUDA module keeps CUDA source" in caplog.text
    assert not any("compiling CUDA kernels" in line for line in lines)
    path = art.export(tmp_path / "src.so")
    found = device_code(path)
    assert found["cuda_source"] and not found["fatbins"]


@needs_nvcc
@pytest.mark.cuda_build
def test_unsupported_cuda_arch_is_a_clear_error(small):
    with pytest.raises(ac.UnsupportedTargetError, match=r"sm_10.*not supported by"):
        ac.build(small["mod"], "cuda", arch="sm_10")


@pytest.mark.gpu
def test_cuda_artifact_runs_on_the_gpu(tiny, llvm_art, tmp_path):  # pragma: no cover - GPU only
    import tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA GPU")
    arch = "sm_" + dev.compute_version.replace(".", "")
    path = ac.build(tiny["mod"], "cuda", arch=arch).export(tmp_path / "gpu.so")
    assert device_code(path)["archs"] == [arch]
    y = tmp_path / "y.npy"
    code = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        import tvm_autochunk as ac
        art = ac.load({str(path)!r})
        np.save({str(y)!r}, art(np.load({str(llvm_art["dir"] / "x.npy")!r})))
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    np.testing.assert_allclose(np.load(y), llvm_art["out"], rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------ aarch64
@pytest.fixture(scope="module")
def arm_art(small, tmp_path_factory):
    # (the tiny GPT takes ~30 s in LLVM's aarch64 backend; this model ~1 s)
    d = tmp_path_factory.mktemp("arm_art")
    art = ac.build(small["mod"], "aarch64")
    return art, d


@needs_cross
def test_aarch64_cross_compiled_elf_and_metadata(arm_art, capsys):
    art, d = arm_art
    path = art.export(d / "tiny_gpt_arm.so")
    head = path.read_bytes()[:64]
    assert head[:4] == b"\x7fELF" and head[4] == 2 and head[5] == 1  # 64-bit little-endian
    assert struct.unpack_from("<H", head, 16)[0] == 3  # ET_DYN: a shared library
    assert struct.unpack_from("<H", head, 18)[0] == EM_AARCH64
    meta = ac.read_metadata(path)
    assert meta["target"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert meta["cross"] and meta["cross_compiler"] == CROSS_GCC
    assert meta["inputs"][0]["shape"] == [4, 16]
    assert cli.main(["inspect", str(path)]) == 0
    assert "cross-compiled with aarch64-linux-gnu-gcc" in capsys.readouterr().out
    loaded = ac.load(path)  # metadata only: this host cannot run it
    with pytest.raises(ac.ArtifactError, match="cross-compiled"):
        loaded(np.zeros((4, 16), "float32"))


def test_aarch64_export_without_cross_compiler_is_clear(arm_art, monkeypatch):
    art, d = arm_art
    monkeypatch.setattr("tvm_autochunk.artifact.shutil.which", lambda name: None)
    with pytest.raises(ac.ArtifactError, match="apt-get install gcc-aarch64-linux-gnu"):
        art.export(d / "never.so")
    assert not (d / "never.so").exists()


# A C harness that dlopens an exported library and calls one PrimFunc through its TVM FFI
# entry point (__tvm_ffi_<name>) on float32 tensors read from files. The kernels need one
# symbol from the TVM runtime (error reporting), which the harness provides.
_HARNESS = r"""
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef struct { int32_t device_type, device_id; } DLDevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct { void* data; DLDevice device; int32_t ndim; DLDataType dtype;
                 int64_t* shape; int64_t* strides; uint64_t byte_offset; } DLTensor;
typedef struct { int32_t type_index; uint32_t pad; union { int64_t i; void* p; } v; } TVMFFIAny;
typedef int (*SafeCall)(void*, const TVMFFIAny*, int32_t, TVMFFIAny*);
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "%s: ", kind);
  for (int i = 0; i < n; ++i) fputs(parts[i], stderr);
  fputc('\n', stderr);
}
/* the runtime's parallel launch, as TVM's runtime installs it into a loaded library (the
   scheduled kernels run their outer loops in parallel): here one task runs the whole range */
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
static int serial_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  TVMParallelGroupEnv env = {NULL, 1};
  return flambda(0, &env, cdata);
}
/* and its workspace pool (kernel-internal buffers): plain aligned heap blocks */
static void* alloc_workspace(int dev_type, int dev_id, uint64_t nbytes, int code, int bits) {
  void* p = NULL;
  return posix_memalign(&p, 64, nbytes ? nbytes : 1) == 0 ? p : NULL;
}
static int free_workspace(int dev_type, int dev_id, void* ptr) { free(ptr); return 0; }
/* harness LIB FUNC FILE:D0xD1... ; every tensor is written back to FILE.out */
int main(int argc, char** argv) {
  if (argc < 4) return 2;
  void* lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 3; }
  void** launch = (void**)dlsym(lib, "__TVMBackendParallelLaunch");
  if (launch) *launch = (void*)serial_launch;
  void** alloc = (void**)dlsym(lib, "__TVMBackendAllocWorkspace");
  if (alloc) *alloc = (void*)alloc_workspace;
  void** release = (void**)dlsym(lib, "__TVMBackendFreeWorkspace");
  if (release) *release = (void*)free_workspace;
  char sym[256];
  snprintf(sym, sizeof sym, "__tvm_ffi_%s", argv[2]);
  SafeCall f = (SafeCall)dlsym(lib, sym);
  if (!f) { fprintf(stderr, "no symbol %s\n", sym); return 4; }
  int n = argc - 3;
  TVMFFIAny* args = calloc(n, sizeof(TVMFFIAny));
  DLTensor* ts = calloc(n, sizeof(DLTensor));
  for (int i = 0; i < n; ++i) {
    char* spec = argv[3 + i];
    char* colon = strrchr(spec, ':');
    *colon = 0;
    int64_t* shape = calloc(8, sizeof(int64_t));
    int nd = 0;
    size_t count = 1;
    for (char* s = colon + 1; *s;) {
      shape[nd] = strtoll(s, &s, 10);
      count *= shape[nd++];
      if (*s == 'x') ++s;
    }
    float* data = calloc(count, sizeof(float));
    FILE* fp = fopen(spec, "rb");
    if (fp) { if (fread(data, sizeof(float), count, fp) != count) return 5; fclose(fp); }
    ts[i] = (DLTensor){data, {1, 0}, nd, {2, 32, 1}, shape, NULL, 0};
    args[i].type_index = 7; /* kTVMFFIDLTensorPtr */
    args[i].v.p = &ts[i];
  }
  TVMFFIAny ret;
  memset(&ret, 0, sizeof ret);
  if (f(NULL, args, n, &ret) != 0) return 6;
  for (int i = 0; i < n; ++i) {
    char out[1024];
    snprintf(out, sizeof out, "%s.out", argv[3 + i]);
    size_t count = 1;
    for (int d = 0; d < ts[i].ndim; ++d) count *= ts[i].shape[d];
    FILE* fp = fopen(out, "wb");
    fwrite(ts[i].data, sizeof(float), count, fp);
    fclose(fp);
  }
  return 0;
}
"""


@needs_cross
@pytest.mark.skipif(shutil.which("qemu-aarch64") is None or not AARCH64_SYSROOT.is_dir(),
                    reason="qemu-aarch64 (apt-get install qemu-user) or the aarch64 libc missing")
def test_aarch64_kernels_run_under_qemu(arm_art, small, tmp_path):
    """Run the matmul and softmax kernels of an aarch64 artifact under qemu-user."""
    import torch

    m, x = small["module"], small["x"]
    path = arm_art[0].export(tmp_path / "k.so")
    src = tmp_path / "harness.c"
    src.write_text(_HARNESS)
    exe = tmp_path / "harness"
    # -rdynamic exports the error hook to the library; libm provides expf (on a real host
    # libtvm_runtime.so brings it in)
    subprocess.run([CROSS_GCC, "-O1", "-rdynamic", "-o", str(exe), str(src),
                    "-Wl,--no-as-needed", "-lm", "-ldl"], check=True, timeout=120)
    x.numpy().tofile(tmp_path / "x.bin")
    m.w.detach().numpy().tofile(tmp_path / "w.bin")

    def qemu(*args):
        proc = subprocess.run(["qemu-aarch64", "-L", str(AARCH64_SYSROOT), str(exe), str(path),
                               *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr

    qemu("matmul", "x.bin:4x16", "w.bin:16x32", "mm.bin:4x32")
    qemu("softmax", "mm.bin.out:4x32", "sm.bin:4x32")
    with torch.no_grad():
        mm, ref = (x @ m.w).numpy(), m(x).numpy()
    np.testing.assert_allclose(np.fromfile(tmp_path / "mm.bin.out", "float32").reshape(4, 32),
                               mm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.fromfile(tmp_path / "sm.bin.out", "float32").reshape(4, 32),
                               ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ weights outside the library
def test_artifact_call_with_weight_parameters(tmp_path):
    """A module whose weights are parameters past ``num_input``, with no values for them: the
    artifact names them, refuses a call without them, and takes them by name."""
    mod = _module(lambda bb, x, wt: op.matmul(x, wt), [(4, 8), (8, 8)], attrs={"num_input": 1})
    x, w = np.ones((4, 8), "float32"), np.eye(8, dtype="float32")
    art = ac.build(mod)
    assert [s.name for s in art.inputs] == ["x0"]
    assert art.meta["params"] == [{"name": "x1", "shape": [8, 8], "dtype": "float32"}]
    with pytest.raises(ac.ArtifactError, match=r"takes its 1 weight\(s\) \(x1\).*params="):
        art(x)
    with pytest.raises(ac.ArtifactError, match=r"holds no weight values.*load_params"):
        art.export(tmp_path / "m.so", params=tmp_path / "m.params")
    assert os.listdir(tmp_path) == []  # refused before the library was written
    assert _same(art.load_params({"x1": w})(x), x)
    with pytest.raises(ac.InputError, match="expected 1 input"):
        art(x, w)  # the weights are not call arguments


def _linear_attention():
    """sigmoid(q(x) k(x)^T) v(x) with three Linear layers (sigmoid attention: not the softmax
    the attention kernel fuses), so the scores (S x S) are the peak and chunking halves it."""
    import torch

    class Attention(torch.nn.Module):
        def __init__(self, d: int = 16) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))

        def forward(self, x):
            return torch.sigmoid(self.q(x) @ self.k(x).T) @ self.v(x)

    return Attention().eval()


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    """One model with its weights as parameters, built unchunked and at half its peak; one
    weights file, written by the first export."""
    import torch

    d = tmp_path_factory.mktemp("weighted")
    m = _linear_attention()
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x).numpy()
    mod = ac.from_torch(m, (x,), keep_params_as_input=True)
    full = ac.build(mod)
    half = ac.build(mod, budget=full.report.peak_bytes // 2)
    params = d / "attn.params"
    paths = (full.export(d / "full.so", params=params), half.export(d / "half.so"))
    np.save(d / "x.npy", x.numpy())
    return {
        "module": m,
        "mod": mod,
        "x": x.numpy(),
        "ref": ref,
        "arts": (full, half),
        "paths": paths,
        "params": params,
        "dir": d,
    }


def test_weights_are_named_in_the_metadata_and_left_out_of_the_library(weighted, tmp_path):
    import torch

    m, (full, half) = weighted["module"], weighted["arts"]
    wq = m.q.weight.detach().numpy().tobytes()[:64]
    # as a constant, the weight is stored transposed (fold_weight_layouts: once, at build)
    wq_t = np.ascontiguousarray(m.q.weight.detach().numpy().T).tobytes()[:64]
    names = [f"p_{n}_{k}" for n in "qkv" for k in ("weight", "bias")]
    specs = [
        {"name": f"p_{n}_{k}", "shape": [16, 16] if k == "weight" else [16], "dtype": "float32"}
        for n in "qkv"
        for k in ("weight", "bias")
    ]
    for path in weighted["paths"]:
        meta = ac.read_metadata(path)
        assert meta["params"] == specs and [s.name for s in ac.load(path).params] == names
        assert meta["inputs"] == [{"name": "x", "shape": [128, 16], "dtype": "float32"}]
        lib = path.read_bytes()
        assert wq not in lib and wq_t not in lib  # the weights are not in the library
    weights = sum(p.numel() * 4 for p in m.parameters())
    for art in (full, half):  # weights are reported apart, not as inputs or activations
        assert art.report.weight_bytes == weights and art.report.input_bytes == 128 * 16 * 4
        assert art.report.estimate.peak_bytes == art.report.planned_peak_bytes
    # the same model with its weights as constants: the same peak and weights; they are in
    # its library byte for byte (so the check above can fail)
    const = ac.build(ac.from_torch(m, (torch.from_numpy(weighted["x"]),)))
    assert const.report.peak_bytes == full.report.peak_bytes
    assert const.report.weight_bytes == weights
    assert wq_t in const.export(tmp_path / "const.so").read_bytes()


def test_one_weights_file_serves_several_budgets(weighted):
    full, half = weighted["arts"]
    assert full.report.chunking is None and half.report.chunking["regions"]
    assert half.report.peak_bytes <= full.report.peak_bytes // 2
    outs = [ac.load(p, params=weighted["params"])(weighted["x"]) for p in weighted["paths"]]
    np.testing.assert_allclose(outs[0], weighted["ref"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def _bad_weights(weighted, how):
    """The exported weights, changed: one missing, one extra, a wrong shape or dtype."""
    import tvm

    good = {
        k: v.numpy()
        for k, v in tvm.runtime.load_param_dict_from_file(str(weighted["params"])).items()
    }
    if how == "missing":
        del good["p_k_bias"]
    elif how == "extra":
        good["p_o_weight"] = np.zeros((16, 16), "float32")
    elif how == "shape":
        good["p_q_weight"] = good["p_q_weight"][:8]
    else:
        good["p_v_bias"] = good["p_v_bias"].astype("float16")
    return good


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("missing", r"missing 'p_k_bias' \(expected 16 float32\)"),
        ("extra", r"extra 'p_o_weight' \(16x16 float32\): no such parameter"),
        ("shape", r"'p_q_weight' is 8x16 float32, expected 16x16 float32"),
        ("dtype", r"'p_v_bias' is 16 float16, expected 16 float32"),
    ],
)
def test_wrong_weights_are_named(weighted, tmp_path, how, match):
    import tvm

    bad = tmp_path / f"{how}.params"
    tvm.runtime.save_param_dict_to_file(
        {k: tvm.runtime.tensor(v) for k, v in _bad_weights(weighted, how).items()}, str(bad)
    )
    with pytest.raises(ac.ArtifactError, match=match) as ei:
        ac.load(weighted["paths"][1], params=bad)
    assert str(bad) in str(ei.value) and "Remedy" in str(ei.value)
    with pytest.raises(ac.ArtifactError, match=match):  # a mapping is checked the same way
        ac.load(weighted["paths"][0]).load_params(_bad_weights(weighted, how))


def test_weights_file_errors(weighted, small_artifact, tmp_path):
    path = weighted["paths"][0]
    with pytest.raises(ac.ArtifactError, match=r"no weights file at .*not found"):
        ac.load(path, params=tmp_path / "none.params")
    with pytest.raises(ac.ArtifactError, match="not a readable TVM parameter file"):
        ac.load(path, params=path)  # the library is not a weights file
    trunc = tmp_path / "trunc.params"
    trunc.write_bytes(weighted["params"].read_bytes()[:100])
    with pytest.raises(ac.ArtifactError, match="truncated, corrupted"):
        ac.load(path, params=trunc)
    art = ac.load(path)
    with pytest.raises(ac.ArtifactError, match=r"takes its 6 weight\(s\).*params="):
        art(weighted["x"])
    # an artifact with its weights built in takes no weights file
    with pytest.raises(ac.ArtifactError, match=r"takes none.*extra 'p_q_weight'"):
        small_artifact.load_params(weighted["params"])
    with pytest.raises(ac.ArtifactError, match="takes no weights"):
        small_artifact.export(tmp_path / "c.so", params=tmp_path / "c.params")


def test_runtime_only_copy_loads_library_and_weights(weighted, tmp_path):
    """A deploy host with the TVM runtime only loads the library plus its weights file."""
    site = _runtime_only_site(tmp_path / "site")
    y = tmp_path / "y.npy"
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tvm_autochunk as ac
        art = ac.load({str(weighted["paths"][1])!r}, params={str(weighted["params"])!r})
        np.save({str(y)!r}, art(np.load({str(weighted["dir"] / "x.npy")!r})))
        import tvm
        assert tvm.base._RUNTIME_ONLY and "tvm_compiler" not in tvm.base._LOADED_LIBS
        assert "tvm.relax" not in sys.modules and "torch" not in sys.modules
    """)
    proc = _bare_python(site, ["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    np.testing.assert_allclose(np.load(y), weighted["ref"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def small_artifact():
    return ac.build(_module(_attention, [(16, 4)]))


def test_failed_export_leaves_no_partial_artifact(small_artifact, tmp_path, monkeypatch):
    art = small_artifact
    dst = tmp_path / "model.so"

    def broken(path, *a, **kw):  # writes half a library, then fails (a compiler crash, say)
        with open(path, "wb") as f:
            f.write(b"\x7fELF partial")
        raise RuntimeError("the linker was killed")

    monkeypatch.setattr(art._exec, "export_library", broken)
    with pytest.raises(ac.ArtifactError, match="exporting the library failed: the linker"):
        art.export(dst)
    assert os.listdir(tmp_path) == []
    dst.write_bytes(b"the previous, good artifact")  # an existing artifact is left as it was
    with pytest.raises(ac.ArtifactError):
        art.export(dst)
    assert (
        os.listdir(tmp_path) == ["model.so"] and dst.read_bytes() == b"the previous, good artifact"
    )


def test_export_write_error_is_an_artifact_error(small_artifact, tmp_path, monkeypatch):
    def full(src, dst, *a, **kw):
        with open(dst, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(ac.ArtifactError, match="No space left on device"):
        small_artifact.export(tmp_path / "model.so")
    assert os.listdir(tmp_path) == []


def test_measure_peak_with_weights_file(weighted):
    """measure_peak runs a library that takes its weights from a file; the outputs match."""
    from tvm_autochunk.measure import measure_peak

    m = measure_peak(
        weighted["paths"][1], [weighted["x"]], keep_outputs=True, params=weighted["params"]
    )
    assert m.peak_bytes >= 0 and m.outputs_path
    with np.load(m.outputs_path) as z:
        np.testing.assert_allclose(z["arr_0"], weighted["ref"], rtol=1e-5, atol=1e-5)
