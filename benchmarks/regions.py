"""Hand-picked chunk regions for the model families: the attention around each softmax.

For every ``softmax`` binding, the region runs from just after the query-side tensor that feeds
the score matmul to the matmul that applies the probabilities (``softmax(q k^T) v``), and is
chunked along the query rows: the seed dim whose chunking makes the softmax's row dim chunked.
Used by the tests and benchmarks of issue 3 (the automatic search is issue 4's job).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import relax

from relay_passes import _compat as C
from relay_passes.chunk_region import analyze_region

_PASS_THROUGH = {
    "relax.reshape",
    "relax.broadcast_to",
    "relax.multiply",
    "relax.add",
    "relax.permute_dims",
    "relax.astype",
}


@dataclass(frozen=True)
class Region:
    start: str
    end: str
    seed: str
    dim: int
    extent: int


def _bindings(mod, function="main"):
    out = []
    for block in mod[function].body.blocks:
        out.extend(block.bindings)
    return out


def attention_regions(mod, function: str = "main") -> list[Region]:
    bs = _bindings(mod, function)
    index = {b.var: i for i, b in enumerate(bs)}
    users: dict = {}
    for b in bs:
        for v in relax.analysis.free_vars(b.value):
            users.setdefault(v, []).append(b)
    regions = []
    for i, b in enumerate(bs):
        if C.op_name(b.value) != "relax.nn.softmax":
            continue
        # back to the score matmul
        cur = b.value.args[0]
        m1 = None
        for _ in range(8):
            if cur not in index:
                break
            pb = bs[index[cur]]
            if C.op_name(pb.value) == "relax.matmul":
                m1 = pb
                break
            cur = pb.value.args[0]
        if m1 is None:
            continue
        # forward to the matmul that consumes the probabilities
        m2, frontier = None, [b.var]
        for _ in range(16):
            nxt = []
            for v in frontier:
                for ub in users.get(v, []):
                    if C.op_name(ub.value) == "relax.matmul":
                        m2 = ub
                        break
                    nxt.append(ub.var)
                if m2 is not None:
                    break
            if m2 is not None or not nxt:
                break
            frontier = nxt
        if m2 is None:
            continue
        # the query side: walk back through shape-only / scaling ops
        seed = m1.value.args[0]
        while seed in index and C.op_name(bs[index[seed]].value) in _PASS_THROUGH:
            prev = bs[index[seed]].value.args[0]
            if prev not in index:
                break
            seed = prev
        if seed not in index:
            continue
        start = str(bs[index[seed] + 1].var.name)
        end = str(m2.var.name)
        # prefer chunking the query rows (dim -2 of the scores); else any legal dim that
        # chunks the softmax (e.g. Evoformer's starting-node dim i)
        rows = len(C.tensor_shape(b.var.ty)) - 2
        best = None
        for d in range(len(C.tensor_shape(seed.ty))):
            ra = analyze_region(mod, start, end, str(seed.name), d, function=function)
            spec = {s.name: s for s in ra.specs}.get(str(b.var.name)) if ra.legal else None
            if spec is None:
                continue
            rank = (spec.dim == rows, ra.extent)
            if best is None or rank > best[0]:
                best = (rank, Region(start, end, str(seed.name), d, ra.extent))
        if best is not None:
            regions.append(best[1])
    return regions
