"""CachedLegalizeOps lowers exactly as TVM's LegalizeOps (the estimator relies on it)."""

from __future__ import annotations

import random

import pytest
import tvm
import tvm_ffi
from tvm import relax

import tvm_autochunk as ac
from benchmarks.fuzz_graphs import RandomDraw, generate
from benchmarks.models import FAMILIES
from relay_passes import caches
from relay_passes import legalize_cache as L
from relay_passes.estimate_memory import estimate_memory
from relay_passes.plan import ChunkPlan, ChunkRegion
from relay_passes.rewrite import apply_chunk_plan


def _canon(mod) -> tuple:
    """The module with PrimFuncs named by their structure: a memoised PrimFunc has a name of its
    own (``add_acmemo3`` where TVM says ``add``), and two structurally equal PrimFuncs, which
    TVM's builder merges, may both be there (one memoised, one lowered afresh): the set of
    PrimFunc structures is compared, and every call's PrimFunc by its structure."""
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    key = {n: tvm_ffi.structural_hash(f) for n, f in prims.items()}
    rows = []
    for gv, f in sorted(mod.functions_items(), key=lambda kv: kv[0].name_hint):
        if isinstance(f, tvm.tirx.PrimFunc):
            continue
        rows.append(("fn", gv.name_hint, str(f.params), str(f.ret_ty)))
        for block in f.body.blocks:
            for b in block.bindings:
                v = b.value
                callee = v.args[0] if isinstance(v, relax.Call) and v.args else None
                if isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint in prims:
                    what = (str(v.op), key[callee.name_hint], str(list(v.args)[1:]))
                else:
                    what = (str(v),)
                rows.append((str(b.var.name), str(b.var.ty), *what))
    return tuple(rows), tuple(sorted(set(key.values())))


def _same(a, b) -> bool:
    return _canon(a) == _canon(b)


def _both(mod, target="llvm"):
    with tvm.target.Target(target), caches.scope() as c:
        want = relax.transform.LegalizeOps()(mod)
        L.CachedLegalizeOps(mod)  # fills the memo
        before = dict(c.stats)
        got = L.CachedLegalizeOps(mod)  # served from it
    return want, got, c.stats["hits"] - before["hits"]


@pytest.mark.parametrize(
    "family,size", [("gpt", 256), ("vit", 196), ("evoformer", 32), ("unet", 16)]
)
def test_same_module_as_legalize_ops_on_models(family, size):
    kw = {"layers": 2} if family in ("gpt", "vit") else {}
    w = FAMILIES[family](size, **kw)
    mod = ac.from_torch(w.module, w.inputs)
    want, got, hits = _both(mod)
    assert hits > 0
    assert _same(want, got)


def test_same_module_per_target():
    # the memo is keyed by the target in scope: lowering for one must not serve the other
    w = FAMILIES["gpt"](128, layers=1)
    mod = ac.from_torch(w.module, w.inputs)
    for target in ({"kind": "cuda", "arch": "sm_90"}, "llvm", {"kind": "cuda", "arch": "sm_90"}):
        want, got, hits = _both(mod, tvm.target.Target(target))
        assert hits > 0 and _same(want, got)
    # a call's key is remembered per Call object, and per target
    call = next(b.value for b in mod["main"].body.blocks[0].bindings
                if isinstance(b.value, relax.Call) and L._key(b.value) is not None)
    keys = []
    with caches.scope() as c:
        for target in ("llvm", "cuda", "llvm"):
            c.target = str(tvm.target.Target({"kind": target}))
            keys.append(L._call_key(call))
            assert keys[-1] == L._key(call)
    assert keys[0] == keys[2] != keys[1]


def test_same_module_on_a_chunked_module():
    # chunk functions call ops on slices with symbolic offsets: what must not be memoised
    # (symbolic shapes) falls through to TVM's legalization
    w = FAMILIES["gpt"](256, layers=1)
    mod = ac.from_torch(w.module, w.inputs)
    chunked = apply_chunk_plan(mod, ChunkPlan((ChunkRegion("lv11", "lv67", "lv10", 1, 48),)))
    want, got, hits = _both(chunked)
    assert hits > 0
    assert _same(want, got)


def test_same_module_on_random_graphs():
    rng = random.Random(11)
    for _ in range(40):
        g = generate(RandomDraw(rng.randrange(10**9)))
        want, got, _ = _both(g.mod)
        assert _same(want, got), g.recipe


