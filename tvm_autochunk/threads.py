"""How many threads TVM's CPU kernels run on (the runtime's thread pool; runtime-only safe).

TVM's pool uses half the logical CPUs unless told otherwise: one thread on a 2-core machine,
while the scheduled kernels run their outer loops in parallel. Artifacts use every core the
process may run on, unless the caller (``load(path, threads=N)``, the CLI's ``--threads``) or
the environment (``TVM_AUTOCHUNK_THREADS``, else TVM's own ``TVM_NUM_THREADS``) says
otherwise. The pool is per process: the last setting wins.

TVM sizes its pool once, from ``TVM_NUM_THREADS`` (else half the CPUs), when a kernel first
runs in parallel, and can shrink it later but not grow it. So ``import tvm_autochunk`` sets
``TVM_NUM_THREADS`` to ``resolve()`` unless it or ``OMP_NUM_THREADS`` is set already
(``prepare_pool``).
"""

from __future__ import annotations

import os

from relay_passes.errors import InputError

ENV = "TVM_AUTOCHUNK_THREADS"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def resolve(threads: int | None = None) -> int:
    """The thread count to use: ``threads``, else the environment, else every core."""
    if threads is None:
        raw = os.environ.get(ENV) or os.environ.get("TVM_NUM_THREADS")
        if raw is None:
            return available_cores()
        try:
            threads = int(raw)
        except ValueError:
            raise InputError(
                f"{ENV if os.environ.get(ENV) else 'TVM_NUM_THREADS'}={raw!r} is not a number "
                "of threads. Remedy: set a positive integer or unset it."
            ) from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive int, got {threads!r}")
    return threads


def prepare_pool() -> None:
    """Let TVM's pool, when it is made, have as many threads as ``resolve()`` asks for."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        try:
            os.environ["TVM_NUM_THREADS"] = str(resolve())
        except InputError:
            pass  # a bad TVM_AUTOCHUNK_THREADS is reported when threads are set


def set_threads(threads: int | None = None) -> int:
    """Set TVM's thread pool to ``resolve(threads)`` threads; returns the count in use (fewer
    when the pool was made smaller before ``import tvm_autochunk``)."""
    import tvm
    import tvm_ffi

    n = resolve(threads)
    if tvm.runtime.num_threads() != n:
        # mode 1: big cores first (all cores alike here); the pool is rebuilt with n threads
        tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)
    return tvm.runtime.num_threads()
