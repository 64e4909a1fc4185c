"""User-facing target names -> TVM targets.

Accepted: a ``tvm.target.Target``; a TVM target dict; ``"llvm"`` / ``"cpu"`` (this host);
``"cuda"`` (with ``arch``, default ``sm_80``); ``"aarch64"`` (64-bit Arm Linux with NEON,
cross-compiled); any tag TVM knows (``"nvidia/nvidia-h100"``).
"""

from __future__ import annotations

import contextlib
import functools

from relay_passes.errors import UnsupportedTargetError

DEFAULT_CUDA_ARCH = "sm_80"
ACCEPTED = "'llvm' (or 'cpu'), 'cuda', 'aarch64', a TVM tag, a target dict, or a tvm.target.Target"


def resolve_target(target="llvm", arch: str | None = None):
    """Return a ``tvm.target.Target`` for a user-facing target spec."""
    import tvm

    if isinstance(target, tvm.target.Target):
        if arch is not None:
            raise UnsupportedTargetError("pass arch= only with a target name, not a Target object")
        return target
    if isinstance(target, dict):
        return tvm.target.Target(dict(target))
    if not isinstance(target, str) or not target.strip():
        raise UnsupportedTargetError(f"invalid target {target!r}: expected {ACCEPTED}")
    name = target.strip().lower()
    if name in ("llvm", "cpu"):
        # the host's CPU by default (like -march=native): a plain llvm target leaves the vector
        # units half used (SSE2); arch= names another CPU, "generic" any x86-64
        return tvm.target.Target({"kind": "llvm", "mcpu": arch or host_cpu()})
    if name == "cuda":
        a = arch or DEFAULT_CUDA_ARCH
        if not a.startswith("sm_") or not a[3:].rstrip("a").isdigit():
            raise UnsupportedTargetError(
                f"invalid CUDA arch {a!r}: expected a form like 'sm_80' or 'sm_90a'"
            )
        return tvm.target.Target({"kind": "cuda", "arch": a, "host": {"kind": "llvm"}})
    if name in ("aarch64", "arm64"):
        return tvm.target.Target(
            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
        )
    if " -" in name or name.startswith("-"):
        raise UnsupportedTargetError(
            f"TVM 0.27 rejects target strings with options ({target!r}); pass a dict such as "
            "{'kind': 'llvm', 'mcpu': 'skylake'} or use arch=..."
        )
    try:
        return tvm.target.Target(target)
    except Exception as e:
        raise UnsupportedTargetError(f"unknown target {target!r}: expected {ACCEPTED}") from e


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "skylake-avx512")."""
    from tvm.target.codegen import llvm_get_system_cpu

    return str(llvm_get_system_cpu()) or "generic"


def is_cross(target) -> bool:
    """True when the target's code cannot run on this host (cross-compiled CPU code)."""
    import platform

    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if not triple:
        return False
    return not triple.startswith(platform.machine())


def target_summary(target) -> dict:
    """A JSON-able description of a target."""
    d = {"kind": target.kind.name}
    for k in ("arch", "mtriple", "mcpu"):
        v = target.attrs.get(k)
        if v:
            d[k] = str(v)
    if target.kind.name == "llvm" and "mattr" in target.attrs:
        d["mattr"] = [str(x) for x in target.attrs["mattr"]]
    return d


# ----------------------------------------------------------------------------- CUDA device code
# TVM's CUDA codegen hands the generated CUDA C++ to the factory "ffi.Module.create.cuda", which
# lives in libtvm_runtime_cuda.so and compiles the source through the Python callback
# "tvm_callback_cuda_compile". On a host without an NVIDIA driver that library does not load
# (it links libcuda.so.1), so the codegen stores the *source* in the module and the deploy host
# would need a CUDA compiler. ``cuda_device_code`` makes the build embed a real fatbin instead:
# it loads libtvm_runtime_cuda.so against a stub libcuda.so.1 when no driver is installed (the
# stub is never called: compiling and serialising need no driver) and routes the compile
# callback to nvcc for the target's arch.

# driver entry points libtvm_runtime_cuda.so links; more are added if the loader asks for them
_STUB_CU_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
    "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)
