"""The memo tables of one build, in one object that the build owns and drops.

The search estimates dozens of near-identical modules; the estimator and the analyses memoise
what they read of unchanged IR (an op's lowering, a function's index, a call's arguments).
Those tables live in a ``Caches`` object, made by ``scope()`` for one top-level call
(``auto_chunk``, ``estimate_memory``, the pipeline pass) and dropped when it returns, so
nothing grows or goes stale across builds. Code outside any scope gets a throwaway object:
correct, only slower.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from dataclasses import dataclass, field


@dataclass
class Caches:
    # ir_index: relax.Function (by identity) -> FuncIndex; Call handle -> (args, read handles)
    index: dict = field(default_factory=dict)
    call_info: dict = field(default_factory=dict)
    # _compat: TensorType handle -> shape; PrimFunc -> workspace requests (two keyings)
    shapes: dict = field(default_factory=dict)
    workspace: dict = field(default_factory=dict)
    workspace_by_object: dict = field(default_factory=dict)
    # cpu_schedules.common: target string -> vector register bits (a query builds an LLVM
    # target machine: 0.1 ms, asked for every kernel the search schedules)
    register_bits: dict = field(default_factory=dict)
    # liveness: PrimFunc -> has_reshape_pattern
    reshape: dict = field(default_factory=dict)
    # alias: (module id, function name) -> returned_params; rewrite: region -> reusable inputs
    returned: dict = field(default_factory=dict)
    reuse: dict = field(default_factory=dict)
    # legalize_cache: the memoised lowerings and what they need (see there)
    legalize: dict = field(default_factory=dict)
    legalize_wrappers: dict = field(default_factory=dict)
    legalize_keys: dict = field(default_factory=dict)
    legalize_pending: dict = field(default_factory=dict)
    lowered: dict = field(default_factory=dict)
    builds: dict = field(default_factory=dict)
    # attention.fuse: AttentionShape -> the kernel's PrimFunc (one object per shape)
    kernels: dict = field(default_factory=dict)
    serial: itertools.count = field(default_factory=itertools.count)
    target: str = ""  # the target in scope for the running lowering
    stats: dict = field(default_factory=lambda: {"hits": 0, "misses": 0, "uncached": 0})


# the running scope's caches, per thread (a thread-local slot, not a ContextVar: setting one
# replaces the context's mapping, which frees objects a caller may have gc.freeze()-d)
_LOCAL = threading.local()


def active() -> Caches | None:
    return getattr(_LOCAL, "caches", None)


def current() -> Caches:
    """The caches of the running scope, or a throwaway object outside any scope."""
    return active() or Caches()


@contextlib.contextmanager
def scope():
    """Enter a build's caches: a new object, or the enclosing scope's one when nested."""
    outer = active()
    if outer is not None:
        yield outer
        return
    _LOCAL.caches = Caches()
    try:
        yield _LOCAL.caches
    finally:
        _LOCAL.caches = None


def scoped(fn):
    """Decorator: run ``fn`` inside ``scope()``."""

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        if active() is not None:  # the common case inside a build: no new scope
            return fn(*args, **kw)
        with scope():
            return fn(*args, **kw)

    return wrapper
