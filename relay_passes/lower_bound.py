"""The smallest peak any chunking the search can build could reach: an analysis, plain data.

A chunking is a set of disjoint regions, as the search builds them: a run of at most
``window_before + window_after`` bindings of one block, seeded by a tensor live at its start
(the search seeds with the binding before it, but its rewrites reorder bindings), legal by
the dim-flow walk (``chunk_region.walk_reach``; the checks at a region's end are left out,
which only lowers the bound). While binding ``i`` runs, the memory held is at least:

* outside every region: every tensor live at ``i``, whole;
* inside region ``[s..e]`` (its loop is one moment seen from outside): the tensors live
  through it, whole; the larger of the inputs that die in it and its outputs (an output may be
  written over a dying input); the tensors it hoists, except chains it may compute per chunk
  (``_sinkable``) and those computed from no parameter (a mask chain); and one slice of its
  largest per-chunk tensor.

The bound is the largest over ``i`` of the least of these. A view (``reshape`` and kin, a
tuple field) is its source's storage; a tensor that the target's lowering removes (fused
attention's scores on llvm, FuseOps' intermediates on GPUs) weighs nothing. Each choice errs
low, so the bound stays a bound; the search's floor above it shows what the search misses.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

from . import _compat as C
from . import caches
from .chunk_region import walk_reach
from .dimflow import get_dim_rule
from .ir_index import func_index
from .lowering import as_target, estimate_passes
from .plan import format_bytes
from .search import SearchOptions

_VIEWS = ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten")


@dataclass(frozen=True)
class Held:
    """A whole tensor at the bound's point."""

    name: str
    nbytes: int
    shape: tuple
    dtype: str


@dataclass(frozen=True)
class LowerBound:
    """``nbytes``: no chunking the search can build peaks lower. It is reached while binding
    ``at`` runs, inside ``region`` (``"start..end"`` along dim ``dim`` of ``seed``; empty when
    no region lowers that point), where ``held`` are whole, largest first."""

    nbytes: int
    at: str
    held: tuple[Held, ...] = ()
    region: str = ""
    seed: str = ""
    dim: int = -1

    def describe(self, n: int = 3) -> str:
        shown = ", ".join(f"'{h.name}' {format_bytes(h.nbytes)}" for h in self.held[:n])
        more = f" and {len(self.held) - n} more" if len(self.held) > n else ""
        where = (
            f"chunking {self.region} along dim {self.dim} of '{self.seed}'"
            if self.region else "unchunked"
        )
        whole = f"; whole there: {shown}{more}" if shown else ""
        return f"{format_bytes(self.nbytes)}, at '{self.at}' ({where}{whole})"


def _kept_names(mod, target, function: str) -> set[str] | None:
    """Names of ``function``'s bindings that the target's lowering keeps (None: unknown)."""
    try:
        lowered = tvm.transform.Sequential(estimate_passes(as_target(target)))(mod)
    except Exception:  # the build's own lowering of this module fails first, with the
        return None  # reason; here every tensor counts
    func = lowered[function]
    return {str(b.var.name) for blk in func.body.blocks for b in blk.bindings}


def _keeps_layout(call, f) -> bool:
    """A ``permute_dims`` that moves only size-1 dims: the same bytes in the same order, which
    TVM's ``RewriteDataflowReshape`` makes a view."""
    shape = f.arg_shapes[0] if f.arg_shapes else None
    if shape is None:
        return False
    axes = list(range(len(shape)))[::-1] if call.attrs.axes is None else [
        int(a) for a in call.attrs.axes
    ]
    kept = [a for a in axes if shape[a] != 1]
    return kept == sorted(kept)