def test_same_estimate_and_a_cache_key_per_signature():
    w = FAMILIES["evoformer"](32)
    mod = ac.from_torch(w.module, w.inputs)
    a = estimate_memory(mod, "llvm")
    b = estimate_memory(mod, "llvm")
    assert (a.peak_bytes, a.runtime_peak_bytes, a.timeline) == (
        b.peak_bytes,
        b.runtime_peak_bytes,
        b.timeline,
    )
    # two calls that differ only in an argument's shape must not share a PrimFunc
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    y = relax.Var("y", relax.TensorType((4, 9), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            a1 = bb.emit(relax.op.exp(x))
            a2 = bb.emit(relax.op.exp(y))
            out = bb.emit_output(relax.Tuple([a1, a2]))
        bb.emit_func_output(out)
    want, got, _ = _both(bb.get())
    assert _same(want, got)
    assert len([f for f in got.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]) == 2


def test_memoised_primfuncs_have_names_of_their_own_and_estimates_show_tvms():
    # a hit's PrimFunc is added after the pass under a GlobalVar of its own (not through the
    # pass's builder, which hashes every function added); the estimator's labels drop the
    # suffix, which fused functions on GPUs carry inside their names
    w = FAMILIES["gpt"](128, layers=1)
    mod = ac.from_torch(w.module, w.inputs)
    _, got, hits = _both(mod)
    assert hits > 0
    names = [gv.name_hint for gv in got.get_global_vars()]
    assert any(L.SUFFIX in n for n in names)
    assert len(set(names)) == len(names)
    cuda = {"kind": "cuda", "arch": "sm_90"}
    with caches.scope():
        estimate_memory(mod, cuda)
        prof = estimate_memory(mod, cuda)  # served from the memo
    assert any(e.op.startswith("fused_") for e in prof.timeline)
    assert not any("acmemo" in e.op for e in prof.timeline)


def _reshape_module():
    """Static reshapes as views (a DataflowVar in a dataflow block) and as copies (a block's
    output; a binding outside any dataflow block); a static slice of a whole tensor."""
    x = relax.Var("x", relax.TensorType((8, 96), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.reshape(x, (8, 4, 24)))  # a view
            a = bb.emit(relax.op.strided_slice(a, axes=[0], begin=[0], end=[8]))  # whole
            b = bb.emit(relax.op.exp(a))
            c = bb.emit_output(relax.op.reshape(b, (32, 24)))  # the block's output: a copy
        d = bb.emit(relax.op.reshape(c, (4, 192)))  # outside a dataflow block: a copy
        e = bb.emit(relax.op.add(d, d))
        bb.emit_func_output(e)
    return bb.get()


def _estimate_key(p):
    return (p.peak_bytes, p.runtime_peak_bytes, p.workspace_bytes, p.frame, p.peak_binding,
            p.peak_op, p.timeline, p.live_at_peak)


def test_ops_left_unlowered_estimate_as_tvm_lowers_them(monkeypatch):
    # the CPU estimator leaves static reshapes unlowered and its walk decides view or copy,
    # as RewriteDataflowReshape does on TVM's lowering; and chunk functions' slices at their
    # offsets, copies: the same estimates as lowering them
    mods = [_reshape_module()]
    for family, size in (("gpt", 128), ("vit", 196), ("evoformer", 32), ("unet", 16)):
        kw = {"layers": 1} if family in ("gpt", "vit") else {}
        w = FAMILIES[family](size, **kw)
        mods.append(ac.from_torch(w.module, w.inputs))
    mods.append(apply_chunk_plan(mods[1], ChunkPlan((ChunkRegion("lv11", "lv67", "lv10", 1, 48),))))
    rng = random.Random(5)
    mods += [generate(RandomDraw(rng.randrange(10**9))).mod for _ in range(30)]
    evo = mods[3]
    mods.append(apply_chunk_plan(evo, ChunkPlan((ChunkRegion("lv54", "lv119", "lv53", 0, 64),))))
    with caches.scope() as c:
        kept = [_estimate_key(estimate_memory(m, "llvm")) for m in mods]
    for op, least in (
        ("relax.reshape", 20),
        ("relax.strided_slice", 2),
        ("relax.permute_dims", 20),
        ("relax.broadcast_to", 4),
        ("relax.expand_dims", 2),
        ("relax.matmul", 20),
        ("relax.add", 20),
        ("relax.multiply", 5),
    ):
        assert c.stats.get(f"kept {op}", 0) >= least, op
    monkeypatch.setattr(L, "_keep_for_the_walk", lambda op, legalize: legalize)
    lowered = [_estimate_key(estimate_memory(m, "llvm")) for m in mods]
    assert kept == lowered
    # views and copies: the module above holds two copies of 3 KiB (and x's reshape, a view)
    ops = [e.op for e in estimate_memory(mods[0], "llvm").timeline]
    assert ops.count("reshape") == 3


def test_tvm_lowers_every_static_reshape_to_a_reshape_pattern():
    # what the estimator's shortcut above relies on (random shapes of equal element counts)
    rng = random.Random(3)

    def divisors(n):
        small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
        return sorted({*small, *(n // d for d in small)})

    def split(n, k):
        dims = []
        for _ in range(k - 1):
            d = rng.choice(divisors(n))
            dims.append(d)
            n //= d
        return [*dims, n]

    checked = 0
    for _ in range(40):
        n = rng.choice([12, 96, 210, 256, 4096, 3 * 65536, 7 * 11 * 13])
        x = relax.Var("x", relax.TensorType(split(n, rng.randint(1, 5)), "float32"))
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.reshape(x, split(n, rng.randint(1, 5))))
            bb.emit_func_output(y)
        with tvm.target.Target("llvm"):
            low = relax.transform.LegalizeOps()(bb.get())
        for f in low.functions.values():
            if isinstance(f, tvm.tirx.PrimFunc):
                assert relax.analysis.has_reshape_pattern(f), (x.ty, f)
                checked += 1
    assert checked >= 30  # reshapes to the same shape lower to no kernel


def _lowered_one(build):
    """TVM's CPU lowering of the one call ``build(*params)`` emits: (PrimFuncs, the call_tir's
    tensor arguments, its output type, the call's output type)."""
    bb = relax.BlockBuilder()
    params, make = build
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit_output(make(*params))
        bb.emit_func_output(y)
    with tvm.target.Target("llvm"):
        low = relax.transform.LegalizeOps()(bb.get())
    fs = [f for f in low.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    calls = [b.value for blk in low["main"].body.blocks for b in blk.bindings]
    return fs, calls, y.ty


def test_tvm_lowers_kept_compute_ops_to_one_plain_kernel():
    # what the estimator's walk assumes of legalize_cache.COMPUTE_OPS: one call_tir over the
    # op's tensors, a fresh output of the op's type, no workspace, no reshape pattern (random
    # shapes, broadcasting, a scalar constant, f(x, x), 1-D and batched matmuls)
    from relay_passes import _compat as C

    rng = random.Random(7)
    tgt = tvm.target.Target("llvm")
    binary = ["add", "subtract", "multiply", "divide", "maximum", "minimum"]
    unary = ["exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "negative", "abs"]
    assert {f"relax.{n}" for n in binary + unary} | {"relax.nn.relu", "relax.matmul"} == (
        L.COMPUTE_OPS
    )

    def var(name, shape, dtype="float32"):
        return relax.Var(name, relax.TensorType(shape, dtype))

    cases = []
    for _ in range(60):
        shape = [rng.choice([1, 2, 3, 8]) for _ in range(rng.randint(1, 4))]
        other = [d if rng.random() < 0.7 else 1 for d in shape][rng.randint(0, len(shape) - 1):]
        op = getattr(relax.op, rng.choice(binary))
        kind = rng.randrange(3)
        if kind == 0:
            x, y = var("x", shape), var("y", other)
            cases.append(([x, y], lambda a, b, op=op: op(a, b)))
        elif kind == 1:  # a scalar constant that is not 0 or 1 (those fold to a copy)
            c = relax.const(rng.choice([0.5, 2.0, -3.0]), "float32")
            cases.append(([var("x", shape)], lambda a, op=op, c=c: op(a, c)))
        else:
            cases.append(([var("x", shape)], lambda a, op=op: op(a, a)))
        u = rng.choice(unary)
        cases.append(([var("x", shape)], lambda a, u=u: getattr(relax.op, u)(a)))
        cases.append(([var("x", shape)], lambda a: relax.op.nn.relu(a)))
        m, k, n = rng.choice([1, 3, 8]), rng.choice([1, 4, 16]), rng.choice([1, 5, 8])
        lhs = [rng.choice([1, 2])] * rng.randint(0, 2) + [m, k]
        rhs = [k, n] if rng.random() < 0.5 else [k]
        cases.append(([var("a", lhs), var("b", rhs)], lambda a, b: relax.op.matmul(a, b)))
    for params, make in cases:
        fs, calls, ty = _lowered_one((params, make))
        assert len(fs) == 1 and len(calls) == 1, calls
        call = calls[0]
        assert str(call.op.name) == "relax.call_tir"
        assert not relax.analysis.has_reshape_pattern(fs[0]), fs[0]
        assert C.prim_func_workspace(fs[0], tgt) == ()
        assert tvm_ffi.structural_equal(call.ty, ty)
        args = list(call.args[1].fields)
        assert all(any(a.same_as(p) for p in params) for a in args)  # the op's own tensors


def test_tvm_lowers_layout_ops_to_a_copy_or_a_reshape_pattern_as_predicted():
    # legalize_cache.layout_is_reshape against TVM's has_reshape_pattern (random shapes; unit
    # dims moved, kept or added), and the kernel allocates nothing inside
    from relay_passes import _compat as C

    rng = random.Random(9)
    tgt = tvm.target.Target("llvm")
    seen = {True: 0, False: 0}
    for i in range(120):
        shape = [rng.choice([1, 1, 2, 3, 8]) for _ in range(rng.randint(1, 5))]
        x = relax.Var("x", relax.TensorType(shape, "float32"))
        kind = i % 3
        if kind == 0:
            axes = list(range(len(shape)))
            rng.shuffle(axes)
            axes = None if rng.random() < 0.1 else axes
            make = lambda a, axes=axes: relax.op.permute_dims(a, axes)  # noqa: E731
        elif kind == 1:
            lead = [rng.choice([1, 2]) for _ in range(rng.randint(0, 2))]
            out = lead + [d if d != 1 else rng.choice([1, 1, 4]) for d in shape]
            make = lambda a, out=out: relax.op.broadcast_to(a, out)  # noqa: E731
        else:
            ax = rng.randint(-len(shape) - 1, len(shape))
            make = lambda a, ax=ax: relax.op.expand_dims(a, [ax])  # noqa: E731
        fs, calls, _ = _lowered_one(([x], make))
        assert len(fs) == 1 and len(calls) == 1
        op_call = make(x)
        bb = relax.BlockBuilder()  # the call normalized (its type inferred), as in a module
        with bb.function("f", [x]):
            with bb.dataflow():
                y = bb.emit_output(op_call)
            bb.emit_func_output(y)
        op_call = bb.get()["f"].body.blocks[0].bindings[0].value
        want = bool(relax.analysis.has_reshape_pattern(fs[0]))
        assert L.layout_is_reshape(op_call) == want, (op_call, shape)
        assert C.prim_func_workspace(fs[0], tgt) == ()
        seen[want] += 1
    assert seen[True] >= 20 and seen[False] >= 20


def test_scalar_identities_are_lowered_since_tvm_makes_them_copies():
    # x + 0, x * 1, x - 0, x / 1: TVM's legalization folds them to a copy of x (a reshape
    # pattern, a view after RewriteDataflowReshape); they are not left to the walk
    for op, c in (("add", 0.0), ("multiply", 1.0), ("subtract", 0.0), ("divide", 1.0)):
        x = relax.Var("x", relax.TensorType((4, 8), "float32"))
        make = lambda a, op=op, c=c: getattr(relax.op, op)(a, relax.const(c, "float32"))  # noqa: E731
        fs, _, _ = _lowered_one(([x], make))
        assert relax.analysis.has_reshape_pattern(fs[0])
        assert L._scalar_identity(relax.const(c, "float32"))
    assert not L._scalar_identity(relax.const(2.0, "float32"))
    assert not L._scalar_identity(relax.const([1.0, 1.0], "float32"))


def test_cached_fold_constant_equals_fold_constant_and_restores_tirx_build():
    # GPU estimates fold the weight transposes on every estimate: the CPU builds are memoised
    w = FAMILIES["gpt"](128, layers=1)
    mod = ac.from_torch(w.module, w.inputs)
    orig = tvm_ffi.get_global_func("tirx.build")
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}), caches.scope() as c:
        low = relax.transform.LegalizeOps()(mod)
        want = relax.transform.FoldConstant()(low)
        L.CachedFoldConstant(low)
        before = c.stats.get("fold_build_hits", 0)
        got = L.CachedFoldConstant(low)
    assert c.stats.get("fold_build_hits", 0) > before  # served from the memo
    assert tvm_ffi.structural_equal(want, got)
    assert tvm_ffi.get_global_func("tirx.build").same_as(orig)


def test_types_whose_structural_hashes_collide_get_their_own_primfunc():
    """Fuzzing found R.Tensor((1, 20, 200)) and R.Tensor((1, 3, 18)) with one structural hash:
    keyed by that hash, gelu on the second got the first's PrimFunc and output type, and a
    matmul downstream failed to lower. Shapes are now spelled out in the key."""
    a = relax.TensorType((1, 20, 200), "float32")
    b = relax.TensorType((1, 3, 18), "float32")
    assert tvm_ffi.structural_hash(a) == tvm_ffi.structural_hash(b)  # TVM's hash, as found
    bb = relax.BlockBuilder()
    x, y = relax.Var("x", a), relax.Var("y", b)
    with bb.function("main", [x, y]):
        with bb.dataflow():
            g1 = bb.emit(relax.op.nn.gelu(x))
            g2 = bb.emit(relax.op.nn.gelu(y))
            out = bb.emit_output(relax.Tuple([g1, g2]))
        bb.emit_func_output(out)
    want, got, _ = _both(bb.get())
    assert _same(want, got)
    tys = [str(b.var.ty) for b in got["main"].body.blocks[0].bindings[:2]]
    assert tys == [str(a), str(b)]


def _tvm_lowering(mod, target="llvm"):
    from relay_passes.lowering import as_target, lowering_passes

    tgt = as_target(target)
    with tgt:
        return tvm.transform.Sequential(lowering_passes(tgt))(mod)


def _cpu_lowering(mod, target="llvm"):
    from relay_passes.lowering import as_target, lowering_passes

    tgt = as_target(target)
    with tgt:
        return L.cpu_lowering(lowering_passes(tgt))(mod)


def _sort_scan_module():
    x = relax.Var("x", relax.TensorType((8, 16), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.cumsum(x, axis=1))
            b = bb.emit(relax.op.sort(a, axis=1))
            c = bb.emit(relax.op.add(b, x))
            out = bb.emit_output(c)
        bb.emit_func_output(out)
    return bb.get()


def test_cpu_lowering_equals_tvms_passes_and_dispatches_when_needed():
    # dispatch passes are skipped only on modules without their ops: with cumsum and sort the
    # result is still TVM's (the sort is dispatched to its library kernel, not legalized)
    w = FAMILIES["gpt"](256, layers=1)
    mod = ac.from_torch(w.module, w.inputs)
    chunked = apply_chunk_plan(mod, ChunkPlan((ChunkRegion("lv11", "lv67", "lv10", 1, 48),)))
    for m in (mod, chunked, _sort_scan_module()):
        assert _same(_tvm_lowering(m), _cpu_lowering(m))
    m = _sort_scan_module()
    with tvm.target.Target("llvm"):
        dispatched = relax.backend.DispatchSortScan()(m)
    assert not tvm_ffi.structural_equal(dispatched, m), "the dispatch pass is not exercised"


def test_dispatched_ops_match_tvms_dispatch_passes():
    # the ops each dispatch pass matches (``call.op.name == "..."`` / ``in (...)``) in TVM's
    # source: a TVM that dispatches another op must not see its pass skipped
    import re
    from pathlib import Path

    import tvm.relax.backend as be

    root = Path(be.__file__).parent
    for name, fname in [("DispatchSampling", "dispatch_sampling.py"),
                        ("DispatchSortScan", "dispatch_sort_scan.py")]:
        src = (root / fname).read_text()
        found = set()
        for m in re.finditer(r"call\.op\.name\s*(==|in)\s*(\([^)]*\)|\"[^\"]+\")", src):
            found |= set(re.findall(r"\"(relax\.[\w.]+)\"", m.group(2)))
        assert found and found == set(L.DISPATCHED_OPS[name]), (name, found)
