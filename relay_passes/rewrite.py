"""ApplyChunkPlan: the one pass that rewrites IR. It applies a ``ChunkPlan`` and decides nothing.

For each region (``plan.ChunkRegion``), re-derived with ``chunk_region.analyze_region``:

* a private Relax function ``<fn>_chunk<C>`` computes the region for one chunk: it slices the seed
  (``strided_slice`` with a symbolic ``off`` and ``assume_inbound``, so shapes stay static), replays
  the region's bindings on the slice, and writes each output's slice **in place** into a
  full-size buffer (``call_tir_inplace`` of one symbolic ``write_slice`` PrimFunc per dtype, rank
  and dim; the buffer keeps its shape, no reshape), so
  no chunk outputs pile up for a concat;
* the region in the caller becomes: hoisted bindings, one buffer per output, and a chain of
  calls ``r_i = chunk(inputs..., buffers of r_{i-1}, i*C)``; a last, shorter chunk uses a
  second function built for the remainder size. One copy of each PrimFunc serves every chunk,
  so compile time does not grow with the number of chunks. A symbolic extent (a dynamic
  length) becomes one call of a run-time loop instead (``chunk_loop``), whose last chunk
  takes its row count as a parameter.

An output's buffer is a region input that dies with the region when every chunk reads only the
rows of it that the same chunk writes (``alias.reusable_inputs``: e.g. the residual stream),
else a fresh zero-initialised tensor.

Where it belongs: on a high-level Relax module before legalization (it emits Relax ops).
Preconditions are checked (the region must be legal; ``well_formed`` after the rewrite, unless
``check=False``: the search's trial rewrites, whose chosen module ``auto_chunk`` checks).
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import _compat as C
from . import caches
from .alias import BUFFER_PARAMS, reusable_inputs
from .chunk_loop import build_loop
from .chunk_region import RegionAnalysis, analyze_region
from .dimflow import leaf_slots, map_leaf
from .errors import PassContractError
from .ir_index import bindings_by_name
from .plan import ChunkPlan, ChunkRegion


@functools.cache  # the PrimFunc is immutable: one per (dtype, rank, dim), shared
def make_write_slice(dtype: str, rank: int, dim: int):
    """``out[..., off + i, ...] = src[..., i, ...]`` in place along ``dim`` of a rank-``rank``
    buffer, all extents symbolic (``n0``.. the buffer's, ``c`` the chunk's along ``dim``).

    The buffer keeps its own shape: no reshape in the chunk function, whose result is the
    buffer written in place. (A reshape back from a flattened view was a whole-buffer copy in
    every chunk on CUDA, where FuseOps bound the function's result to it.)

    Built with TVMScript's IR builder, statement for statement what the TVMScript source in
    the tests parse to (``test_write_slice_built_without_the_parser_equals_its_tvmscript``
    checks that they are structurally equal), without the parser: the ``@T.prim_func``
    decorator calls ``inspect.stack()``, which is slow inside a build.
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.tirx.script.builder import ir as B

    if not 0 <= dim < rank:
        raise PassContractError(f"write_slice: dim {dim} out of range for rank {rank}")

    def named(names, values):
        for n, v in zip(names, values):
            IRBuilder.name(n, v)
        return values

    with IRBuilder() as ib:
        with B.prim_func(is_private=True, s_tir=True):
            B.func_name("write_slice")
            var_out = B.arg("var_out", B.handle())
            var_src = B.arg("var_src", B.handle())
            off = B.arg("off", B.int64())
            B.func_attr({"tirx.noalias": True})
            ext = named([f"n{k}" for k in range(rank)], [B.int64() for _ in range(rank)])
            (c,) = named(["c"], [B.int64()])
            chunk = [c if k == dim else e for k, e in enumerate(ext)]
            # layout=None: what the parser fills in for s_tir buffers
            (out,) = named(["out"], (B.match_buffer(var_out, ext, dtype, layout=None),))
            (src,) = named(["src"], (B.match_buffer(var_src, chunk, dtype, layout=None),))
            with B.grid(*chunk) as loops:
                loops = list(loops) if hasattr(loops, "__len__") else [loops]
                named([f"i{k}" for k in range(rank)], loops)
                with B.sblock("write"):
                    vs = B.axis.remap("S" * rank, loops)
                    vs = list(vs) if hasattr(vs, "__len__") else [vs]
                    named([f"v{k}" for k in range(rank)], vs)
                    at = [v + off if k == dim else v for k, v in enumerate(vs)]
                    B.buffer_store(out, src[tuple(vs)], at)
    return ib.get()


def _frac_mul(x, frac):
    """x * frac as an int64 PrimExpr (exact when the caller guarantees divisibility)."""
    if frac.denominator == 1:
        return x * int(frac.numerator) if frac.numerator != 1 else x
    return tvm.tirx.floordiv(x * int(frac.numerator), int(frac.denominator))


def _scaled(chunk, frac):
    """A chunk's extent in a tensor of scale ``frac``: an int for a static chunk, a PrimExpr
    for a symbolic one (the tail of a loop over a symbolic extent: ``dynamic_chunk``)."""
    return int(chunk * frac) if isinstance(chunk, int) else _frac_mul(chunk, frac)


def _same_dim(a, b) -> bool:
    if isinstance(a, (int, tvm.tirx.IntImm)) and isinstance(b, (int, tvm.tirx.IntImm)):
        return int(a) == int(b)
    return bool(tvm_ffi.structural_equal(a, b))


class _ChunkFunctionBuilder:
    """Builds the per-chunk Relax function for one region and one chunk size."""

    def __init__(
        self,
        bb: relax.BlockBuilder,
        func: relax.Function,
        ra: RegionAnalysis,
        inputs: list,
        write_gvs: dict,
    ):
        self.bb = bb
        self.func = func
        self.ra = ra
        self.inputs = inputs
        self.write_gvs = write_gvs
        self.bindings = bindings_by_name(func)
        self.spec = {s.name: s for s in ra.specs}
        self.slices = {}
        for s in ra.slices:
            self.slices.setdefault(s.binding, []).append(s)

    def build(self, name: str, chunk: int | None, tail_bound: int = 0) -> tvm.ir.GlobalVar:
        """The function for chunks of ``chunk`` rows; None: of ``t`` rows, ``t`` a parameter
        after ``off`` (a loop's shorter last chunk, known at run time, ``t <= tail_bound``)."""
        ra = self.ra
        params = [relax.Var(str(v.name), v.ty) for v in self.inputs]
        out_vars = [self.bindings[o.name].var for o in ra.outputs]
        bufs = [relax.Var(f"{o.name}_buf", v.ty) for o, v in zip(ra.outputs, out_vars)]
        off = relax.Var("off", tvm.ir.PrimType("int64"))
        extra = []
        if chunk is None:  # a Shape parameter, not a Prim one: TVM plans at t's bound then
            chunk = tvm.tirx.Var("t", "int64")
            extra = [relax.Var("rows", relax.ShapeType([chunk]))]
        env = {v: p for v, p in zip(self.inputs, params)}
        bb = self.bb
        # the buffers it returns, written in place (chunk_calls keeps them in TVM's plan)
        attrs = {BUFFER_PARAMS: [len(params) + k for k in range(len(bufs))]}
        with bb.function(name, [*params, *bufs, off, *extra], attrs=attrs, private=True):
            with bb.dataflow():
                seed = ra.seed
                seed_var = next(v for v in self.inputs if str(v.name) == seed.name)
                env[seed_var] = bb.emit(
                    self._slice(env[seed_var], seed.dim, seed.scale, chunk, off),
                    f"{seed.name}_chunk",
                )
                for bname in ra.body:
                    b = self.bindings[bname]
                    value = self._rebuild(b, env, chunk, off)
                    env[b.var] = bb.emit(value, bname)
                results = []
                for o, buf, v in zip(ra.outputs, bufs, out_vars):
                    results.append(self._write(o, buf, env[v], v.ty, chunk, off))
                gv = bb.emit_output(relax.Tuple(results) if len(results) > 1 else results[0])
            # the builder hands back an existing GlobalVar when a structurally equal function
            # is already in the module (another region with the same body), not one of ``name``
            out = bb.emit_func_output(gv)
        if any(C.free_tir_vars(list(C.tensor_shape(p.ty) or ())) for p in params if
               isinstance(p.ty, C.TensorType)):
            # a symbolic var may be defined in one function only: this one gets its own copies
            f = relax.utils.copy_with_new_vars(bb.get()[out])
            if extra:  # TVM plans the tail's storage at t's bound
                f = f.with_attr("tir_var_upper_bound", {"t": int(tail_bound)})
            bb.update_func(out, f)
        return out

    def _slice(self, x, dim, scale, chunk, off):
        begin = _frac_mul(off, scale)
        return relax.op.strided_slice(
            x, axes=[dim], begin=[begin], end=[begin + _scaled(chunk, scale)], assume_inbound=True
        )

    def _subst(self, expr, env):
        if isinstance(expr, relax.Var):
            return env.get(expr, expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self._subst(f, env) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self._subst(expr.tuple_value, env), expr.index)
        return expr

    def _rebuild(self, b, env, chunk, off):
        value = b.value
        if not isinstance(value, C.Call):
            return self._subst(value, env)
        args = [self._subst(a, env) for a in value.args]
        spec = self.spec.get(str(b.var.name))
        if spec is not None and C.op_name(value) == "relax.arange":
            # a sunk arange: this chunk's part of [start, end) is [start + o*step, ... + ext*step)
            start, _end, step = args
            first = start + _frac_mul(off, spec.scale) * step
            ext = _scaled(chunk, spec.scale)
            return relax.op.arange(first, first + ext * step, step, value.attrs.dtype)
        slices = self.slices.get(str(b.var.name), ())
        slots = leaf_slots(value.args) if slices else ()  # ArgSlice.arg indexes these leaves
        for s in slices:
            map_leaf(
                args,
                slots[s.arg],
                lambda x, s=s: self.bb.emit(self._slice(x, s.dim, s.scale, chunk, off)),
            )
        if spec is not None and isinstance(b.var.ty, C.TensorType):
            full = C.tensor_shape(b.var.ty)
            for i, a in enumerate(args):
                if isinstance(a, relax.ShapeExpr):
                    vals = list(a.values)
                    if len(vals) == len(full) and all(map(_same_dim, vals, full)):
                        vals[spec.dim] = _scaled(chunk, spec.scale)
                        args[i] = relax.ShapeExpr(vals)
        return relax.Call(value.op, args, value.attrs, value.ty_args)

    def _write(self, o, buf, src, ty, chunk, off):
        gw = self.write_gvs[(C.tensor_dtype(ty), len(C.tensor_shape(ty)), o.dim)]
        w = relax.call_tir_inplace(
            gw, relax.Tuple([buf, src, _frac_mul(off, o.scale)]), [0], ty
        )
        return self.bb.emit(w, f"{o.name}_w")


@mutator
class _RegionReplacer(PyExprMutator):
    def __init__(self, mod, func_name, ra, inputs, calls, reuse):
        super().__init__(mod)
        self.reuse = reuse  # output name -> region input whose storage becomes its buffer
        self.mod_ = mod
        self.func_name = func_name
        self.ra = ra
        self.inputs = inputs
        # [(chunk GlobalVar, offset)]: a chain of calls; or [(loop GlobalVar, extent)]: one
        # call of a loop over a symbolic extent (``dynamic_chunk``), from offset 0
        self.calls = calls
        self.region = set(ra.body) | set(ra.hoisted)

    def visit_var_binding_(self, binding):
        name = str(binding.var.name)
        if name == self.ra.start:
            self._emit_region()
        if name in self.region:
            return
        super().visit_var_binding_(binding)

    def _emit_region(self):
        bb = self.builder_
        func = self.mod_[self.func_name]
        bindings = bindings_by_name(func)
        # regions are addressed by binding name, so a name this rewrite adds must not repeat one
        # the function already has (e.g. "chunk_res" of an earlier stage): the BlockBuilder only
        # keeps the names it emitted itself unique
        used = set(bindings) | {str(p.name) for p in func.params}

        next_k: dict[str, int] = {}

        def fresh(base: str) -> str:
            k = next_k.get(base, 0)  # resume where the last name with this base stopped
            name = f"{base}{k}" if k else base
            while name in used:
                k += 1
                name = f"{base}{k}"  # the BlockBuilder's own style: lv88_part3
            next_k[base] = k
            used.add(name)
            return name

        for h in self.ra.hoisted:
            super().visit_var_binding_(bindings[h])
        outs = [bindings[o.name].var for o in self.ra.outputs]
        bufs = []
        for o, v in zip(self.ra.outputs, outs):
            shape = C.tensor_shape(v.ty)
            x = self.reuse.get(o.name)
            if x is None:
                # uninitialised: the chunks write every element. (R.zeros was folded into a
                # constant on CUDA when small, and two such buffers into one: wrong results.)
                buf = relax.op.builtin.alloc_tensor(relax.ShapeExpr(shape), C.tensor_dtype(v.ty), 0)
            else:  # written in place over an input that dies with the region
                buf = self.visit_expr(x)
                xs = C.tensor_shape(x.ty)
                if len(xs) != len(shape) or not all(map(_same_dim, xs, shape)):
                    buf = relax.op.reshape(buf, relax.ShapeExpr(shape))
                else:
                    bufs.append(buf)
                    continue
            bufs.append(bb.emit(buf, fresh(f"{o.name}_init")))
        ins = [self.visit_expr(v) for v in self.inputs]
        for gv, offset in self.calls:
            if isinstance(offset, int):
                args = [*ins, *bufs, tvm.tirx.IntImm("int64", offset)]
            else:  # a loop: from 0 to the extent
                args = [*ins, *bufs, tvm.tirx.IntImm("int64", 0), offset]
            r = bb.emit(relax.Call(gv, args), fresh("chunk_res"))
            if len(outs) == 1:
                bufs = [r]
            else:
                bufs = [
                    bb.emit(relax.TupleGetItem(r, k), fresh(f"{o.name}_part"))
                    for k, o in enumerate(self.ra.outputs)
                ]
        for v, buf in zip(outs, bufs):
            bb.emit_normalized(relax.VarBinding(v, buf))

    def transform(self):
        gv = self.mod_.get_global_var(self.func_name)
        self.builder_.update_func(gv, self.visit_expr(self.mod_[self.func_name]))
        return self.builder_.get()


def _region_inputs(func, ra: RegionAnalysis) -> list:
    """Vars the per-chunk function needs: everything its bindings read that it does not define."""
    bindings = bindings_by_name(func)
    defined = {bindings[n].var for n in ra.body}
    # a symbolic dim (e.g. ``s27`` in a ShapeExpr) is a free var too: the chunk function
    # defines its own from its parameters' shapes, so only params and bindings are passed
    passable = set(func.params) | {b.var for b in bindings.values()}
    seen: list = []
    for n in ra.body:
        for v in relax.analysis.free_vars(bindings[n].value):
            if v not in defined and v not in seen and v in passable:
                seen.append(v)
    if not any(str(v.name) == ra.seed.name for v in seen):
        raise PassContractError(f"seed '{ra.seed.name}' is not read by the region")
    return seen


def check_well_formed(mod: tvm.IRModule, what: str) -> None:
    """``relax.analysis.well_formed`` as an error naming ``what`` made the module."""
    try:
        relax.analysis.well_formed(mod)  # raises on the first violation (TVM 0.27)
    except Exception as e:
        raise PassContractError(
            f"internal error: {what} produced an ill-formed module ({e}); please report it "
            "with the model"
        ) from e


def _reusable_inputs(mod, func, ra: RegionAnalysis, inputs: list) -> dict:
    # memoised per (module, function, region): the alias analysis does not depend on the chunk
    # size, and the search tries one region at several sizes. The entry holds the module and
    # function, so their handles are not reused meanwhile.
    key = (mod.__chandle__(), func.__chandle__(), ra.start, ra.end, ra.seed.name, ra.seed.dim)
    cache = caches.current().reuse
    hit = cache.get(key)
    if hit is not None:
        return hit[2]
    out = reusable_inputs(mod, ra, inputs)
    if len(cache) >= 8:
        cache.pop(next(iter(cache)))
    cache[key] = (mod, func, out)
    return out


def apply_region(
    mod: tvm.IRModule,
    region: ChunkRegion,
    *,
    reuse_inputs: bool = True,
    check: bool = True,
    analysis_mod: tvm.IRModule | None = None,
):
    """Rewrite one region; ``reuse_inputs=False`` always allocates fresh output buffers.
    ``check=False`` skips the ``well_formed`` check of the result: for the search's trial
    rewrites, whose chosen module it checks once. ``analysis_mod``: where the region is
    analysed when ``mod`` has symbolic dims, which dim-flow rules cannot read: ``mod`` with
    them bound to their upper bounds (``dynamic_chunk``). A symbolic extent becomes a loop
    (``chunk_loop``)."""
    amod = mod if analysis_mod is None else analysis_mod
    ra = analyze_region(
        amod, region.start, region.end, region.seed, region.dim, function=region.function
    )
    if not ra.legal:
        raise PassContractError(
            f"region {region.start}..{region.end} cannot be chunked along dim {region.dim} of "
            f"'{region.seed}': {ra.reason}"
        )
    c = int(region.chunk)
    if not 1 <= c <= ra.extent:
        raise PassContractError(f"chunk must be in [1, {ra.extent}], got {region.chunk}")
    for s in ra.specs:
        ra.chunk_extent(s.name, c)  # divisibility of every chunked tensor
    func = mod[region.function]
    inputs = _region_inputs(func, ra)
    bb = relax.BlockBuilder(mod)
    write_gvs = {}
    bindings = bindings_by_name(func)
    for o in ra.outputs:
        ty = bindings[o.name].var.ty
        key = (C.tensor_dtype(ty), len(C.tensor_shape(ty)), o.dim)
        if key not in write_gvs:
            name = "autochunk_write_slice_{}_r{}d{}".format(*key)
            existing = [g for g in bb.get().functions if g.name_hint == name]
            write_gvs[key] = existing[0] if existing else bb.add_func(make_write_slice(*key), name)
    reuse = {}
    if reuse_inputs:
        ainputs = _region_inputs(amod[region.function], ra)
        by_name = {str(v.name): v for v in inputs}
        got = _reusable_inputs(amod, amod[region.function], ra, ainputs)
        reuse = {o: by_name[str(v.name)] for o, v in got.items()}
    fb = _ChunkFunctionBuilder(bb, func, ra, inputs, write_gvs)
    base = f"{region.function}_{region.start}_{region.end}_chunk"
    gv_full = fb.build(f"{base}{c}", c)
    seed_var = next(v for v in inputs if str(v.name) == ra.seed.name)
    ext = C.tensor_shape(seed_var.ty)[ra.seed.dim]
    if isinstance(ext, (int, tvm.tirx.IntImm)):
        n_full, rem = divmod(ra.extent, c)
        calls = [(gv_full, i * c) for i in range(n_full)]
        if rem:
            gv_rem = fb.build(f"{base}{rem}_tail", rem)
            for s in ra.specs:
                ra.chunk_extent(s.name, rem)
            calls.append((gv_rem, n_full * c))
    else:  # known at run time: one call of a loop, whose last chunk may be shorter
        gv_tail = fb.build(f"{base}_tail", None, tail_bound=c)
        buf_tys = [bindings[o.name].var.ty for o in ra.outputs]
        loop = build_loop(
            bb, f"{base}_loop", gv_full, gv_tail, [v.ty for v in inputs], buf_tys, c
        )
        calls = [(loop, _frac_mul(ext, 1 / ra.seed.scale))]
    mod2 = bb.get()
    out = _RegionReplacer(mod2, region.function, ra, inputs, calls, reuse).transform()
    if check:
        check_well_formed(out, f"chunking region {region.start}..{region.end}")
    return out


@caches.scoped
def apply_chunk_plan(
    mod: tvm.IRModule, plan: ChunkPlan, *, reuse_inputs: bool = True, check: bool = True
):
    """Apply every region of ``plan`` in order (plain Python: errors keep their types).
    ``check=False``: the result is not checked with ``well_formed`` (see ``apply_region``)."""
    for region in plan.regions:
        mod = apply_region(mod, region, reuse_inputs=reuse_inputs, check=check)
    return mod


@tvm.transform.module_pass(opt_level=0, name="ApplyChunkPlan")
class ApplyChunkPlan:
    """Apply every region of a ``ChunkPlan`` (in order), re-analysing each on the current IR.
    ``reuse_inputs=False``: every output gets a fresh buffer (none written over a dead input)."""

    def __init__(self, plan: ChunkPlan, reuse_inputs: bool = True):
        self.plan = plan
        self.reuse_inputs = reuse_inputs

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return apply_chunk_plan(mod, self.plan, reuse_inputs=self.reuse_inputs)