class _Block:
    """One block's storages: a root binding (not a view) and the views of it share one."""

    def __init__(self, ix, bi: int, kept: set[str] | None, params: set) -> None:
        vs, n = ix.vars[bi], len(ix.vars[bi])
        self.n = n
        pos = {v: k for k, v in enumerate(vs)}
        root: dict = {}
        fields: dict = {}  # a Tuple binding's var -> the roots of its fields
        last = ix.last_read()
        self.nbytes: dict = {}
        self.define: dict = {}  # root -> position (-1: defined before the block)
        self.lastuse: dict = {}
        self.free: set = set()  # roots computed from no parameter
        dep = set(params)
        reads = ix.reads[bi]

        def roots_of(v) -> list:
            if v in fields:
                return [r for rs in fields[v] for r in rs]
            r = root.get(v)
            if r is None and v not in params and v not in pos and isinstance(v.ty, C.TensorType):
                r = root[v] = v  # from an earlier block: whole from the block's start
                self.define[v], self.lastuse[v] = -1, -1
                self.nbytes[v] = C.static_nbytes(v.ty)
            return [r] if r is not None else []

        for k, v in enumerate(vs):
            f = ix.facts[v]
            rv = reads[k][1]
            if any(r in dep for r in rv):
                dep.add(v)
            src = None
            if f.kind in ("alias", "match_cast", "other"):
                val = ix.blocks[bi][k].value
                if isinstance(val, relax.Tuple):
                    fields[v] = [
                        roots_of(ix.var(x)) if isinstance(x, relax.Var) else []
                        for x in val.fields
                    ]
                    continue
                if len(rv) != 1:
                    continue  # a constant, a shape: no storage of the function's
                src = rv[0]
                if isinstance(val, relax.TupleGetItem) and src in fields:
                    got = fields[src][val.index] if val.index < len(fields[src]) else []
                    if len(got) == 1:
                        root[v] = got[0]
                    continue
            elif f.kind == "call" and f.op in _VIEWS and f.arg_kind[:1] == (1,):
                src = f.args[0]
            elif f.op == "relax.broadcast_to" and f.arg_shapes[:1] == f.out_shapes[:1]:
                src = f.args[0]
            elif f.op == "relax.permute_dims" and _keeps_layout(ix.blocks[bi][k].value, f):
                src = f.args[0]
            if src is not None:
                rs = roots_of(src)
                if len(rs) == 1:
                    root[v] = rs[0]
                    continue
                if not rs:
                    continue  # a view of a parameter (or of nothing stored) holds no storage
            root[v] = v
            self.define[v], self.lastuse[v] = k, k
            leaves = C.tensor_type_leaves(v.ty)
            vanished = kept is not None and f.name not in kept
            self.nbytes[v] = 0 if vanished else sum(C.static_nbytes(t) for t in leaves)
        for v in self.define:
            if v not in dep and self.define[v] >= 0:
                self.free.add(v)
        # a storage lives to the last read of any of its views (the block's end when read
        # after it, returned, or a block output)
        for v in list(pos) + [x for x in root if x not in pos]:
            lr = last.get(v)
            end = (n if lr[0] > bi else lr[1]) if lr is not None else -1
            if v in pos and not isinstance(v, relax.DataflowVar):
                end = n
            for r in roots_of(v):
                self.lastuse[r] = max(self.lastuse[r], end)
        self.roots = [r for r in self.define if self.nbytes[r]]
        self.root = root


def _slice(v, spec) -> int:
    """Bytes of one slice of ``v`` along its chunked dim(s); its whole bytes for whole fields."""
    specs = spec if isinstance(spec, tuple) and spec and not isinstance(spec[0], int) else (spec,)
    total = 0
    for t, s in zip(C.tensor_type_leaves(v.ty), specs):
        shape, nb = C.static_shape(t), C.static_nbytes(t)
        total += nb if s is None or not shape or not shape[s[0]] else nb // shape[s[0]]
    return total


