"""Chunk regions: which dims a contiguous run of bindings can be computed chunk by chunk along.

Analysis only. A *region* is a contiguous run of bindings ``[start .. end]`` in one dataflow
block of a Relax function. Chunking it along dim ``d`` of a region input ``x`` (the *seed*)
means: slice ``x`` along ``d`` into ``[off, off+C)``, run the region's bindings on the slice, and
write each region output's slice into a full-size output. That is correct when, following the
dim-flow rules (``dimflow.py``) forward from the seed,

* every binding that reads a chunked tensor has a rule, does not reduce/contract the chunked
  dim, and maps it to exactly one dim of each of its outputs (consistently across its args);
* every region output that depends on the seed carries the chunked dim;
* nothing impure is inside the region.

Bindings that do not depend on the seed are *hoisted* before the loop (e.g. K/V projections
when chunking attention over queries). Tensors defined outside the region are passed whole,
and sliced inside a chunk only where a chunked computation reads them along the chunked dim.
The result is a frozen ``RegionAnalysis`` with the reason when the dim is illegal.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from tvm import relax

from . import _compat as C
from . import (
    caches,
    dimflow_rules,  # noqa: F401  (registers the built-in rules)
)
from .dimflow import ONE, get_dim_rule
from .errors import PassContractError
from .ir_index import FuncIndex, func_index, named_vars, used_after


@dataclass(frozen=True)
class TensorChunk:
    """Tensor ``name`` is chunked along ``dim``; its chunk extent is ``chunk * scale``."""

    name: str
    dim: int
    scale: Fraction = Fraction(1)


@dataclass(frozen=True)
class ArgSlice:
    """In binding ``binding``, argument leaf ``arg`` (``dimflow.arg_leaves``: concat's operands
    are leaves of its one tuple argument), defined outside the chunk, is sliced."""

    binding: str
    arg: int
    dim: int
    scale: Fraction


@dataclass(frozen=True)
class RegionAnalysis:
    function: str
    start: str
    end: str
    seed: TensorChunk
    extent: int  # size of the seed's chunked dim: the loop runs over [0, extent)
    legal: bool
    reason: str
    body: tuple[str, ...] = ()  # bindings computed per chunk, in order
    hoisted: tuple[str, ...] = ()  # region bindings independent of the seed
    outputs: tuple[TensorChunk, ...] = ()  # chunked region outputs (used after the region)
    specs: tuple[TensorChunk, ...] = ()  # every chunked tensor leaf, incl. the seed
    slices: tuple[ArgSlice, ...] = ()  # outside tensors sliced where a chunk reads them
    failed_at: str = ""  # the binding that made the dim illegal (empty when legal)

    def chunk_extent(self, name: str, chunk: int) -> int:
        for s in self.specs:
            if s.name == name:
                ext = chunk * s.scale
                if ext.denominator != 1:
                    raise PassContractError(
                        f"chunk {chunk} does not divide evenly into tensor '{name}' (scale "
                        f"{s.scale}); use a multiple of {s.scale.denominator}"
                    )
                return int(ext)
        raise KeyError(name)


def region_bindings(func: relax.Function, start: str, end: str):
    """(block index, list of bindings) of the region; errors name what is wrong."""
    ix = func_index(func)
    for bi, names in enumerate(ix.names):
        i = ix.position[bi].get(start)
        if i is not None:
            j = ix.position[bi].get(end)
            if j is None:
                raise PassContractError(
                    f"region end '{end}' is not in the same binding block as start '{start}'"
                )
            if j < i:
                raise PassContractError(f"region end '{end}' comes before start '{start}'")
            return bi, list(ix.blocks[bi][i : j + 1])
    raise PassContractError(f"no binding named '{start}' in the function")


def _scaled(a: Fraction, b: Fraction) -> Fraction:
    """``a * b``; most scales are 1 (``dimflow.ONE``), and Fraction arithmetic is slow (a
    third of the region analyses' time went into it)."""
    return a if b is ONE else b if a is ONE else a * b


def _per(a: Fraction, b: Fraction) -> Fraction:
    """``a / b`` (see ``_scaled``)."""
    return a if b is ONE else a / b


class _Walk:
    """The forward dim-flow walk of regions from one start, seed and dim, kept per function.

    Each binding's outcome depends only on the bindings before it (SSA order), not on where
    the region ends, so every region ``[start .. end]`` with this seed is a prefix of one
    walk: ``analyze_region`` extends the walk up to ``end`` (or to the binding that makes
    the dim illegal) once, and a shorter region reuses it (``_longest_legal`` and
    ``layer_prefix`` try several ends of one start).
    """

    def __init__(self, ix: FuncIndex, bi: int, i0: int, seed_var, dim: int) -> None:
        self.ix = ix
        self.bindings = ix.blocks[bi]
        self.vars = ix.vars[bi]
        self.i0 = i0
        # spec: var -> chunk spec per tensor leaf: (dim, scale) | None (whole); tuples -> tuple
        self.spec: dict = {seed_var: (dim, ONE)}
        self.body: list[str] = []
        self.hoisted: list[str] = []
        self.slices: list[ArgSlice] = []
        self.walked: set = set()  # vars of the bindings walked so far
        # after the k-th binding of the walk: (len(body), len(hoisted), len(slices))
        self.lengths: list[tuple[int, int, int]] = []
        self.failed: tuple[str, str] | None = None  # (binding name, reason)

    def spec_of(self, expr):
        if isinstance(expr, relax.Var):
            return self.spec.get(self.ix.var(expr))
        if isinstance(expr, relax.TupleGetItem):
            t = self.spec_of(expr.tuple_value)
            return t[expr.index] if isinstance(t, tuple) else None
        if isinstance(expr, relax.Tuple):
            fields = tuple(self.spec_of(f) for f in expr.fields)
            return fields if any(f is not None for f in fields) else None
        return None

    def extend(self, n: int) -> None:
        """Walk until ``n`` bindings are walked, or one fails."""
        while self.failed is None and len(self.lengths) < n:
            i = self.i0 + len(self.lengths)
            bv, b = self.vars[i], self.bindings[i]
            reason = self._step(bv, b)
            if reason is not None:
                self.failed = (self.ix.facts[bv].name, reason)
                return
            self.walked.add(bv)
            self.lengths.append((len(self.body), len(self.hoisted), len(self.slices)))

    def _step(self, bv, b) -> str | None:
        """Walk one binding; the reason when it makes the dim illegal."""
        spec, body, hoisted, slices = self.spec, self.body, self.hoisted, self.slices
        fb = self.ix.facts[bv]
        name, value = fb.name, b.value
        kind = fb.kind
        if kind == "match_cast":
            return f"binding '{name}' is a match_cast (dynamic shape) inside the region"
        if kind == "alias":
            s = self.spec_of(value)
            spec[bv] = s
            (body if s is not None else hoisted).append(name)
            return None
        if kind != "call":
            spec[bv] = None
            hoisted.append(name)
            return None
        args = fb.args
        # arguments are canonical objects already: a variable's spec is one dict lookup
        arg_specs = [
            spec.get(a) if k == 1 else self.spec_of(a) if k == 2 else None
            for a, k in zip(args, fb.arg_kind)
        ]
        depends = any(s is not None for s in arg_specs)
        op = fb.op
        if not depends:
            if op is None or op.startswith("relax.call_") or not fb.is_op:
                return (
                    f"binding '{name}' calls {value.op} (not a pure Relax op) inside the "
                    "region; end the region before it"
                )
            spec[bv] = None
            hoisted.append(name)
            return None
        if op is None:
            return f"binding '{name}' calls a function ({value.op}); calls are barriers"
        rule = get_dim_rule(op)
        if rule is None:
            return f"binding '{name}' ({op}) has no dim-flow rule: it is a barrier"
        # a tensor's spec is (dim, scale); a tuple variable's is one entry per field
        if any(s is not None and not isinstance(s[-1], Fraction) for s in arg_specs):
            return (
                f"binding '{name}' ({op}) takes a chunked tuple variable; unsupported "
                "(only a tuple written inline in the call is opened into its fields)"
            )
        arg_shapes, out_shapes = fb.arg_shapes, fb.out_shapes
        if any(s is None for s in out_shapes):
            return f"binding '{name}' ({op}) has a dynamic output shape"
        flow = fb.flow(rule, value)
        if flow is None:
            return f"binding '{name}' ({op}) cannot be chunked with these attributes"
        out_spec: list = [None] * len(out_shapes)
        for i, s in enumerate(arg_specs):
            if s is None:
                continue
            d, sc = s
            if (i, d) in flow.reduced:
                return (
                    f"binding '{name}' ({op.removeprefix('relax.')}) reduces or mixes dim {d} of "
                    f"argument {i}: chunks would not be independent"
                )
            hit = False
            for o, dims in enumerate(flow.outputs):
                for j, srcs in enumerate(dims):
                    for src in srcs:
                        if src.arg == i and src.dim == d:
                            want = (j, _scaled(sc, src.scale))
                            if out_spec[o] not in (None, want):
                                return (
                                    f"binding '{name}' ({op}) maps the chunked dims of "
                                    "its arguments to different output dims"
                                )
                            out_spec[o] = want
                            hit = True
            if not hit:
                return (
                    f"binding '{name}' ({op.removeprefix('relax.')}) does not carry dim "
                    f"{d} of argument {i} to its output"
                )
        if any(s is None for s in out_spec):
            return (
                f"binding '{name}' ({op}) has an output that is not chunked although "
                "it reads chunked data"
            )
        # whole arguments read along the chunked output dim must be sliced too
        for i, s in enumerate(arg_specs):
            if s is not None or arg_shapes[i] is None:
                continue
            for o, dims in enumerate(flow.outputs):
                j, sc = out_spec[o]
                for src in dims[j]:
                    if src.arg == i:
                        if (i, src.dim) in flow.reduced:
                            return f"binding '{name}' reduces a dim it must slice"
                        a = args[i]
                        # in the region = walked already (a binding reads only earlier ones)
                        inside = isinstance(a, relax.Var) and a in self.walked
                        if inside and str(a.name) not in hoisted:
                            return f"binding '{name}' reads '{a.name}' whole along the chunk"
                        slices.append(ArgSlice(name, i, src.dim, _per(sc, src.scale)))
        spec[bv] = out_spec[0] if fb.is_tensor else tuple(out_spec)
        body.append(name)
        return None


def walk_reach(ix: FuncIndex, bi: int, i0: int, seed_var, dim: int, limit: int) -> tuple:
    """(n, spec, slices): regions from binding ``i0`` of block ``bi`` seeded along ``dim`` of
    ``seed_var`` stay legal through their first ``n`` bindings (at most ``limit``); ``spec``
    maps each variable walked to its chunk spec ((dim, scale), a tuple of those per field, or
    None: hoisted), and ``slices`` lists the whole arguments read sliced (``ArgSlice``).
    Shares the walks ``analyze_region`` keeps."""
    key = (bi, ix.names[bi][i0], seed_var, dim)
    walk = ix.walks.get(key)
    if walk is None:
        walk = ix.walks[key] = _Walk(ix, bi, i0, seed_var, dim)
    walk.extend(min(limit, len(ix.blocks[bi]) - i0))
    return min(limit, len(walk.lengths)), walk.spec, walk.slices


@caches.scoped
def analyze_region(
    mod, start: str, end: str, seed: str, dim: int, *, function: str = "main"
) -> RegionAnalysis:
    """Decide whether region ``[start..end]`` can be chunked along ``dim`` of tensor ``seed``."""
    func = mod[function]
    bi, bindings = region_bindings(func, start, end)
    ix = func_index(func)
    i0 = ix.position[bi][start]
    bvars = ix.vars[bi][i0 : i0 + len(bindings)]  # canonical objects: sets hit by identity
    region_vars = set(bvars)

    # the seed: a tensor defined before the region (a param or an earlier binding)
    seed_var = next((p for p in func.params if str(p.name) == seed), None)
    named = named_vars(func)
    if seed in named:
        seed_var = named[seed]
    if seed_var is not None:
        seed_var = ix.var(seed_var)
    sd = TensorChunk(seed, dim)
    extent = 0

    def fail(reason: str, at: str = "") -> RegionAnalysis:
        return RegionAnalysis(function, start, end, sd, extent, False, reason, failed_at=at)

    shape = None
    if seed_var is not None and seed_var not in region_vars:
        shape = C.static_shape(seed_var.ty)
    if shape is None:
        return fail(f"seed '{seed}' is not a statically shaped tensor defined before the region")
    if not 0 <= dim < len(shape):
        return fail(f"dim {dim} out of range for '{seed}' of shape {shape}")
    extent = shape[dim]

    key = (bi, start, seed_var, dim)
    walk = ix.walks.get(key)
    if walk is None:
        walk = ix.walks[key] = _Walk(ix, bi, i0, seed_var, dim)
    n = len(bindings)
    walk.extend(n)
    if len(walk.lengths) < n:
        return fail(walk.failed[1], walk.failed[0])
    nb, nh, ns = walk.lengths[n - 1]
    spec = dict(walk.spec)  # _sink_sliced edits these: the walk keeps its own
    body, hoisted, slices = walk.body[:nb], walk.hoisted[:nh], walk.slices[:ns]
    facts = ix.facts

    after = used_after(func, bi, region_vars, i0 + n - 1)
    reads = ix.read_dict(bi)
    slices = _sink_sliced(bindings, bvars, spec, hoisted, body, slices, after, reads, facts)
    outputs: list[TensorChunk] = []
    order = {v: i for i, v in enumerate(bvars)}
    for v in sorted(after, key=order.__getitem__):
        s = spec.get(v)
        if s is None:
            continue  # hoisted: computed before the loop
        if not isinstance(v.ty, C.TensorType):
            return fail(
                f"region output '{v.name}' is a tuple; end the region after its projections"
            )
        outputs.append(TensorChunk(str(v.name), s[0], s[1]))
    if not outputs:
        return fail(f"no region output depends on '{seed}' along dim {dim}")
    specs = [TensorChunk(seed, dim)]
    for bv in bvars:
        s = spec.get(bv)
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], Fraction):
            specs.append(TensorChunk(facts[bv].name, s[0], s[1]))
    return RegionAnalysis(
        function,
        start,
        end,
        sd,
        extent,
        True,
        "",
        tuple(body),
        tuple(hoisted),
        tuple(outputs),
        tuple(specs),
        tuple(slices),
    )


