"""MemoryReport: the user-facing view of a memory estimate (and, after a build, TVM's plan).

The only place that formats byte counts for people. ``peak_bytes`` is an int: the bytes one
call of the module allocates (intermediates, outputs, kernel workspace); weights and the
caller's inputs are listed apart and not part of it. See README "What the budget covers".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .budget import format_bytes


@dataclass(frozen=True)
class MemoryReport:
    """Peak memory of one call, where it happens, what is live there, and a timeline.

    ``estimate`` is a ``relay_passes.plan.MemoryProfile``; ``planned`` the ground truth read off
    TVM's ``StaticPlanBlockMemory`` (present on a built artifact); ``budget`` in bytes or None.
    """

    estimate: object
    planned: object | None = None
    budget: int | None = None
    chunking: dict | None = None
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------ numbers
    @property
    def peak_bytes(self) -> int:
        """The bytes one call allocates: the larger of TVM's static plan (our replay of it before
        a build, TVM's own after) and the simulated run-time high-water mark of the VM's pools
        (the CPU workspace pool can hold more than the largest single kernel asks for)."""
        static = self.planned.peak_bytes if self.planned is not None else self.estimate.peak_bytes
        return max(int(static), int(self.estimate.runtime_peak_bytes))

    @property
    def estimated_peak_bytes(self) -> int:
        """Our replay of TVM's static plan (storage + run-time allocs + largest workspace)."""
        return int(self.estimate.peak_bytes)

    @property
    def runtime_peak_bytes(self) -> int:
        """Simulated high-water mark of one call (storage pool + workspace pool)."""
        return int(self.estimate.runtime_peak_bytes)

    @property
    def planned_peak_bytes(self) -> int | None:
        return None if self.planned is None else int(self.planned.peak_bytes)

    @property
    def weight_bytes(self) -> int:
        return int(self.estimate.weight_bytes)

    @property
    def input_bytes(self) -> int:
        return int(self.estimate.input_bytes)

    @property
    def peak_binding(self) -> str:
        return self.estimate.peak_binding

    @property
    def live_at_peak(self):
        return self.estimate.live_at_peak

    @property
    def timeline(self):
        return self.estimate.timeline

    # ------------------------------------------------------------ output
    def to_dict(self) -> dict:
        est = self.estimate.to_dict()
        d = {
            "peak_bytes": self.peak_bytes,
            "estimated_peak_bytes": self.estimated_peak_bytes,
            "runtime_peak_bytes": int(self.estimate.runtime_peak_bytes),
            "planned_peak_bytes": self.planned_peak_bytes,
            "budget_bytes": self.budget,
            "weight_bytes": self.weight_bytes,
            "input_bytes": self.input_bytes,
            "estimate": est,
        }
        if self.planned is not None:
            from dataclasses import asdict

            d["planned"] = asdict(self.planned)
        if self.chunking is not None:
            d["chunking"] = self.chunking
        d.update(self.extra)
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        return self.format()

    def format(self, timeline_rows: int = 12, live_rows: int = 8) -> str:
        e = self.estimate
        fr = e.frame
        lines = [f"Memory report ({e.target}, function '{e.function}')"]
        lines.append(f"  peak (one call)      {format_bytes(self.peak_bytes):>12}")
        if self.planned is None:
            lines.append(f"    static plan        {format_bytes(self.estimated_peak_bytes):>12}")
        if self.planned is not None:
            lines.append(
                f"    static plan        {format_bytes(self.planned_peak_bytes):>12}   "
                f"(our replay before the build: {format_bytes(self.estimated_peak_bytes)})"
            )
        if self.budget is not None:
            ok = "within" if self.peak_bytes <= self.budget else "OVER"
            lines.append(f"  budget               {format_bytes(self.budget):>12}   ({ok} budget)")
        lines.append(
            f"  run-time high-water {format_bytes(e.runtime_peak_bytes):>12}   (simulated VM pools)"
        )
        lines.append(
            f"    planned storage    {format_bytes(fr.storage_bytes):>12}   "
            f"in {fr.num_storages} storages"
        )
        lines.append(
            f"    run-time allocs    {format_bytes(fr.unplanned_bytes):>12}   "
            f"(outputs {format_bytes(fr.output_bytes)})"
        )
        if fr.callee_bytes:
            lines.append(
                f"    callee frame       {format_bytes(fr.callee_bytes):>12}   ({fr.callee})"
            )
        lines.append(
            f"    kernel workspace   {format_bytes(e.workspace_bytes):>12}"
            + (f"   (largest: {e.workspace_func})" if e.workspace_func else "")
        )
        lines.append(f"  weights (not counted){format_bytes(e.weight_bytes):>12}")
        lines.append(f"  inputs  (not counted){format_bytes(e.input_bytes):>12}")
        if e.symbolic_bounds:
            b = ", ".join(f"{k}<={v}" for k, v in e.symbolic_bounds)
            lines.append(f"  symbolic dims at upper bounds: {b}")
        lines.append(
            f"  liveness peak {format_bytes(e.live_peak_bytes)} after binding '{e.peak_binding}' "
            f"({e.peak_op}); live there:"
        )
        for r in e.live_at_peak[:live_rows]:
            shape = "x".join(str(s) for s in r.shape) or "scalar"
            lines.append(
                f"    {r.name:<14} {r.op:<22} {shape:<20} {r.dtype:<8} {format_bytes(r.nbytes):>12}"
            )
        if len(e.live_at_peak) > live_rows:
            lines.append(f"    ... {len(e.live_at_peak) - live_rows} more")
        if e.timeline and timeline_rows:
            lines.append("  timeline (live bytes after each binding; largest shown):")
            top = sorted(e.timeline, key=lambda t: -t.live_bytes)[:timeline_rows]
            for t in sorted(top, key=lambda t: t.index):
                bar = "#" * max(1, int(30 * t.live_bytes / max(1, e.live_peak_bytes)))
                size = format_bytes(t.live_bytes)
                lines.append(f"    {t.index:>4} {t.name:<12} {t.op:<22} {size:>12} {bar}")
        if self.chunking:
            lines.extend(format_chunking(self.chunking))
        lines.extend(format_lengths(self.extra))
        for n in e.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