def _sinkable(ix, bi: int, s: int, length: int, spec: dict, slices) -> set:
    """Hoisted variables of the walk that the rewrite may compute per chunk instead
    (``chunk_region._sink_sliced``): read sliced, and computable from slices of their own
    arguments by their dim-flow rule (recursively). Whether every reader reads them sliced is
    not checked: that errs low."""
    facts, sunk = ix.facts, {}

    def hoisted(v) -> bool:
        return isinstance(v, relax.Var) and v in spec and spec[v] is None

    def sink(var, dim: int) -> None:
        if var in sunk:
            return
        fb = facts[var]
        if fb.kind != "call" or not fb.is_tensor:
            return
        srcs = ()
        if fb.op != "relax.arange":
            rule = get_dim_rule(fb.op) if fb.op else None
            flow = fb.flow(rule, ix.by_name[fb.name].value) if rule is not None else None
            if flow is None or dim >= len(flow.outputs[0]):
                return
            srcs = flow.outputs[0][dim]
            if any((x.arg, x.dim) in flow.reduced for x in srcs) or (not srcs and flow.reduced):
                return
        sunk[var] = dim
        for x in srcs:
            if hoisted(fb.args[x.arg]):
                sink(fb.args[x.arg], x.dim)

    for a in slices:
        arg = facts[ix.var_by_name[a.binding]].args[a.arg]
        if hoisted(arg):
            sink(arg, a.dim)
    return set(sunk)


def _region_costs(blk: _Block, s: int, length: int, spec: dict, sink: set) -> list[int]:
    """Cost of regions ``[s .. s+k]`` for k < ``length`` (see the module docstring);
    ``sink``: hoisted tensors that weigh nothing once their last reader is in the region."""
    nb, define, lastuse = blk.nbytes, blk.define, blk.lastuse
    live_through = 0  # defined before s, read after the region's end
    dying = 0
    leaves_at: dict = {}  # position -> bytes of incoming tensors last read there
    for r in blk.roots:
        if define[r] < s <= lastuse[r]:
            live_through += nb[r]
            leaves_at[lastuse[r]] = leaves_at.get(lastuse[r], 0) + nb[r]
    by_pos = {}
    for r in blk.roots:
        if s <= define[r] < s + length:
            by_pos.setdefault(define[r], []).append(r)
    outs = hoisted = inner = 0
    done_at: dict = {}  # position -> [(bytes, slice)] of outputs that end there
    costs = []
    for e in range(s, s + length):
        moved = leaves_at.get(e, 0)
        live_through -= moved
        dying += moved
        for r in by_pos.get(e, ()):
            sp = spec.get(r)
            if sp is None:
                if r not in blk.free:
                    hoisted += nb[r]
                    if r in sink:
                        done_at.setdefault(lastuse[r], []).append((nb[r], 0, True))
            elif lastuse[r] <= e:
                inner = max(inner, _slice(r, sp))
            else:
                outs += nb[r]
                done_at.setdefault(lastuse[r], []).append((nb[r], _slice(r, sp), False))
        for b, sl, was_hoisted in done_at.pop(e, ()):
            if was_hoisted:
                hoisted -= b
            else:
                outs -= b
            inner = max(inner, sl)
        costs.append(live_through + max(dying, outs) + hoisted + inner)
    return costs


def _live_in(ix, bi: int, params: set) -> list[list]:
    """Per binding of block ``bi``, the tensors defined before it and read at it or later:
    the seeds a region starting there may have. The search seeds a region with the binding
    before it, but its rewrites reorder bindings (a chunk loop's outputs come right before
    what follows it), so any live tensor can end up there."""
    n, last = len(ix.vars[bi]), ix.last_read()
    cands = [(v, -1) for v in params]
    cands += [(v, k) for k, v in enumerate(ix.vars[bi])]
    out: list[list] = [[] for _ in range(n)]
    for v, k in cands:
        if not isinstance(v.ty, C.TensorType):
            continue
        lr = last.get(v)
        if lr is None or lr[0] < bi:
            continue
        end = n - 1 if lr[0] > bi else lr[1]
        for s in range(k + 1, end + 1):
            out[s].append(v)
    return out