_CUDA_FACTORY = "ffi.Module.create.cuda"
_CUDA_COMPILE_CALLBACK = "tvm_callback_cuda_compile"
_FORCE_FALLBACK = "TVM_COMPILE_FORCE_FALLBACK"
_stub_driver_loaded = False  # set once libtvm_runtime_cuda.so was loaded against our stub
_FATBIN_MAGIC = b"\x50\xed\x55\xba"


def cuda_arch(target) -> str | None:
    """The ``sm_XX`` arch of a CUDA target, or None."""
    a = target.attrs.get("arch") if target.kind.name == "cuda" else None
    return str(a) if a else None


def find_nvcc() -> str | None:
    """The nvcc on PATH (or under $CUDA_HOME/bin), or None."""
    import os
    import shutil

    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


@functools.lru_cache(maxsize=8)
def _nvcc_version(nvcc: str) -> str:
    import re
    import subprocess

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"release ([0-9.]+), V([0-9.]+)", out.stdout)
    return m.group(2) if m else "unknown"


@functools.lru_cache(maxsize=8)
def nvcc_archs(nvcc: str) -> tuple[str, ...]:
    """The ``compute_XX`` archs this nvcc can compile for (empty if it cannot tell)."""
    import subprocess

    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(a for a in out.stdout.split() if a.startswith("compute_"))


def build_stub_libcuda(directory, symbols=_STUB_CU_SYMBOLS, cc: str | None = None):
    """Write ``directory/libcuda.so.1``: every CUDA driver entry point in ``symbols`` returns
    CUDA_ERROR_NO_DEVICE (100). Lets libtvm_runtime_cuda.so load where no driver is installed.
    """
    import shutil
    import subprocess
    from pathlib import Path

    cc = cc or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc) to build the libcuda.so.1 stub")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    src, lib = d / "libcuda_stub.c", d / "libcuda.so.1"
    src.write_text("".join(f"int {s}(void) {{ return 100; }}\n" for s in symbols))
    proc = subprocess.run(
        [cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib), str(src)],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip()[-500:])
    return lib


def _load_runtime_cuda() -> str | None:
    """Make "ffi.Module.create.cuda" available; None on success, else why it is not."""
    import ctypes
    import re
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    import tvm_ffi
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if tvm_ffi.get_global_func(_CUDA_FACTORY, allow_missing=True) is not None:
        return None
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent

    def load_sidecar():
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL",
        )

    try:
        ctypes.CDLL("libcuda.so.1")
        driver = True
    except OSError:
        driver = False
    if driver:  # a real driver: the sidecar fails for another reason (libcudart?); say which
        try:
            load_sidecar()
        except (OSError, RuntimeError) as e:
            return f"libtvm_runtime_cuda.so does not load: {e}"
        return None
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc) to build the libcuda.so.1 stub"
    symbols = list(_STUB_CU_SYMBOLS)
    tmp = tempfile.mkdtemp(prefix="tvm_autochunk_cudastub_")
    try:
        for attempt in range(8):
            try:
                lib = build_stub_libcuda(Path(tmp) / f"v{attempt}", symbols, cc)
            except (OSError, subprocess.SubprocessError) as e:
                return f"building the libcuda.so.1 stub failed: {e}"
            # loaded first and RTLD_GLOBAL: the dynamic linker matches libtvm_runtime_cuda.so's
            # DT_NEEDED libcuda.so.1 against this object's soname
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            try:
                load_sidecar()
                global _stub_driver_loaded
                _stub_driver_loaded = True
                return None
            except (OSError, RuntimeError) as e:
                m = re.search(r"undefined symbol: (cu[A-Za-z0-9_]+)", str(e))
                if m is None or m.group(1) in symbols:
                    return f"libtvm_runtime_cuda.so does not load even with a stub driver: {e}"
                symbols.append(m.group(1))
        return "libtvm_runtime_cuda.so needs too many driver symbols"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loaded library stays mapped


def _sniff_device_code(blob: bytes) -> str:
    if blob[:4] == _FATBIN_MAGIC:
        return "fatbin"
    if blob[:4] == b"\x7fELF":
        return "cubin"
    return "ptx"