def format_chunking(ch: dict) -> list[str]:
    """The chunk plan of a report, one line per stage: the search's record
    (``AutoChunkResult.to_dict``) or a caller's plan (``ChunkPlan.to_dict``)."""
    regions = ch.get("regions") or []
    if "budget_bytes" not in ch:  # a caller's plan
        lines = [f"  chunking (the caller's plan): {len(regions)} region(s)"]
        lines += [
            f"    {r['start']}..{r['end']} along {r['seed']} dim {r['dim']}: chunks of "
            f"{r['chunk']} rows" for r in regions
        ]
        return lines
    stages: dict[int, list[dict]] = {}
    for r in regions:
        stages.setdefault(r["stage"], []).append(r)
    lines = [
        f"  chunking (AutoChunk): {len(stages)} stage(s), {ch.get('evaluations', 0)} "
        f"estimates, search {ch.get('search_seconds', 0):.2f} s"
    ]
    if ch.get("lower_bound"):
        lines.append(f"    lower bound (no chunking the search can build peaks lower): "
                     f"{ch['lower_bound']}")
    for i, rs in sorted(stages.items()):
        r = rs[0]
        copies = f" x {len(rs)} regions (repeated layers)" if len(rs) > 1 else ""
        was = r.get("refit_from_n_chunks")
        path = (
            f"re-fitted with the other stages in place; on the search path {was} chunks, "
            "estimate "
            if was
            else "estimate "
        )
        lines.append(
            f"    stage {i}: {r['start']}..{r['end']} along {r['seed']} dim {r['dim']}: "
            f"{r['n_chunks']} chunks of {r['chunk']} rows, {r['body_ops']} ops{copies}; {path}"
            f"{format_bytes(r['peak_before_bytes'])} -> {format_bytes(r['peak_after_bytes'])}"
        )
    if "predicted_overhead_us" in ch:
        lines.append(
            f"    predicted added run time {ch['predicted_overhead_us'] / 1e3:.2f} ms: calls and "
            f"re-reads, not cache effects (cost model: {ch.get('cost_model') or 'default'})"
        )
    if ch.get("fallback"):
        lines.append(f"    fallback: {ch['fallback']}")
    lines += [f"    note: {n}" for n in ch.get("notes") or ()]
    return lines


def format_lengths(extra: dict) -> list[str]:
    """A symbolic length's lines: the unchunked entry for short lengths, and the estimated peak
    at a few lengths (``AutochunkPipeline._length_table``)."""
    lines = []
    short = extra.get("short_entry")
    if short:
        lines.append(
            f"  {short['dim']} <= {short['bound']} runs '{short['function']}', unchunked (TVM's "
            f"plan {format_bytes(short['planned_peak_bytes'])}); longer runs chunked"
        )
    if extra.get("lengths"):
        lines.append("  peak by length (estimated; storage TVM plans at a bound counted whole):")
        lines += [
            f"    {r['dim']}={r['length']:<8} {format_bytes(r['estimated_peak_bytes']):>12}   "
            f"{r['function']}" for r in extra["lengths"]
        ]
    return lines
