"""relay_passes.rewrite: ``ApplyChunkPlan`` / ``apply_chunk_plan``, the one pass that changes IR:
the golden rewrite (a last, shorter chunk; hoisting), bad plans, numerics and memory on each
model family and on a callee's region, region outputs written in place over a dead input, and
the write-slice kernels it makes (each chunk returns the written buffer, not a copy)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from _helpers import INPLACE_CASES as CASES
from _helpers import Before
from _helpers import run_llvm as _run  # build for llvm, run main, return the first output
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import tvm_autochunk as ac
from benchmarks.models import FAMILIES
from benchmarks.regions import attention_regions
from relay_passes.attention import leave_unfused
from relay_passes.auto_chunk import auto_chunk
from relay_passes.chunk_region import analyze_region
from relay_passes.errors import PassContractError
from relay_passes.estimate_memory import estimate_memory
from relay_passes.plan import ChunkPlan, ChunkRegion
from relay_passes.planned_memory import planned_memory
from relay_passes.rewrite import ApplyChunkPlan, apply_chunk_plan


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def autochunk_write_slice_float32_r2d0(var_out: T.handle, var_src: T.handle, off: T.int64):
        T.func_attr({"tirx.noalias": True})
        n0, n1, c = T.int64(), T.int64(), T.int64()
        out = T.match_buffer(var_out, (n0, n1), "float32")
        src = T.match_buffer(var_src, (c, n1), "float32")
        for i0, i1 in T.grid(c, n1):
            with T.sblock("write"):
                v0, v1 = T.axis.remap("SS", [i0, i1])
                out[v0 + off, v1] = src[v0, v1]

    @R.function(private=True)
    def main_wt_c_chunk2_tail(
        x: R.Tensor((8, 4), "float32"),
        wt: R.Tensor((4, 4), "float32"),
        c_buf: R.Tensor((8, 4), "float32"),
        off: T.int64,
    ) -> R.Tensor((8, 4), "float32"):
        R.func_attr({"autochunk_buffer_params": [2]})  # returns c_buf, written in place
        cls = Expected
        with R.dataflow():
            xc = R.strided_slice(x, (0,), (off,), (off + 2,), assume_inbound=True)
            a = R.matmul(xc, wt, out_dtype=None)
            b = R.nn.softmax(a, axis=1)
            c = R.multiply(b, xc)
            cw = R.call_tir_inplace(
                cls.autochunk_write_slice_float32_r2d0,
                (c_buf, c, off),
                out_ty=R.Tensor((8, 4), "float32"),
                inplace_indices=[0],
            )
            gv = cw
            R.output(gv)
        return gv

    @R.function(private=True)
    def main_wt_c_chunk3(
        x: R.Tensor((8, 4), "float32"),
        wt: R.Tensor((4, 4), "float32"),
        c_buf: R.Tensor((8, 4), "float32"),
        off: T.int64,
    ) -> R.Tensor((8, 4), "float32"):
        R.func_attr({"autochunk_buffer_params": [2]})  # returns c_buf, written in place
        cls = Expected
        with R.dataflow():
            xc = R.strided_slice(x, (0,), (off,), (off + 3,), assume_inbound=True)
            a = R.matmul(xc, wt, out_dtype=None)
            b = R.nn.softmax(a, axis=1)
            c = R.multiply(b, xc)
            cw = R.call_tir_inplace(
                cls.autochunk_write_slice_float32_r2d0,
                (c_buf, c, off),
                out_ty=R.Tensor((8, 4), "float32"),
                inplace_indices=[0],
            )
            gv = cw
            R.output(gv)
        return gv

    @R.function
    def main(x: R.Tensor((8, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor(
        (8, 4), "float32"
    ):
        cls = Expected
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            c_init = R.builtin.alloc_tensor(R.shape([8, 4]), R.dtype("float32"), 0)
            r0 = cls.main_wt_c_chunk3(x, wt, c_init, R.prim_value(T.int64(0)))
            r1 = cls.main_wt_c_chunk3(x, wt, r0, R.prim_value(T.int64(3)))
            r2 = cls.main_wt_c_chunk2_tail(x, wt, r1, R.prim_value(T.int64(6)))
            c = r2
            R.output(c)
        return c


def test_golden_rewrite_with_tail_and_hoisting():
    plan = ChunkPlan.region(Before, start="wt", end="c", dim={"x": 0}, chunk=3)
    after = ApplyChunkPlan(plan)(Before)
    tvm.ir.assert_structural_equal(after, Expected)


def test_bad_plans_are_clear_errors():
    with pytest.raises(PassContractError, match=r"chunk must be in \[1, 8\]"):
        apply_chunk_plan(Before, ChunkPlan((ChunkRegion("wt", "c", "x", 0, 9),)))
    with pytest.raises(PassContractError, match="no binding named 'nope'"):
        apply_chunk_plan(Before, ChunkPlan((ChunkRegion("nope", "c", "x", 0, 2),)))
    with pytest.raises(PassContractError, match="comes before start"):
        apply_chunk_plan(Before, ChunkPlan((ChunkRegion("c", "wt", "x", 0, 2),)))
    with pytest.raises(ValueError, match="one-entry dict"):
        ChunkPlan.region(Before, start="wt", end="c", dim={}, chunk=2)


@pytest.mark.parametrize("chunk", [1, 2, 3, 8])
def test_golden_module_numerics(chunk):
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in ((8, 4), (4, 4))]
    after = apply_chunk_plan(Before, ChunkPlan((ChunkRegion("wt", "c", "x", 0, chunk),)))
    np.testing.assert_allclose(_run(after, args), _run(Before, args), rtol=1e-5, atol=1e-6)


SIZES = {"gpt": 128, "vit": 64, "evoformer": 16, "unet": 16}


# chunks in seed rows: 1 (or the smallest legal), a non-divisor, half
CHUNKS = {"gpt": (1, 7, 64), "vit": (1, 7, 32), "evoformer": (16, 48, 128), "unet": (1, 7, 128)}


@pytest.fixture(scope="module")
def families():
    out = {}
    for fam, size in SIZES.items():
        w = FAMILIES[fam](size)
        mod = ac.from_torch(w.module, w.inputs)
        x = [t.numpy() for t in w.inputs]
        out[fam] = (mod, x, ac.build(mod, "llvm")(*x))
    return out


@pytest.mark.parametrize("family", list(SIZES))
def test_family_attention_region_numerics_and_memory(families, family):
    mod, x, ref = families[family]
    regions = attention_regions(mod)
    assert regions, f"no attention region found in {family}"
    r = regions[0]
    for chunk in CHUNKS[family]:
        plan = ChunkPlan.region(mod, start=r.start, end=r.end, dim={r.seed: r.dim}, chunk=chunk)
        chunked = apply_chunk_plan(mod, plan)
        art = ac.build(chunked, "llvm")
        out = art(*x)
        rel = float(np.abs(out - ref).max() / np.abs(ref).max())
        assert rel <= 1e-5, (family, chunk, rel)
        # the estimator models the chunked module (main + per-chunk frame) as TVM plans it
        est = estimate_memory(chunked, "llvm")
        assert est.peak_bytes == planned_memory(chunked, "llvm").peak_bytes
        assert est.frame.callee is not None


def test_input_module_not_mutated(families):
    mod, _, _ = families["gpt"]
    before = mod.script()
    r = attention_regions(mod)[0]
    apply_chunk_plan(
        mod, ChunkPlan.region(mod, start=r.start, end=r.end, dim={r.seed: r.dim}, chunk=16)
    )
    assert mod.script() == before


def test_chunked_module_builds_for_cuda(families):
    mod, _, _ = families["gpt"]
    r = attention_regions(mod)[0]
    plan = ChunkPlan.region(mod, start=r.start, end=r.end, dim={r.seed: r.dim}, chunk=32)
    art = ac.build(mod, target="cuda", arch="sm_80", chunk_plan=plan)
    assert art.report.planned_peak_bytes == art.report.estimated_peak_bytes
    assert art.report.chunking["regions"][0]["chunk"] == 32
    text = str(art.report)  # a caller's plan, printed as such
    assert "chunking (the caller's plan): 1 region(s)" in text
    assert f"{r.start}..{r.end} along {r.seed} dim {r.dim}: chunks of 32 rows" in text


def test_chunking_cuts_attention_memory():
    # attention left unfused (as on CUDA): on llvm the fused kernel keeps no scores at all
    w = FAMILIES["gpt"](1024, layers=1)
    mod = leave_unfused(ac.from_torch(w.module, w.inputs))
    r = attention_regions(mod)[0]
    before = estimate_memory(mod, "llvm").peak_bytes
    chunked = apply_chunk_plan(
        mod, ChunkPlan.region(mod, start=r.start, end=r.end, dim={r.seed: r.dim}, chunk=64)
    )
    after = estimate_memory(chunked, "llvm")
    assert after.peak_bytes == planned_memory(chunked, "llvm").peak_bytes
    # the 4 x S x S scores become 4 x 64 x S per chunk; what remains is the MLP (gelu's
    # workspace) and the hoisted causal mask: 92 -> 50 MB at S=1024
    assert after.peak_bytes < 0.6 * before


@I.ir_module
class TwoOutputsInCallee:
    @R.function(private=True)
    def inner(x: R.Tensor((12, 6), "float32")) -> R.Tuple(
        R.Tensor((12, 6), "float32"), R.Tensor((12, 1), "float32")
    ):
        with R.dataflow():
            a = R.exp(x)
            s = R.sum(a, axis=[1], keepdims=True)
            p = R.divide(a, s)
            m = R.max(p, axis=[1], keepdims=True)
            out = (p, m)
            R.output(out)
        return out

    @R.function
    def main(x: R.Tensor((12, 6), "float32")) -> R.Tensor((12, 6), "float32"):
        cls = TwoOutputsInCallee
        with R.dataflow():
            r = cls.inner(x)
            p = r[0]
            m = r[1]
            y = R.multiply(p, m)
            R.output(y)
        return y


def test_two_outputs_and_a_region_in_a_callee():
    ra = analyze_region(TwoOutputsInCallee, "a", "m", "x", 0, function="inner")
    assert ra.legal, ra.reason
    assert [o.name for o in ra.outputs] == ["p", "m"]
    plan = ChunkPlan((ChunkRegion("a", "m", "x", 0, 5, function="inner"),))  # 5 + 5 + 2 rows
    after = apply_chunk_plan(TwoOutputsInCallee, plan)
    x = np.random.default_rng(1).standard_normal((12, 6)).astype("float32")
    np.testing.assert_allclose(_run(after, [x]), _run(TwoOutputsInCallee, [x]), rtol=1e-5)
    est = estimate_memory(after, "llvm")
    assert est.peak_bytes == planned_memory(after, "llvm").peak_bytes


def test_reuse_saves_a_buffer_in_the_plan():
    mod, (start, end, seed, dim), _ = CASES["residual"]
    plan = ChunkPlan((ChunkRegion(start, end, seed, dim, 2),))
    fresh = apply_chunk_plan(mod, plan, reuse_inputs=False)
    reused = apply_chunk_plan(mod, plan)
    saved = planned_memory(fresh, "llvm").peak_bytes - planned_memory(reused, "llvm").peak_bytes
    assert saved == 8 * 4 * 4  # one (8, 4) float32 buffer
    assert estimate_memory(reused, "llvm").peak_bytes == planned_memory(reused, "llvm").peak_bytes


def test_evoformer_residual_stream_is_reused():
    """The pair stack's residual stream: every later region writes over its dead input, so the
    chunked block needs less than without reuse, and computes the same values. (Each reuse
    saved a whole pair tensor while the planner counted every chunk loop's arguments at once;
    with them planned (``chunk_calls``) a fresh buffer can take a tensor's storage that died
    before the region, and the plan shrinks only where its peak is: 32 KiB here.)"""
    w = FAMILIES["evoformer"](16)
    mod = ac.from_torch(w.module, w.inputs)
    x = [t.numpy() for t in w.inputs]
    peak0 = estimate_memory(mod, "llvm").peak_bytes
    chunked, res = auto_chunk(mod, "llvm", int(peak0 * 0.8))
    fresh = apply_chunk_plan(mod, res.plan, reuse_inputs=False)
    assert planned_memory(fresh, "llvm").peak_bytes > planned_memory(chunked, "llvm").peak_bytes
    ref = ac.build(mod, "llvm")(*x)
    out = ac.build(chunked, "llvm")(*x)
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64"])
def test_write_slice_built_without_the_parser_equals_its_tvmscript(dtype):
    """make_write_slice uses TVMScript's IR builder (the parser's decorator is slow to call
    deep inside a build); it must be the very PrimFunc the TVMScript source parses to, for
    each rank and dim (here rank 3 along dim 1, and rank 2 along dim 0)."""
    import tvm_ffi
    from tvm.script import tirx as T

    from relay_passes.rewrite import make_write_slice

    @T.prim_func(private=True, s_tir=True)
    def r3d1(var_out: T.handle, var_src: T.handle, off: T.int64):
        T.func_attr({"tirx.noalias": True})
        n0, n1, n2, c = T.int64(), T.int64(), T.int64(), T.int64()
        out = T.match_buffer(var_out, (n0, n1, n2), dtype)
        src = T.match_buffer(var_src, (n0, c, n2), dtype)
        for i0, i1, i2 in T.grid(n0, c, n2):
            with T.sblock("write"):
                v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
                out[v0, v1 + off, v2] = src[v0, v1, v2]

    @T.prim_func(private=True, s_tir=True)
    def r2d0(var_out: T.handle, var_src: T.handle, off: T.int64):
        T.func_attr({"tirx.noalias": True})
        n0, n1, c = T.int64(), T.int64(), T.int64()
        out = T.match_buffer(var_out, (n0, n1), dtype)
        src = T.match_buffer(var_src, (c, n1), dtype)
        for i0, i1 in T.grid(c, n1):
            with T.sblock("write"):
                v0, v1 = T.axis.remap("SS", [i0, i1])
                out[v0 + off, v1] = src[v0, v1]

    for (rank, dim), want in {(3, 1): r3d1, (2, 0): r2d0}.items():
        built = make_write_slice(dtype, rank, dim)
        assert tvm_ffi.structural_equal(built, want)
        assert built.script() == want.script()  # names too
        # and not some other dtype's, rank's or dim's
        other = "float64" if dtype != "float64" else "float32"
        assert not tvm_ffi.structural_equal(make_write_slice(other, rank, dim), want)
    assert not tvm_ffi.structural_equal(make_write_slice(dtype, 3, 0), r3d1)
    assert not tvm_ffi.structural_equal(make_write_slice(dtype, 2, 1), r2d0)
    # rank 1 (a loop of one variable) builds too
    assert "out[v0 + off] = src[v0]" in make_write_slice(dtype, 1, 0).script()


def _chunk_function_traffic(mod, target):
    """Per chunk function of the module as ``target`` lowers it: the bytes of each storage it
    allocates, and the PrimFuncs it calls."""
    import tvm
    from tvm import relax

    from relay_passes import lowering

    t = lowering.as_target(target)
    lowered = lowering.run_passes(mod, lowering.build_passes(t), t)
    alloc = tvm.ir.Op.get("relax.vm.alloc_storage")
    out = {}
    for gv, f in lowered.functions.items():
        if not isinstance(f, relax.Function) or "_chunk" not in gv.name_hint:
            continue
        sizes, calls = [], []
        for block in f.body.blocks:
            for b in block.bindings:
                v = b.value
                if isinstance(v, relax.Call) and v.op.same_as(alloc):
                    sizes.append(int(v.args[0].values[0]))
                elif isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar):
                    calls.append(v.op.name_hint)
        out[gv.name_hint] = (sizes, calls)
    return out


@pytest.mark.parametrize("target", ["llvm", "cuda"])
@pytest.mark.parametrize("case", ["residual", "used_after"])
def test_each_chunk_returns_the_written_buffer_as_a_view(case, target):
    """A chunk writes its rows into the full-size buffer in place and returns that buffer, not
    a copy. When the write went through a flattened (a, n, b) view, the CUDA pipeline's FuseOps
    bound the function's result to the reshape back to the output's shape, which then stayed a
    kernel copying the whole buffer in every chunk (an H200 measured 290 us per chunk of a
    128 MiB output, and TVM's plan held a second full-size buffer). No chunk function may
    allocate the output's size, nor call a reshape kernel."""
    mod, (start, end, seed, dim), _ = CASES[case]
    after = apply_chunk_plan(mod, ChunkPlan((ChunkRegion(start, end, seed, dim, 2),)))
    found = _chunk_function_traffic(after, target)
    assert found, "no chunk function in the lowered module"
    full = 8 * 4 * 4  # the (8, 4) float32 output
    for name, (sizes, calls) in found.items():
        assert sizes and max(sizes) < full, (name, sizes)
        assert not any(c.startswith("reshape") for c in calls), (name, calls)


@I.ir_module
class TwoSmallOutputs:  # a region with two (8, 4) outputs, small enough to constant-fold
    @R.function
    def main(x: R.Tensor((8, 4), "float32")):
        with R.dataflow():
            a = R.nn.relu(x)
            b = R.sigmoid(a)
            c = R.add(a, b)
            R.output(c)
        return c


def test_output_buffers_are_fresh_allocations_on_every_target():
    """A region's output buffers are allocations the chunks fill, not ``R.zeros``: TVM's CUDA
    pipeline folded small zeros into constants, and the VM's constant pool made two equal
    ones one, so a two-output region wrote both outputs into one buffer (and into a constant
    that outlives the call). Lowered for CUDA, each chunk call gets two distinct buffers and
    none is a constant; on llvm the values equal the unchunked module's."""
    import tvm
    from tvm import relax

    from relay_passes import lowering

    after = apply_chunk_plan(TwoSmallOutputs, ChunkPlan((ChunkRegion("a", "b", "x", 0, 2),)))
    t = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    lowered = lowering.run_passes(after, lowering.build_passes(t), t)
    calls = []
    relax.analysis.post_order_visit(
        lowered["main"],
        lambda e: calls.append(e)
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar)
        and "chunk" in e.op.name_hint else None,
    )
    assert calls
    for c in calls:
        bufs = c.args[1:3]
        assert not any(isinstance(b, tvm.ir.GenericConst) for b in bufs), c
        assert not bufs[0].same_as(bufs[1]), c
    x = np.random.default_rng(3).standard_normal((8, 4)).astype("float32")
    np.testing.assert_allclose(_run(after, [x]), _run(TwoSmallOutputs, [x]), rtol=1e-6)