@contextlib.contextmanager
def cuda_device_code(target, progress=None):
    """Scope for ``tvm.compile`` of a CUDA target: the module gets a real fatbin for the arch.

    Yields a dict that describes the device code after the build: ``format`` ("fatbin",
    "cubin", "ptx" or "cuda-source"), ``arch``, ``compiler`` and, for source, ``reason``.
    With nvcc available the compile callback is nvcc ``--fatbin`` for the target's arch (SASS
    for that arch plus its PTX, so newer GPUs can JIT it). Without nvcc TVM's own callback is
    kept (nvrtc, on GPU hosts); where no compile happens the module keeps CUDA source, which
    the deploy host must compile on load (``info["reason"]`` says why).
    """
    import logging
    import os

    import tvm_ffi

    log = logging.getLogger(__name__)
    arch = cuda_arch(target)
    info: dict = {"arch": arch}
    if target.kind.name != "cuda":
        yield info
        return
    nvcc = find_nvcc()
    force_source = False
    if nvcc is None:
        # keep TVM's behaviour: its own callback (nvrtc) where a real CUDA runtime is loaded,
        # CUDA source in the module elsewhere (also when only our stub driver is loaded)
        why_not = "nvcc not found on PATH or under $CUDA_HOME/bin"
        force_source = _stub_driver_loaded
        if not force_source and tvm_ffi.get_global_func(_CUDA_FACTORY, allow_missing=True):
            why_not = None
    else:
        known = nvcc_archs(nvcc)
        digits = (arch or "").removeprefix("sm_").rstrip("af")
        if known and f"compute_{digits}" not in known:
            raise UnsupportedTargetError(
                f"CUDA arch {arch!r} is not supported by {nvcc} (CUDA {_nvcc_version(nvcc)}); "
                f"it compiles for {', '.join(a.replace('compute_', 'sm_') for a in known)}. "
                "Remedy: pick one of those with arch=..., or use another CUDA toolkit."
            )
        why_not = _load_runtime_cuda()
    previous = tvm_ffi.get_global_func(_CUDA_COMPILE_CALLBACK, allow_missing=True)

    def compile_cb(code):
        if nvcc is None:
            blob = bytes(previous(code))
            info.update(format=_sniff_device_code(blob), compiler="TVM default (nvrtc)",
                        device_code_bytes=len(blob))
            return blob
        from tvm.support import nvcc as tvm_nvcc

        try:
            with target:  # TVM's nvcc driver reads the compute version from the current target
                blob = bytes(tvm_nvcc.compile_cuda(code, target_format="fatbin", arch=arch,
                                                   compiler="nvcc"))
        except RuntimeError as e:  # the message starts with the whole CUDA source: drop it
            detail = str(e).split("Compilation error:", 1)[-1].strip()[-2000:]
            raise RuntimeError(f"nvcc failed to compile the kernels for {arch}: {detail}") from e
        info.update(format=_sniff_device_code(blob), compiler=f"nvcc {_nvcc_version(nvcc)}",
                    device_code_bytes=len(blob))
        return blob

    hook = not force_source and (previous is not None or nvcc is not None)
    saved_env = os.environ.get(_FORCE_FALLBACK)
    if force_source:
        os.environ[_FORCE_FALLBACK] = "1"  # read by TVM's codegen at each build
    if progress is not None and why_not is None:
        progress(f"compiling CUDA kernels for {arch} with "
                 + (f"nvcc ({nvcc})" if nvcc else "TVM's default CUDA compiler"))
    if hook:
        tvm_ffi.register_global_func(_CUDA_COMPILE_CALLBACK, compile_cb, override=True)
    try:
        with target:
            yield info
    finally:
        if hook and previous is not None:
            tvm_ffi.register_global_func(_CUDA_COMPILE_CALLBACK, previous, override=True)
        if force_source:
            if saved_env is None:
                os.environ.pop(_FORCE_FALLBACK, None)
            else:
                os.environ[_FORCE_FALLBACK] = saved_env
    if "format" not in info:
        info["format"] = "cuda-source"
        info["reason"] = why_not or "the CUDA module factory did not compile the kernels"
        msg = (f"the CUDA module keeps CUDA source ({info['reason']}); the deploy host must "
               "compile it on load (nvrtc or nvcc). Install the CUDA toolkit (nvcc) on the "
               "build host to embed a fatbin instead.")
        log.warning(msg)
