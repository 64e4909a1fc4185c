"""Helpers shared by the CPU schedule rules (dlight's shape: one rule family per module)."""

from __future__ import annotations

from tvm.s_tir.dlight.base import ScheduleRule, get_extent, try_inline_contiguous_spatial
from tvm.target import Target
from tvm.target.codegen import target_has_features

from .. import caches
from ..schedule_rules import DeclinesOnError


class CPURule(DeclinesOnError, ScheduleRule):
    """A rule for llvm targets (``DeclinesOnError``: ``schedule`` or decline)."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"


def register_bits(target: Target) -> int:
    """The width of the target's vector registers. Not ``llvm_get_vector_width``: it says 512
    for every x86 CPU, and a matmul tile sized for 512-bit registers spills on AVX2."""
    known = caches.current().register_bits
    key = str(target)
    if key not in known:
        wide = [(512, "avx512f"), (256, "avx")]
        known[key] = next((b for b, f in wide if target_has_features(f, target)), 128)
    return known[key]


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    return max(2, register_bits(target) // dtype_bits)


def static_extent(sch, loop) -> int | None:
    e = get_extent(sch, loop)
    return e if isinstance(e, int) else None


# TVM 0.27's llvm codegen rejects vector stores of these (bfloat16x16 into a uint16 buffer)
NO_VECTORS = ("bfloat16", "float16")


def vectorizable(sch, block) -> bool:
    stmt = sch.get(block)
    return not any(str(w.source.dtype) in NO_VECTORS for w in stmt.writes) and not any(
        str(r.source.dtype) in NO_VECTORS for r in stmt.reads
    )


# kernels with fewer iterations than this run on one thread: a parallel launch (waking the
# pool, a barrier) costs more than it saves on a small chunk's kernels
MIN_PARALLEL_WORK = 1 << 15


def work(sch, block) -> int | None:
    """The iterations of ``block``'s loop nest (None: not static)."""
    n = 1
    for loop in sch.get_loops(block):
        e = static_extent(sch, loop)
        if e is None:
            return None
        n *= e
    return n


def parallel(sch, block, loop) -> None:
    """``loop`` in parallel, unless ``block`` is too small to pay for a parallel launch."""
    w = work(sch, block)
    if w is None or w >= MIN_PARALLEL_WORK:
        sch.parallel(loop)


def dtype_bits(sch, block) -> int:
    stmt = sch.get(block)
    return stmt.writes[0].source.dtype.bits if stmt.writes else 32


def parallel_vectorize(sch, block, lanes: int, keep_inner: int = 1) -> None:
    """An injective block's loops: the outer ones fused and run in parallel; the innermost
    ``keep_inner`` ones fused, split by ``lanes`` and vectorized when they are long enough."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-keep_inner:] if len(loops) > keep_inner else loops
    outer = loops[: len(loops) - len(inner)]
    vec = sch.fuse(*inner) if len(inner) > 1 else inner[0]
    n = static_extent(sch, vec) if vectorizable(sch, block) else None
    if n is not None and n >= lanes and n % lanes == 0:
        vo, vi = sch.split(vec, factors=[None, lanes])
        sch.vectorize(vi)
        outer = [*outer, vo]
    elif n is not None and 2 <= n <= lanes:
        sch.vectorize(vec)
    elif static_extent(sch, vec) is not None or not outer:
        outer = [*outer, vec]
    # else a run-time extent stays a serial inner loop: fused with the parallel loop, every
    # element would divide by it (a symbolic K transpose, 1025 x 256: 1.8 -> 0.3 ms)
    if outer:
        parallel(sch, block, sch.fuse(*outer) if len(outer) > 1 else outer[0])


def inputs(sch, block) -> list:
    """The distinct buffers ``block`` reads besides its output (by identity, not name: two
    parameters may share one, matmul(b, b))."""
    stmt = sch.get(block)
    seen = [stmt.writes[0].source]
    for r in stmt.reads:
        if not any(r.source.same_as(b) for b in seen):
            seen.append(r.source)
    return seen[1:]


def contraction(sch, infos, min_spatial: int):
    """(block, its loops, its number of spatial axes) when, its injective producers (a conv's
    padding) inlined, ``infos`` is one vectorizable block with at least ``min_spatial`` spatial
    axes, then only reduction axes, reading two or more buffers (a matmul, a conv); else None.
    A one-operand reduction (a row sum or max) is left to RowChain."""
    infos = try_inline_contiguous_spatial(sch, infos)
    if infos is None or len(infos) != 1:
        return None
    kind = infos[0].dom_kind()
    n_s = len(kind) - len(kind.lstrip("S"))
    if n_s < min_spatial or not kind[n_s:] or set(kind[n_s:]) != {"R"}:
        return None
    block = infos[0].block_rv
    loops = sch.get_loops(block)
    if len(loops) != len(kind) or not vectorizable(sch, block) or len(inputs(sch, block)) < 2:
        return None
    return block, loops, n_s
