"""Plain, frozen data produced by the analyses. All sizes are integer bytes.

Nothing here imports TVM, so reports can be built, compared and serialised anywhere.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, replace

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int) -> str:
    """A byte count for people: ``"12 B"``, ``"512.00 MiB"``, ``"1.50 GiB"``.

    Binary units up to TiB, so every output parses back as a budget (for positive ``n``).
    Negative counts (deltas) keep their sign.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"format_bytes expects an int number of bytes, got {n!r}")
    n = int(n)
    sign, mag = ("-" if n < 0 else ""), abs(n)
    if mag < 1024:
        return f"{sign}{mag} B"
    for i, unit in enumerate(_BINARY_UNITS):
        scaled = mag / 1024 ** (i + 1)
        # promote when rounding would print "1024.00 KiB" instead of "1.00 MiB"
        if round(scaled, 2) < 1024 or i == len(_BINARY_UNITS) - 1:
            return f"{sign}{scaled:.2f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class TensorRecord:
    """One tensor in a liveness view: what it is and what it costs."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    op: str  # producing op (original Relax op where known, else the PrimFunc name)
    kind: str  # "intermediate" | "output" | "input" | "weight" | "workspace" | "callee"


@dataclass(frozen=True)
class TimelineEntry:
    """Live bytes right after one binding executes (transients of that binding included)."""

    index: int
    name: str
    op: str
    live_bytes: int


@dataclass(frozen=True)
class FrameMemory:
    """Memory of one Relax function frame as TVM's static planner lays it out."""

    function: str
    storage_bytes: int  # sum of planned storages (memory.alloc_storage)
    num_storages: int
    unplanned_bytes: int  # tensors the planner leaves to run-time allocation (outputs included)
    output_bytes: int  # the part of unplanned_bytes returned by the function
    callee_bytes: int  # the largest frame of a Relax function called from here
    callee: str | None

    @property
    def total_bytes(self) -> int:
        return self.storage_bytes + self.unplanned_bytes + self.callee_bytes


@dataclass(frozen=True)
class MemoryProfile:
    """What one call of a module's entry function allocates, and where the pressure is.

    ``peak_bytes`` = planned storage + unplanned allocations (outputs included) + the largest
    callee frame + the largest PrimFunc-internal workspace: the bytes the module allocates
    during a call. Weights (constants) and inputs are owned by the caller and reported apart.
    """

    target: str
    function: str
    peak_bytes: int
    frame: FrameMemory
    workspace_bytes: int
    workspace_func: str | None
    # simulated run-time high-water mark (VM pools; <= peak_bytes on CPUs; on GPUs each block
    # takes whole 2 MiB pages, runtime_memory.GPU_ALLOC_GRANULARITY, and it can exceed peak_bytes)
    runtime_peak_bytes: int
    live_peak_bytes: int  # peak of the liveness timeline (ideal reuse; <= peak_bytes)
    peak_index: int
    peak_binding: str
    peak_op: str
    live_at_peak: tuple[TensorRecord, ...]
    timeline: tuple[TimelineEntry, ...]
    weight_bytes: int
    input_bytes: int
    inputs: tuple[TensorRecord, ...] = ()
    outputs: tuple[TensorRecord, ...] = ()
    symbolic_bounds: tuple[tuple[str, int], ...] = ()  # dims evaluated at these upper bounds
    notes: tuple[str, ...] = field(default=())

    @property
    def activation_bytes(self) -> int:
        """Alias of ``peak_bytes``: the activation memory of one call."""
        return self.peak_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["frame"]["total_bytes"] = self.frame.total_bytes
        return d


@dataclass(frozen=True)
class PlannedMemory:
    """Ground truth read off TVM's own plan after ``StaticPlanBlockMemory``."""

    target: str
    peak_bytes: int  # storage(main) + unplanned(main) + max callee frame + max workspace
    frames: tuple[FrameMemory, ...]
    workspace_bytes: int
    workspace_func: str | None

    def frame(self, name: str) -> FrameMemory:
        for f in self.frames:
            if f.function == name:
                return f
        raise KeyError(name)


def fold_callees(
    frames: dict[str, FrameMemory], calls: dict[str, list[str]], entry: str
) -> dict[str, FrameMemory]:
    """Each frame reachable from ``entry`` with its largest callee frame folded in.

    A callee's frame is live only during the call, so a frame costs its own bytes plus the
    largest frame it calls (transitively). Recursion is cut: a frame already on the call stack
    is counted once.
    """
    done: dict[str, FrameMemory] = {}

    def fold(name: str, stack: tuple[str, ...]) -> FrameMemory:
        if name in done:
            return done[name]
        best, best_name = 0, None
        for c in sorted(set(calls.get(name, ()))):
            if c in stack or c == name:
                continue
            t = fold(c, (*stack, name)).total_bytes
            if t > best:
                best, best_name = t, c
        done[name] = replace(frames[name], callee_bytes=best, callee=best_name)
        return done[name]

    fold(entry, ())
    return done


@dataclass(frozen=True)
class ChunkRegion:
    """Compute bindings ``start..end`` of ``function`` chunk by chunk along ``dim`` of ``seed``.

    ``chunk`` is the number of seed rows per chunk (the last chunk takes the remainder).
    """

    start: str
    end: str
    seed: str
    dim: int
    chunk: int
    function: str = "main"


@dataclass(frozen=True)
class ChunkPlan:
    regions: tuple[ChunkRegion, ...] = ()

    @classmethod
    def region(
        cls,
        mod=None,
        *,
        start: str,
        end: str,
        dim: dict[str, int],
        chunk: int,
        function: str = "main",
    ) -> ChunkPlan:
        """A one-region plan: chunk ``start..end`` along ``dim = {seed tensor: axis}``.

        ``mod`` is accepted for symmetry with the analyses and not inspected here: legality is
        checked when the plan is applied (``ApplyChunkPlan``), with the reason if it fails.
        """
        if not isinstance(dim, dict) or len(dim) != 1:
            raise ValueError("dim must be a one-entry dict {seed tensor name: axis}")
        ((seed, axis),) = dim.items()
        return cls((ChunkRegion(start, end, str(seed), int(axis), int(chunk), function),))

    def then(self, other: ChunkPlan) -> ChunkPlan:
        return ChunkPlan(self.regions + other.regions)

    def to_dict(self) -> dict:
        return {"regions": [asdict(r) for r in self.regions]}
