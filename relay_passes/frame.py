"""What one frame walk finds (plain data), and TVM's static planner's token allocator.

``Proto`` is one tensor allocation; ``Event`` one binding; ``FrameAnalysis`` the walk's
result (consumed by ``estimate_memory`` and ``runtime_memory``). ``TokenAllocator1D``
mirrors ``StaticPlanBlockMemory``'s allocator (same choices, same tie-breaks), so the
storages the walk packs are the ones TVM will emit.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import tvm
from tvm import relax

from . import _compat as C
from .plan import FrameMemory

_MATCH_RANGE = 16  # TokenAllocator1D::match_range_


@dataclass(eq=False)
class Proto:
    """One tensor allocation (a builtin.alloc_tensor after CallTIRRewrite)."""

    uid: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    op: str
    block: int
    born: int
    refs: int = 0
    planned: bool = True
    runtime: bool = False  # allocated by a packed function / callee, never plannable
    output: bool = False
    from_callee: bool = False  # returned by a Relax callee: counted in the callee's frame
    last_use: int = -1


@dataclass(eq=False)
class Storage:
    sid: int
    nbytes: int
    dtype: str
    scope: str = "global"


class TokenAllocator1D:
    """TVM's TokenAllocator1D (static_plan_block_memory.cc), same choices, same tie-breaks."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, str], list[tuple[int, int, Storage]]] = {}
        self.storages: list[Storage] = []
        self._seq = 0

    def request(self, p: Proto) -> Storage:
        pool = self.pools.setdefault(("global", p.dtype), [])
        size = p.nbytes
        keys = [k for k, _, _ in pool]
        begin = bisect.bisect_left(keys, size // _MATCH_RANGE)
        mid = bisect.bisect_left(keys, size)
        end = bisect.bisect_right(keys, size * _MATCH_RANGE)
        if mid != end:  # smallest block >= size (earliest inserted among equals)
            return pool.pop(mid)[2]
        if mid != begin:  # largest block < size (latest inserted among equals), grown
            st = pool.pop(mid - 1)[2]
            st.nbytes = size
            return st
        st = Storage(len(self.storages), size, p.dtype)
        self.storages.append(st)
        return st

    def release(self, st: Storage) -> None:
        pool = self.pools.setdefault((st.scope, st.dtype), [])
        self._seq += 1
        # multimap::insert puts equal keys after the existing ones
        bisect.insort(pool, (st.nbytes, self._seq, st), key=lambda t: (t[0], t[1]))


@dataclass
class Event:
    index: int
    name: str
    op: str
    allocs: list[Proto] = field(default_factory=list)
    uses: list[Proto] = field(default_factory=list)  # PrimFunc/extern call args (refcounted)
    workspace: int = 0  # bytes of kernel workspace this binding's PrimFunc requests
    ws_allocs: tuple[int, ...] = ()  # the individual requests, in program order
    callee: str | None = None


@dataclass(frozen=True)
class FrameAnalysis:
    """Everything the frame walk found (plain data, consumed by estimate_memory)."""

    memory: FrameMemory
    protos: tuple[Proto, ...]
    events: tuple[Event, ...]
    callees: tuple[str, ...]
    workspace_by_index: dict  # binding index -> workspace requests (bytes) of its kernel
    num_bindings: int
    blocks: tuple[tuple[int, int, int], ...] = ()  # run-time allocations: (bytes, first, last)


def nested(tokens):
    """Flatten a nested token structure (Proto | None | tuple) into a list of Protos."""
    if tokens is None:
        return []
    if isinstance(tokens, Proto):
        return [tokens]
    out = []
    for t in tokens:
        out.extend(nested(t))
    return out


def element_count(shape):
    """The element count of a shape: an int when static, else a PrimExpr."""
    if all(isinstance(d, (int, tvm.tirx.IntImm)) for d in shape):
        return C.prod(int(d) for d in shape)
    out = tvm.tirx.const(1, "int64")
    for d in shape:
        out = out * d
    return out


def call_args(args: tuple) -> list:
    """The tensor arguments of a call_tir-like call, from its arguments (callee, tuple)."""
    tup = args[1]
    if isinstance(tup, relax.Tuple):
        return list(tup.fields)
    return [tup]