@caches.scoped
def lower_bound(
    mod: tvm.IRModule, target="llvm", *, function: str = "main", options=None
) -> LowerBound:
    """The smallest peak any chunking of ``mod[function]`` that the search can build could
    reach (see the module docstring). ``mod`` is the module the search chunks (symbolic dims
    bound: ``dynamic_chunk.specialize``)."""
    opts = options or SearchOptions()
    func = mod[function]
    ix = func_index(func)
    kept = _kept_names(mod, target, function)
    params = {ix.var(p) for p in func.params}
    window = opts.window_before + opts.window_after
    best: tuple = (0, "", None)  # (bytes, binding name, (block, s, e, seed, dim) | None)
    for bi in range(len(ix.blocks)):
        blk = _Block(ix, bi, kept, params)
        n = blk.n
        if n == 0:
            continue
        plain = [0] * (n + 1)
        for r in blk.roots:
            lo, hi = max(0, blk.define[r]), min(n - 1, blk.lastuse[r])
            if lo <= hi:
                plain[lo] += blk.nbytes[r]
                plain[hi + 1] -= blk.nbytes[r]
        for i in range(1, n):
            plain[i] += plain[i - 1]
        at = [(plain[i], None) for i in range(n)]  # the least cost at each binding
        live_in = _live_in(ix, bi, params)
        for s in range(n):
            for sv in live_in[s]:
                shape = C.static_shape(sv.ty) if isinstance(sv.ty, C.TensorType) else None
                for d, ext in enumerate(shape or ()):
                    if ext < opts.min_extent:
                        continue
                    length, spec, slices = walk_reach(ix, bi, s, sv, d, window)
                    if not length:
                        continue
                    sink = _sinkable(ix, bi, s, length, spec, slices)
                    costs = _region_costs(blk, s, length, spec, sink)
                    low, arg = None, None  # suffix minimum: the best region over s..i
                    for k in range(length - 1, -1, -1):
                        if low is None or costs[k] < low:
                            low, arg = costs[k], k
                        i = s + k
                        if low < at[i][0]:
                            at[i] = (low, (s, s + arg, sv, d))
        i = max(range(n), key=lambda k: at[k][0])
        if at[i][0] > best[0]:
            best = (at[i][0], ix.names[bi][i], (bi, blk, i, at[i][1]))
    if best[2] is None:
        return LowerBound(0, "")
    return _explain(ix, best)


def _explain(ix, best) -> LowerBound:
    nbytes, at, (bi, blk, i, region) = best
    if region is None:
        held = [r for r in blk.roots if blk.define[r] <= i <= blk.lastuse[r]]
        return LowerBound(nbytes, at, _held(blk, held))
    s, e, sv, d = region
    _, spec, slices = walk_reach(ix, bi, s, sv, d, e - s + 1)
    sink = _sinkable(ix, bi, s, e - s + 1, spec, slices)
    through, dying, outs, hoisted = [], [], [], []
    for r in blk.roots:
        df, lu = blk.define[r], blk.lastuse[r]
        if df < s <= lu:
            (through if lu > e else dying).append(r)
        elif s <= df <= e:
            if spec.get(r) is None:
                if r not in blk.free and not (r in sink and lu <= e):
                    hoisted.append(r)
            elif lu > e:
                outs.append(r)
    size = lambda rs: sum(blk.nbytes[r] for r in rs)  # noqa: E731
    whole = through + hoisted + (dying if size(dying) >= size(outs) else outs)
    names = ix.names[bi]
    return LowerBound(
        nbytes, at, _held(blk, whole), f"{names[s]}..{names[e]}", str(sv.name), d
    )


def _held(blk: _Block, roots: list) -> tuple[Held, ...]:
    out = []
    for r in sorted(roots, key=lambda r: -blk.nbytes[r]):
        shape = C.static_shape(r.ty) if isinstance(r.ty, C.TensorType) else None
        dtype = str(r.ty.dtype) if isinstance(r.ty, C.TensorType) else "tuple"
        out.append(Held(str(r.name), blk.nbytes[r], tuple(shape or ()), dtype))
    return tuple(out)
