"""Versions and machine facts recorded with every benchmark row (``"env"``)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def env_info() -> dict:
    """Package versions, CPU, cores and memory, and the commit the numbers came from."""
    import numpy
    import tvm

    info = {
        "tvm": tvm.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "commit": _git_commit(),
    }
    try:
        import tvm_ffi

        info["tvm_ffi"] = getattr(tvm_ffi, "__version__", "unknown")
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["mem_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info
