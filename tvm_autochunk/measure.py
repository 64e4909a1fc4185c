"""Measure the real peak memory of one call of an exported artifact, in a fresh process.

Why a fresh process: TVM's pooled allocator is process-global and keeps its blocks, so a
second model in the same process reuses the first one's memory; and an exported library must
be proven to run where it will be deployed (a new process). The worker loads the library and
the inputs, resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5), takes the
current RSS as the baseline, runs one call, and reports ``VmHWM - baseline``: the bytes the
call allocated (weights and inputs were already resident before the reset, so they are not
counted, as in our reports). CPU only; the GPU script in ``benchmarks/`` reads device memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relay_passes.errors import ArtifactError


def allowance(budget: int) -> int:
    """How far a fresh-process peak may pass a budget and still count as within it:
    max(1 MiB, 1%). A fresh process touches memory no plan holds (each TVM worker thread's
    stack and malloc arena, about 0.25 MiB a thread) and RSS moves in pages."""
    return max(2**20, budget // 100)


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int  # peak RSS during the call minus RSS just before it
    baseline_bytes: int
    seconds: float  # wall time of the measured call
    outputs_path: str | None = None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _worker(lib: str, inputs: str, out_json: str, outputs: str | None, params: str | None,
            entry: str = "main") -> None:
    import time

    import tvm
    from tvm.runtime.vm import VirtualMachine

    data = np.load(inputs)
    arrays = [data[f"arg{i}"] for i in range(len(data.files))]
    dev = tvm.cpu(0)
    vm = VirtualMachine(tvm.runtime.load_module(lib), dev)
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    if params:  # weights outside the library follow the inputs (resident before the reset)
        from .artifact import TensorSpec, read_metadata
        from .weights import on_device, read

        specs = [TensorSpec.from_dict(d) for d in read_metadata(lib).get("params", [])]
        args += on_device(read(params, specs), dev)
    del data
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_bytes()
    t = time.perf_counter()
    res = vm[entry](*args)
    secs = time.perf_counter() - t
    peak = _hwm_bytes() - base
    if outputs:
        flat = []

        def walk(r):
            if hasattr(r, "numpy"):
                flat.append(r.numpy())
            else:
                for x in r:
                    walk(x)

        walk(res)
        np.savez(outputs, *flat)
    Path(out_json).write_text(json.dumps({"peak": peak, "base": base, "seconds": secs}))


def measure_peak(
    artifact_path: str | os.PathLike,
    inputs,
    *,
    keep_outputs: bool = False,
    timeout: float = 1800.0,
    params: str | os.PathLike | None = None,
    entry: str = "main",
) -> Measurement:
    """Run one call of the exported library at ``artifact_path`` in a fresh Python process.
    ``params``: its weights file, when it was exported with ``params=`` (not counted).
    ``entry``: the function to call (``Artifact.entry_for`` names the one a call runs)."""
    tmp = tempfile.mkdtemp(prefix="tvm_autochunk_measure_")
    inp = os.path.join(tmp, "inputs.npz")
    np.savez(inp, **{f"arg{i}": np.asarray(a) for i, a in enumerate(inputs)})
    out_json = os.path.join(tmp, "result.json")
    outs = os.path.join(tmp, "outputs.npz") if keep_outputs else ""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "tvm_autochunk.measure",
        str(artifact_path),
        inp,
        out_json,
        outs,
        str(params or ""),
        entry,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise ArtifactError(
            f"measuring {artifact_path} in a fresh process failed (exit {proc.returncode}):\n"
            + proc.stderr[-3000:]
        )
    r = json.loads(Path(out_json).read_text())
    return Measurement(int(r["peak"]), int(r["base"]), float(r["seconds"]), outs or None)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None, sys.argv[5] or None,
            sys.argv[6])