_ARANGE = "relax.arange"


def _sink_sliced(
    bindings, bvars, spec, hoisted, body, slices, used_after, reads, facts
) -> list[ArgSlice]:
    """Compute sliced hoisted tensors per chunk instead of whole before the loop.

    A hoisted binding whose result is only ever read *sliced along the chunked dim* (e.g. the
    causal mask built from ``arange``/``full``) is moved into the chunk and computed for the
    slice only, from slices of its own inputs (recursively). Work is unchanged (each chunk
    computes a different slice); the full-size tensor is never materialised. ``spec``,
    ``hoisted`` and ``body`` are updated in place; returns the remaining argument slices.
    ``bvars``: the bindings' vars as canonical objects (``FuncIndex``); ``reads``: {binding
    var: the vars its value reads}; ``facts``: {var: its ``BindingFacts``} (canonical arguments).
    """
    if not slices:
        return []  # nothing read sliced: nothing to sink (and body is in binding order)
    names = [str(v.name) for v in bvars]
    by_var = dict(zip(bvars, bindings))
    name_of = dict(zip(bvars, names))
    var_of = dict(zip(names, bvars))
    readers: dict = {}
    for v0, n0 in zip(bvars, names):
        for v in reads[v0]:
            readers.setdefault(v, []).append(n0)
    moved: set[str] = set()
    slices = list(slices)

    def arg_of(s: ArgSlice):
        return facts[var_of[s.binding]].args[s.arg]

    def sliced_only(var, dim, scale) -> bool:
        if var in used_after:
            return False
        for r in readers.get(var, []):
            if r in moved:
                continue
            uses = [s for s in slices if s.binding == r]
            idx = [i for i, a in enumerate(facts[var_of[r]].args) if a is var]
            if not idx or any(
                not any(u.arg == i and u.dim == dim and u.scale == scale for u in uses) for i in idx
            ):
                return False
        return True

    def sink(var, dim, scale) -> bool:
        b = by_var.get(var)
        if b is None or name_of[var] not in hoisted:
            return False
        fb = facts[var]
        if fb.kind != "call" or not fb.is_tensor or not sliced_only(var, dim, scale):
            return False
        name, op, args = name_of[var], fb.op, fb.args
        srcs = ()
        if op != _ARANGE:
            rule = get_dim_rule(op) if op else None
            if rule is None:
                return False
            flow = fb.flow(rule, b.value)
            if flow is None or dim >= len(flow.outputs[0]):
                return False
            srcs = flow.outputs[0][dim]
            if any((src.arg, src.dim) in flow.reduced for src in srcs):
                return False
            if not srcs and flow.reduced:
                # the dim is made by mixing inputs (softmax or a norm along it, a conv window),
                # not by slicing one and not from a shape (full, zeros): it cannot be sunk
                return False
        # arguments that are already computed per chunk must be exactly the slices we need;
        # any other argument is read whole
        want = {src.arg: (src.dim, _per(scale, src.scale)) for src in srcs}
        for i, a in enumerate(args):
            have = spec.get(a) if fb.arg_is_var[i] else None
            if have is not None and want.get(i) != have:
                return False
        moved.add(name)  # from here on this binding is computed per chunk
        new_slices: list[ArgSlice] = []
        for src in srcs:
            a = args[src.arg]
            sub = _per(scale, src.scale)
            is_var = fb.arg_is_var[src.arg]
            if is_var and spec.get(a) == (src.dim, sub):
                continue  # already a chunk
            if not (is_var and sink(a, src.dim, sub)):
                new_slices.append(ArgSlice(name, src.arg, src.dim, sub))
        hoisted.remove(name)
        body.append(name)
        spec[var] = (dim, scale)
        slices[:] = [s for s in slices if arg_of(s) is not var]
        slices.extend(new_slices)
        return True

    for s in list(slices):
        a = arg_of(s)
        if isinstance(a, relax.Var) and s in slices:
            sink(a, s.dim, s.scale)
    order = {n: i for i, n in enumerate(names)}
    body.sort(key=order.__getitem__)
    return slices


@caches.scoped
def legal_dims(mod, start: str, end: str, *, function: str = "main") -> list[RegionAnalysis]:
    """Every (region input, dim) seed of ``[start..end]``, legal or not (with the reason)."""
    func = mod[function]
    _, bindings = region_bindings(func, start, end)
    region_vars = {b.var for b in bindings}
    seen: list = []
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            if v not in region_vars and v not in seen and isinstance(v.ty, C.TensorType):
                seen.append(v)
    out = []
    for v in seen:
        shape = C.static_shape(v.ty)
        if shape is None:
            continue
        for d, n in enumerate(shape):
            if n > 1:
                out.append(analyze_region(mod, start, end, str(v.name), d, function=function))
    return out
