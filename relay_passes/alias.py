"""Which region input a chunk loop may overwrite with a region output (analysis only).

A chunked region writes each output chunk by chunk into a full-size buffer. By default that
buffer is a fresh zero-initialised tensor, which stays live next to the region's inputs. When
an input ``x`` of the region is dead after it and every chunk reads only the rows of ``x`` that
the same chunk writes, the output can be written **into ``x`` itself**: chunk ``k`` has read
its rows of ``x`` before it overwrites them, and no other chunk reads them. That removes one
whole tensor per region (the residual stream of a transformer or pair-stack block, e.g.).

``reusable_inputs`` returns, per output, the input whose buffer may be reused. It is
conservative: any tensor that may share ``x``'s storage (views such as ``reshape``, results of
calls that may return an argument, tuples) must also be dead after the region and read only
through those rows; parameters and constants are never written.
"""

from __future__ import annotations

from fractions import Fraction

from tvm import relax

from . import _compat as C
from . import caches
from .chunk_region import RegionAnalysis
from .dimflow import arg_leaves
from .ir_index import bindings_by_name, reads_by_block, tensor_leaves

# ops that may become views (no copy) of their tensor arguments once lowered: reshapes, copies
# whose index map is the identity (RewriteDataflowReshape turns them into reshapes), identities.
# Every other Relax op computes a fresh tensor; calls of functions and packed calls may return
# an argument (see ``_call_sources``)
_MOVE_OPS = frozenset(
    "relax." + n
    for n in (
        "reshape",
        "expand_dims",
        "squeeze",
        "flatten",
        "permute_dims",
        "broadcast_to",
        "strided_slice",
        "dynamic_strided_slice",
        "astype",
        "concat",
        "split",
        "tile",
        "repeat",
        "layout_transform",
        "collapse_sum_to",
        "collapse_sum_like",
        "memory.view",
        "memory.ensure_zero_offset",
        "stack",
        # identities (device hints, parameter wrappers) and inference-time dropout
        "hint_on_device",
        "to_vdevice",
        "wrap_param",
        "builtin.stop_lift_params",
        "nn.dropout",
    )
)


class _Groups:
    """Union-find over Relax vars (keyed by object identity: hashing a TVM object is its
    address, comparing two is slow); a group is tainted when it may share a parameter's or a
    constant's storage (never written in place)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.tainted: set[int] = set()

    def find(self, v) -> int:
        k = hash(v)
        parent = self.parent
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb
            if ra in self.tainted:
                self.tainted.add(rb)

    def taint(self, v) -> None:
        self.tainted.add(self.find(v))

    def is_tainted(self, v) -> bool:
        return self.find(v) in self.tainted


def _link(groups: _Groups, var, sources) -> None:
    groups.find(var)
    for s in sources:
        if isinstance(s, relax.Var):
            groups.union(var, s)
        else:  # a constant's storage
            groups.taint(var)


def _return_leaves(func: relax.Function) -> list:
    """The leaves of ``func``'s return value, looking through bindings to tuples."""
    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}

    def leaves(e):
        if isinstance(e, relax.Var) and isinstance(bound.get(e), relax.Tuple):
            return [x for f in bound[e].fields for x in leaves(f)]
        if isinstance(e, relax.Tuple):
            return [x for f in e.fields for x in leaves(f)]
        return [e]

    return leaves(func.body.body)


# the attribute of a chunk function or loop: the parameters it returns, written in place
BUFFER_PARAMS = "autochunk_buffer_params"


def buffer_params_of(func) -> list[int] | None:
    """The buffer parameters a chunk function or loop returns (``BUFFER_PARAMS``), else None."""
    if not isinstance(func, relax.Function) or func.attrs is None:
        return None
    if BUFFER_PARAMS not in func.attrs:
        return None
    return [int(i) for i in func.attrs[BUFFER_PARAMS]]


