"""Candidate regions for AutoChunk: legal (region, seed, dim) around the hottest bindings.

Analysis only: reads the module through ``chunk_region.analyze_region`` and the function
index, and returns ``search.Candidate`` records (plain data) for the stage search. A region
is grown to its longest legal end around a hot binding, also tried at the end that leaves
the fewest bytes live after it; the same region in repeated layers is found by matching op
sequences (``with_copies``), and a region that runs past a layer's end by its prefix with
the most copies (``layer_prefix``).
"""

from __future__ import annotations

import dataclasses
import math

from tvm import relax

from . import _compat as C
from .chunk_region import RegionAnalysis, analyze_region
from .ir_index import block_layout, func_index, reads_by_block, tensor_leaves
from .search import Candidate, SearchOptions


def layer_prefix(
    mod, cand: Candidate, function: str = "main", more_than: int = 0
) -> Candidate | None:
    """The prefix of ``cand``'s region with the most copies, more than ``more_than`` (see
    ``with_copies``; pass the number ``cand`` itself has), with its copies; else None. Of
    prefixes with as many copies, the longest.

    A region that runs past the end of a repeated layer (into the next layer's row-local
    prefix: its LayerNorm, its q/k/v projection) has no copy in the last layer, and chunking
    some of several equal layers cannot lower their common peak. The prefix must keep at
    least half of the region (a layer boundary, not a short motif that happens to repeat).
    """
    func = mod[function]
    layout = block_layout(func, cand.start)
    if layout is None or cand.end not in layout[0]:
        return None
    names, keys = layout
    j, e = names.index(cand.start), names.index(cand.end)
    # the most repeats first (every layer), then the longest; at least half the region
    reps = {e2: _repeats(keys, j, e2) for e2 in range(j + (e - j) // 2, e)}  # op keys only
    best = None
    for e2 in sorted(reps, key=lambda x: (-reps[x], -x)):
        have = len(best.copies) if best is not None else more_than
        if reps[e2] <= have:
            break  # no shorter prefix can have more copies
        ra = analyze_region(mod, cand.start, names[e2], cand.seed, cand.dim, function=function)
        if not ra.legal:
            continue
        # a same-op copy may still differ (e.g. the last layer's outputs): count real ones
        shorter = with_copies(mod, candidate_of(ra, func), function)
        if len(shorter.copies) > have:
            best = shorter
    return best


def _repeats(keys: list[str], j: int, e: int) -> int:
    """How many disjoint copies of ``keys[j..e]`` the block has besides itself."""
    pat, n = keys[j : e + 1], e - j + 1
    first = pat[0]
    count, k = 0, 1
    while k + n <= len(keys):
        if keys[k] == first and (k + n - 1 < j or k > e) and keys[k : k + n] == pat:
            count += 1
            k += n
        else:
            k += 1
    return count


def with_copies(mod, cand: Candidate, function: str = "main") -> Candidate:
    """``cand`` plus the identical regions elsewhere in the function (repeated layers).

    A copy has the same op sequence, its seed is the binding just before it (as for ``cand``),
    and it is legal along the same dim with the same extent, ops and bytes. Copies do not
    overlap ``cand`` or each other. Without any, ``cand`` is returned unchanged.
    """
    func = mod[function]
    layout = block_layout(func, cand.start)
    if layout is None or cand.end not in layout[0]:
        return cand
    names, keys = layout
    j, e = names.index(cand.start), names.index(cand.end)
    if j == 0 or names[j - 1] != cand.seed:
        return cand  # seeded by a parameter or from further back: not a layer pattern
    pat, n = keys[j : e + 1], e - j + 1
    sig = (cand.extent, cand.granularity, cand.body_ops, cand.body_bytes, cand.out_bytes)
    copies: list[tuple[str, str, str]] = []
    k = 1
    while k + n <= len(names):
        if (k + n - 1 < j or k > e) and keys[k : k + n] == pat:  # disjoint, same ops
            ra = analyze_region(
                mod, names[k], names[k + n - 1], names[k - 1], cand.dim, function=function
            )
            if ra.legal:
                c2 = candidate_of(ra, func)
                if (c2.extent, c2.granularity, c2.body_ops, c2.body_bytes, c2.out_bytes) == sig:
                    copies.append((names[k], names[k + n - 1], names[k - 1]))
                    k += n
                    continue
        k += 1
    return dataclasses.replace(cand, copies=tuple(copies)) if copies else cand


def shorter_copy(
    mod, cand: Candidate, best: Candidate, fit, opts, function: str, *, over: bool = False
) -> bool:
    """Whether ``cand`` is ``best``'s region started later (same end, extent and copies) and
    would cost less than ``opts.beat_min_saving`` less than ``best`` at its fitted chunk; or,
    ``over`` (the best misses the budget: candidates are compared by peak, not cost), started
    later at all.

    Such a region computes fewer of the same bindings per chunk; the ones it leaves out run
    whole before the loop, and their full-size result is its seed, live through the loop: it
    typically needs as much memory or more (as many chunks or more), and it saves only those
    few ops per chunk. The estimate that would tell (a quarter to a third of a one-stage
    search) is not worth that. Ties of this kind are common: two seeds a LayerNorm apart
    (docs/design.md "Search details").
    """
    if opts.beat_min_saving <= 0 or cand.function != best.function or cand.end != best.end:
        return False
    if (cand.extent, cand.granularity, len(cand.copies)) != (
        best.extent,
        best.granularity,
        len(best.copies),
    ):
        return False
    layout = block_layout(mod[function], best.start)
    if layout is None or cand.start not in layout[0]:
        return False
    names = layout[0]
    if not names.index(best.start) < names.index(cand.start) <= names.index(best.end):
        return False
    return over or cand.cost(fit.chunk, opts) >= (1 - opts.beat_min_saving) * fit.cost


def enumerate_candidates(
    mod, hot: list[str], opts: SearchOptions, function: str = "main", reasons=None
) -> list[Candidate]:
    """Legal (region, seed, dim) candidates whose body contains one of the ``hot`` bindings."""
    func = mod[function]
    ix = func_index(func)  # names, bindings and reads, read through the FFI once per function
    seen: set = set()
    out: list[Candidate] = []
    last_use: dict[int, list[int]] = {}
    for name in hot:
        for bi, bs in enumerate(ix.blocks):
            names = ix.names[bi]
            if name not in ix.position[bi]:
                continue
            ip = names.index(name)  # the first binding of that name (position: the last)
            if not isinstance(bs[ip].value, C.Call) or not isinstance(bs[ip].value.op, C.Op):
                continue  # a call of a chunk function: already chunked
            lo = max(0, ip - opts.window_before)
            hi = min(len(bs) - 1, ip + opts.window_after)
            for j in range(lo, ip + 1):
                if j == 0:
                    seeds = [p for p in func.params if isinstance(p.ty, C.TensorType)]
                else:
                    sv = ix.vars[bi][j - 1]
                    seeds = [sv] if isinstance(sv.ty, C.TensorType) else []
                for sv in seeds:
                    shape = C.tensor_shape(sv.ty) or []
                    for d, n in enumerate(shape):
                        if not isinstance(n, int) or n < opts.min_extent:
                            continue
                        key = (names[j], str(sv.name), d)
                        if key in seen:
                            continue
                        seen.add(key)  # tried once, for the first hot binding near it
                        ra = _longest_legal(
                            mod, names, j, ip, hi, str(sv.name), d, function, reasons
                        )
                        if ra is None or name not in ra.body:
                            continue
                        out.append(candidate_of(ra, func))
                        # the end in [hot .. longest] leaving the fewest bytes live after the
                        # region: every output is a whole tensor kept through the chunk loop
                        if bi not in last_use:
                            last_use[bi] = _last_uses(func, bi)
                        e = _min_output_end(bs, last_use[bi], j, ip, names.index(ra.end))
                        if e != names.index(ra.end):
                            ra2 = analyze_region(
                                mod, names[j], names[e], str(sv.name), d, function=function
                            )
                            if ra2.legal and name in ra2.body:
                                out.append(candidate_of(ra2, func))
    return out


def _last_uses(func: relax.Function, bi: int) -> list[int]:
    """For each binding of block ``bi``, the index of its last reader in the block (the block's
    length if the value is read after the block or returned)."""
    blocks, ret = reads_by_block(func)
    bs = blocks[bi]
    index = {v: i for i, (v, _) in enumerate(bs)}
    last = [-1] * len(bs)
    for i, (_, reads) in enumerate(bs):
        for v in reads:
            k = index.get(v)
            if k is not None:
                last[k] = max(last[k], i)
    outside = set(ret)
    for bj, blk in enumerate(blocks):
        if bj != bi:
            for _, reads in blk:
                outside.update(reads)
    for v, k in index.items():
        if v in outside or not isinstance(v, relax.DataflowVar):
            last[k] = len(bs)  # returned, read by another block, or a block output
    return last


def _min_output_end(bs: list, last: list[int], j: int, lo: int, hi: int) -> int:
    """The end e in [lo, hi] minimising the bytes of bindings in [j, e] read after e (ties: the
    longest region)."""
    sizes = {i: C.static_nbytes(bs[i].var.ty) for i in range(j, hi + 1)}
    best, best_e = None, hi
    for e in range(hi, lo - 1, -1):
        live = sum(sizes[i] for i in range(j, e + 1) if last[i] > e)
        if best is None or live < best:
            best, best_e = live, e
    return best_e


def candidate_of(ra: RegionAnalysis, func: relax.Function) -> Candidate:
    named = func_index(func).var_by_name  # read once per function (not a type per binding here)

    def nbytes(name: str) -> int:
        v = named.get(name)
        return C.static_nbytes(v.ty if v is not None else None)

    gran = 1
    for s in ra.specs:
        gran = gran * s.scale.denominator // math.gcd(gran, s.scale.denominator)
    return Candidate(
        function=ra.function,
        start=ra.start,
        end=ra.end,
        seed=ra.seed.name,
        dim=ra.seed.dim,
        extent=ra.extent,
        granularity=gran,
        body_ops=len(ra.body),
        body_bytes=sum(nbytes(s.name) for s in ra.specs[1:]),
        out_bytes=sum(nbytes(o.name) for o in ra.outputs),
        reread_bytes=reread_bytes(ra, func),
    )


def reread_bytes(ra: RegionAnalysis, func: relax.Function) -> int:
    """Bytes of the tensors that every chunk of ``ra`` reads whole: arguments of its body
    defined outside the body (hoisted bindings, earlier bindings, parameters, constants) that
    are neither the seed nor sliced per chunk. Each counted once."""
    ix = func_index(func)
    body = set(ra.body)
    sliced = {(s.binding, s.arg) for s in ra.slices}
    seen: set = set()
    total = 0
    for name in ra.body:
        for i, arg in enumerate(ix.facts[ix.var_by_name[name]].args):
            if (name, i) in sliced:
                continue
            for a in tensor_leaves(arg):  # vars and constants, tuples flattened
                if isinstance(a, relax.Var):
                    key = str(a.name)
                    if key in body or key == ra.seed.name:
                        continue
                else:
                    key = a.__chandle__()
                if key not in seen:
                    seen.add(key)
                    total += C.static_nbytes(a.ty)
    return total


def _longest_legal(mod, names, j, ip, hi, seed, d, function, reasons=None) -> RegionAnalysis | None:
    """The legal region [names[j] .. e] with the largest e in [ip, hi], or None."""
    e = hi
    for _ in range(6):
        if e < ip:
            return None
        ra = analyze_region(mod, names[j], names[e], seed, d, function=function)
        if ra.legal:
            return ra
        if reasons is not None and ra.failed_at in names and names.index(ra.failed_at) <= ip:
            reasons.append(ra.reason)  # what stops a region from covering the hot binding
        if ra.failed_at in names and names.index(ra.failed_at) > ip:
            e = names.index(ra.failed_at) - 1  # end just before the binding that broke it
        elif not ra.failed_at:
            e -= 1  # a problem with the region's end (e.g. a tuple output): end earlier
        else:
            return None
    return None