def returned_params(mod, gv, seen: frozenset = frozenset()) -> list[list[int]] | None:
    """Per leaf of the Relax function ``gv``'s return value (one for a tensor), the indices of
    the parameters it may share storage with; None when ``gv`` cannot be analysed (unknown,
    or recursive). Cached per module: a chunked module calls one function hundreds of times."""
    key = (id(mod), str(gv.name_hint))
    cache = caches.current().returned
    hit = cache.get(key)
    if hit is not None and hit[0] is mod:
        return hit[1]
    func = mod[gv] if gv in mod.functions else None
    if gv in seen or not isinstance(func, relax.Function):
        return None
    bufs = buffer_params_of(func)
    if bufs is not None:
        # a chunk function or loop (recursive, so not analysable here) returns its buffers,
        # written in place, by construction (``rewrite``, ``chunk_loop``)
        return [[i] for i in bufs]
    groups = function_groups(mod, func, seen | {gv}, precise_tuples=True)
    roots = [groups.find(p) for p in func.params]
    out = []
    for leaf in _return_leaves(func):
        r = groups.find(leaf) if isinstance(leaf, relax.Var) else None
        out.append([i for i, pr in enumerate(roots) if r is not None and pr == r])
    if len(cache) > 256:
        cache.clear()
    cache[key] = (mod, out)  # holds mod: its id cannot be reused while cached
    return out


def _call_sources(mod, call, seen) -> list:
    """What the result of ``call`` may alias."""
    op = call.op
    if isinstance(op, C.Op):
        name = str(op.name)
        if name == "relax.call_tir_inplace":
            args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else []
            idx = [int(i) for i in call.attrs.inplace_indices]
            return [x for i in idx if 0 <= i < len(args) for x in tensor_leaves(args[i])]
        if name in _MOVE_OPS or name.startswith("relax.call_"):
            # call_tir of a reshape-like PrimFunc becomes a view; packed calls may return args
            return [x for a in call.args for x in tensor_leaves(a)]
        return []  # a computing op: a fresh tensor
    if isinstance(op, C.GlobalVar):
        per_leaf = returned_params(mod, op, seen)
        if per_leaf is not None:
            ps = sorted({i for leaf in per_leaf for i in leaf})
            return [x for i in ps if i < len(call.args) for x in tensor_leaves(call.args[i])]
    return [x for a in call.args for x in tensor_leaves(a)]


def function_groups(
    mod, func: relax.Function, seen: frozenset = frozenset(), skip=(), precise_tuples=False
) -> _Groups:
    """May-alias groups of ``func``'s vars (bindings named in ``skip`` are left out).

    By default a var bound to a tuple joins the groups of all its fields. ``precise_tuples``
    keeps a tuple's fields apart (a field read back is linked to that field only), so that a
    function returning several in-place buffers maps each result to its own parameter."""
    groups = _Groups()
    fields: dict[int, list] = {}  # precise_tuples: tuple-bound var -> its field exprs

    def expand(xs):
        out = []
        for x in xs:
            f = fields.get(hash(x)) if isinstance(x, relax.Var) else None
            out.extend(expand([y for e in f for y in tensor_leaves(e)]) if f is not None else [x])
        return out

    def item(v: relax.TupleGetItem):
        f = fields.get(hash(v.tuple_value)) if isinstance(v.tuple_value, relax.Var) else None
        return expand(tensor_leaves(f[v.index])) if f is not None else expand(tensor_leaves(v))

    for p in func.params:
        groups.find(p)
        groups.taint(p)
    for block in func.body.blocks:
        for b in block.bindings:
            if str(b.var.name) in skip:
                continue
            v = b.value
            if precise_tuples and isinstance(v, relax.Tuple):
                fields[hash(b.var)] = list(v.fields)
            elif precise_tuples and isinstance(v, relax.Var) and hash(v) in fields:
                fields[hash(b.var)] = fields[hash(v)]
            elif precise_tuples and isinstance(v, relax.TupleGetItem):
                _link(groups, b.var, item(v))
            elif isinstance(b, relax.MatchCast) or isinstance(
                v, (relax.Var, relax.Tuple, relax.TupleGetItem)
            ):
                _link(groups, b.var, expand(tensor_leaves(v)))
            elif isinstance(v, C.Call):
                _link(groups, b.var, expand(_call_sources(mod, v, seen)))
            elif isinstance(v, relax.If):  # branches may return anything they can see
                _link(groups, b.var, expand(relax.analysis.free_vars(v)))
            else:
                groups.find(b.var)
    return groups


def _rows(shape, dim: int, scale: Fraction) -> tuple:
    """The elements a chunk slice along ``dim`` covers, independent of the view's shape: the
    row-major storage is ``a`` blocks of ``n`` elements, and a chunk at offset ``off`` takes
    ``[off * step, (off + chunk) * step)`` of each block. Two slices of one storage with equal
    ``(a, n, step)`` (and the same offset and chunk) cover the same elements."""
    inner = C.prod(shape[dim + 1 :])
    return (C.prod(shape[:dim]), int(shape[dim]) * inner, scale * inner)


def reusable_inputs(mod, ra: RegionAnalysis, inputs: list) -> dict[str, relax.Var]:
    """{output name: region input whose storage the output may be written into}."""
    func = mod[ra.function]
    bindings = bindings_by_name(func)
    body = set(ra.body)
    groups = function_groups(mod, func, skip=body)
    order: dict[str, int] = {}
    uses: dict = {}  # group root -> names of the bindings that read it (None: the return value)
    reads_of: dict[str, tuple] = {}
    blocks, returned = reads_by_block(func)  # cached per function
    for block in blocks:
        for var, reads in block:
            name = str(var.name)
            order[name] = len(order)
            reads_of[name] = reads
            for v in reads:
                uses.setdefault(groups.find(v), []).append(name)
    for v in returned:
        uses.setdefault(groups.find(v), []).append(None)
    start = order[ra.start]
    sliced = {(s.binding, s.arg): s for s in ra.slices}
    seed = next((v for v in inputs if str(v.name) == ra.seed.name), None)

    # body bindings each body binding depends on (for regions with several outputs)
    deps: dict[str, set] = {}
    for n in ra.body:
        names = {str(v.name) for v in reads_of[n]}
        deps[n] = {n}.union(*(deps[r] for r in names if r in deps))

    chosen: dict[str, relax.Var] = {}
    for o in ra.outputs:
        oty = bindings[o.name].var.ty
        oshape = C.static_shape(oty)
        if oshape is None:
            continue
        want = _rows(oshape, o.dim, o.scale)
        for x in inputs:
            if any(x.same_as(c) for c in chosen.values()) or groups.is_tainted(x):
                continue
            xshape = C.static_shape(x.ty)
            if xshape is None or C.tensor_dtype(x.ty) != C.tensor_dtype(oty):
                continue
            if C.prod(xshape) != C.prod(oshape):
                continue
            if _only_row_reads(
                groups.find(x), uses, order, start, ra, body, bindings, sliced, seed, want,
                deps[o.name], groups,
            ):
                chosen[o.name] = x
                break
    return chosen


def _only_row_reads(root, uses, order, start, ra, body, bindings, sliced, seed, want, anc, groups):
    """Every use of the storage group ``root`` at or after the region start is a read, by a
    binding the output depends on, of exactly the rows the same chunk writes."""
    hoisted = set(ra.hoisted)
    for name in uses.get(root, ()):
        if name is None:
            return False  # returned by the function
        if order[name] < start or name in hoisted:
            continue  # runs before the chunk loop
        if name not in body or name not in anc:
            return False  # runs after the loop, or may run after this output's write
        b = bindings[name]
        if not isinstance(b.value, C.Call):
            return False
        for i, a in enumerate(arg_leaves(b.value.args)):  # ArgSlice.arg indexes these
            leaves = tensor_leaves(a)
            hit = [v for v in leaves if isinstance(v, relax.Var) and groups.find(v) == root]
            if not hit:
                continue
            if seed is not None and isinstance(a, relax.Var) and a.same_as(seed):
                rows = _rows(C.static_shape(seed.ty), ra.seed.dim, Fraction(1))
            elif isinstance(a, relax.Var) and (name, i) in sliced:
                s = sliced[(name, i)]
                shape = C.static_shape(a.ty)
                if shape is None:
                    return False
                rows = _rows(shape, s.dim, s.scale)
            else:
                return False  # read whole (or inside a tuple) by a chunk
            if rows != want:
                return False
    return True
