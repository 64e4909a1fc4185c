"""relay_passes.cpu_schedules: every op family scheduled, with outputs equal to TVM's own
(unscheduled) build; chunked modules with odd and one-row chunks; which rule takes each
kernel of the four benchmark families."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax import op

import tvm_autochunk as ac
from benchmarks.models import FAMILIES, SMALL_SIZES
from relay_passes import cpu_schedules
from relay_passes.lowering import as_target, legalize_passes, lowering_passes
from relay_passes.plan import ChunkPlan, ChunkRegion

RNG = np.random.default_rng(0)


def _module(body, shapes):
    params = [relax.Var(f"x{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _tvm_default(mod, args):
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


CASES = {
    "matmul": (lambda bb, a, b: op.matmul(a, b), [(64, 96), (96, 128)]),
    "matmul_odd": (lambda bb, a, b: op.matmul(a, b), [(1025, 64), (64, 1025)]),
    "matmul_odd_rows": (lambda bb, a, b: op.matmul(a, b), [(51, 32), (32, 48)]),
    "matmul_one_row": (lambda bb, a, b: op.matmul(a, b), [(1, 32), (32, 64)]),
    "matmul_batched": (lambda bb, a, b: op.matmul(a, b), [(2, 3, 17, 16), (2, 3, 16, 40)]),
    "matmul_narrow": (lambda bb, a, b: op.matmul(a, b), [(16, 8), (8, 3)]),
    # the right operand's rows 1 KiB apart or more: packed into panels
    "matmul_packed": (lambda bb, a, b: op.matmul(a, b), [(24, 96), (96, 512)]),
    "matmul_packed_broadcast": (lambda bb, a, b: op.matmul(a, b), [(2, 12, 64), (64, 264)]),
    "matmul_packed_batched": (lambda bb, a, b: op.matmul(a, b), [(3, 8, 64), (3, 64, 256)]),
    "conv2d": (lambda bb, x, w: op.nn.conv2d(x, w, padding=1), [(1, 3, 20, 24), (8, 3, 3, 3)]),
    "conv2d_stride": (
        lambda bb, x, w: op.nn.conv2d(x, w, strides=2, padding=1),
        [(1, 4, 17, 33), (8, 4, 3, 3)],
    ),
    # a ViT patch embedding (stride = kernel), a 1x1 conv, and output channels no vector
    # width divides (Conv declines; Matmul takes it)
    "conv2d_patch": (
        lambda bb, x, w: op.nn.conv2d(x, w, strides=16),
        [(2, 3, 32, 48), (16, 3, 16, 16)],
    ),
    # padded, stride 2, 16 output columns (the odd conv2d_stride's 17 go to Matmul: Conv's
    # tiles stay within one output row)
    "conv2d_stride_even": (
        lambda bb, x, w: op.nn.conv2d(x, w, strides=2, padding=1),
        [(1, 4, 10, 32), (8, 4, 3, 3)],
    ),
    # 6 output columns, 4 rows: a tile of 6 positions, not 4 (which would cross output rows)
    "conv2d_six_wide": (
        lambda bb, x, w: op.nn.conv2d(x, w, padding=1),
        [(1, 4, 4, 6), (8, 4, 3, 3)],
    ),
    "conv2d_1x1": (lambda bb, x, w: op.nn.conv2d(x, w), [(1, 12, 10, 12), (24, 12, 1, 1)]),
    "conv2d_odd_channels": (
        lambda bb, x, w: op.nn.conv2d(x, w, padding=1),
        [(1, 5, 12, 8), (6, 5, 3, 3)],
    ),
    "elementwise": (lambda bb, a, b: op.nn.gelu(op.add(op.exp(a), b)), [(3, 37, 24), (37, 24)]),
    "softmax": (lambda bb, a: op.nn.softmax(a, axis=-1), [(4, 33, 70)]),
    "layer_norm": (
        lambda bb, a: op.nn.layer_norm(
            a,
            relax.const(RNG.standard_normal(48).astype("float32")),
            relax.const(RNG.standard_normal(48).astype("float32")),
            axes=[-1],
        ),
        [(5, 9, 48)],
    ),
    "rms_norm": (
        lambda bb, a: op.nn.rms_norm(
            a, relax.const(RNG.standard_normal(40).astype("float32")), axes=[-1]
        ),
        [(7, 40)],
    ),
    "sum": (lambda bb, a: op.sum(a, axis=[2]), [(3, 5, 70)]),
    # whole vectors long: reduced through rfactor into vector partials
    "softmax_vectors": (lambda bb, a: op.nn.softmax(a, axis=-1), [(2, 9, 128)]),
    "sum_vectors": (lambda bb, a: op.sum(a, axis=[1, 2]), [(3, 8, 64)]),
    "max_vectors": (lambda bb, a: op.max(a, axis=[-1]), [(6, 256)]),
    "mean_middle": (lambda bb, a: op.mean(a, axis=[1]), [(3, 50, 7)]),
    "max": (lambda bb, a: op.max(a, axis=[-1], keepdims=True), [(6, 33)]),
    "take": (
        lambda bb, a: op.take(a, relax.const(np.array([3, 0, 5], "int64")), axis=1),
        [(4, 8, 5)],
    ),
    "concat": (lambda bb, a, b: op.concat([a, b], axis=1), [(3, 5, 17), (3, 2, 17)]),
    "permute": (lambda bb, a: op.permute_dims(a, [0, 2, 1]), [(2, 33, 40)]),
    "slice": (lambda bb, a: op.strided_slice(a, axes=[1], begin=[3], end=[30]), [(2, 40, 19)]),
    "group_norm": (
        lambda bb, a: op.nn.group_norm(
            a,
            relax.const(np.ones(8, "float32")),
            relax.const(np.zeros(8, "float32")),
            num_groups=2,
            channel_axis=1,
            axes=[2, 3],
        ),
        [(1, 8, 12, 12)],
    ),
    "resize": (lambda bb, a: op.image.resize2d(a, (24, 20)), [(1, 3, 12, 10)]),
    "avg_pool": (lambda bb, a: op.nn.avg_pool2d(a, pool_size=2, strides=2), [(1, 4, 16, 16)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_op_family_equals_tvms_unscheduled_build(case):
    body, shapes = CASES[case]
    mod = _module(body, shapes)
    args = [RNG.standard_normal(s).astype("float32") for s in shapes]
    want = _tvm_default(mod, args)
    got = ac.build(mod, "llvm")(*args)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("case", "rule"),
    [
        ("matmul", "Matmul"),
        ("matmul_odd", "Matmul"),
        ("matmul_odd_rows", "Matmul"),
        ("matmul_batched", "Matmul"),
        ("conv2d", "Conv"),
        ("conv2d_stride", "Matmul"),
        ("conv2d_stride_even", "Conv"),
        ("conv2d_patch", "Conv"),
        ("conv2d_1x1", "Conv"),
        ("conv2d_six_wide", "Conv"),
        ("conv2d_odd_channels", "Matmul"),
    ],
)
def test_matmul_like_kernels_take_the_register_blocked_rules(case, rule):
    body, shapes = CASES[case]
    tgt = ac.resolve_target("llvm")
    with tgt:
        low = tvm.transform.Sequential(legalize_passes(tgt))(_module(body, shapes))
    rules = {
        gv.name_hint: cpu_schedules.rule_for(f, tgt)
        for gv, f in low.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
    }
    assert rule in rules.values(), rules


@pytest.mark.parametrize(
    "case",
    ["softmax", "softmax_vectors", "layer_norm", "rms_norm", "sum_vectors", "max_vectors", "max"],
)
def test_row_reductions_take_the_row_rule_not_the_matmul_rule(case):
    # a one-operand reduction over trailing axes looks like a matmul's loop nest (S..SR)
    body, shapes = CASES[case]
    tgt = ac.resolve_target("llvm")
    with tgt:
        low = tvm.transform.Sequential(legalize_passes(tgt))(_module(body, shapes))
    rules = {
        cpu_schedules.rule_for(f, tgt)
        for _, f in low.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
    }
    assert rules == {"RowChain"}, rules


def test_packed_workspace_is_what_the_estimator_predicts():
    """``matmul.pack_bytes`` (the estimator's walk leaves matmuls unlowered and asks it) equals
    the workspace of the scheduled kernel TVM lowers the matmul to, on random shapes."""
    import random

    from relay_passes import _compat as C

    rng = random.Random(3)
    tgt = ac.resolve_target("llvm")
    packed = 0
    for _ in range(40):
        m, k, n = (
            rng.choice([1, 5, 12, 16, 64, 97]),
            rng.choice([8, 64, 130]),
            rng.choice([3, 16, 100, 256, 264, 520]),
        )
        batch = [rng.choice([1, 2, 3])] * rng.randint(0, 1)
        shapes = [
            [*batch, m, k],
            [*([rng.choice([1, *batch])] if batch and rng.random() < 0.5 else batch), k, n],
        ]
        mod = _module(lambda bb, a, b: op.matmul(a, b), shapes)
        call = mod["main"].body.blocks[0].bindings[0].value
        want = C.kept_matmul_workspace(call, tgt)
        with tgt:
            low = tvm.transform.Sequential(legalize_passes(tgt))(mod)
        (f,) = [f for _, f in low.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        assert C.prim_func_workspace(f, tgt) == want, shapes
        packed += bool(want)
    assert packed >= 6


def _families():
    for fam in ("gpt", "vit", "evoformer", "unet"):
        kw = {"layers": 1} if fam in ("gpt", "vit") else {}
        w = FAMILIES[fam](SMALL_SIZES[fam], **kw)
        yield fam, ac.from_torch(w.module, w.inputs)


def test_no_kernel_of_the_four_families_is_left_to_the_fallback():
    tgt = ac.resolve_target("llvm")
    taken: dict = collections.defaultdict(list)
    for fam, mod in _families():
        with tgt:
            low = tvm.transform.Sequential(legalize_passes(tgt))(mod)
        for gv, f in low.functions_items():
            if isinstance(f, tvm.tirx.PrimFunc):
                taken[cpu_schedules.rule_for(f, tgt)].append(f"{fam}:{gv.name_hint}")
    assert taken["Matmul"] and taken["Elementwise"]
    assert taken.get("Fallback", []) == [] and taken.get(None, []) == []


def test_the_build_pipeline_schedules_every_kernel():
    tgt = as_target(ac.resolve_target("llvm"))
    for _, mod in _families():
        with tgt:
            low = tvm.transform.Sequential(lowering_passes(tgt))(mod)
        unscheduled = [
            gv.name_hint
            for gv, f in low.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and "tirx.is_scheduled" not in (f.attrs or {})
        ]
        assert unscheduled == []


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_gpt_with_odd_one_row_and_shorter_last_chunks(chunk):
    """The attention region of GPT S=128 along its rows: 1-row chunks (128 calls), 7 rows (a
    2-row last chunk), 64 (two calls). Outputs equal the unchunked build's."""
    w = FAMILIES["gpt"](128, layers=1)
    mod = ac.from_torch(w.module, w.inputs)
    x = w.inputs[0].numpy()
    base = ac.build(mod, "llvm")
    plan = ChunkPlan((ChunkRegion("lv8", "lv67", "lv7", 1, chunk),))
    art = ac.build(mod, "llvm", chunk_plan=plan)
    assert art.report.chunking["regions"][0]["chunk"] == chunk
    np.testing.assert_allclose(art(x), base(x), rtol=2e-5, atol=2e-5)


def _matmul_by_const(n, w, bound: int):
    """main(x: (n, k)) = x @ w, ``n`` (an int or a symbolic var) bounded by ``bound``."""
    x = relax.Var("x", relax.TensorType((n, w.shape[0]), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(op.matmul(x, relax.const(w))))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {"n": bound})
    return mod


def test_matmul_with_symbolic_rows_is_register_blocked():
    """A symbolic row count (a dynamic length, a loop's shorter last chunk): the Matmul rule
    tiles it (its rows padded to the tile), equal to numpy at row counts the tile does and
    does not divide, and the estimate (which lowers it for real) equals TVM's plan."""
    from relay_passes.estimate_memory import estimate_memory
    from relay_passes.planned_memory import planned_memory

    w = RNG.standard_normal((96, 512), dtype=np.float32)  # rows 2 KiB apart: packed panels
    mod = _matmul_by_const(tvm.tirx.Var("n", "int64"), w, 300)
    tgt = ac.resolve_target("llvm")
    with tgt:
        low = tvm.transform.Sequential(legalize_passes(tgt))(mod)
    rules = {cpu_schedules.rule_for(f, tgt) for _, f in low.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    assert rules == {"Matmul"}
    assert estimate_memory(mod, tgt).peak_bytes == planned_memory(mod, tgt).peak_bytes
    art = ac.build(mod, target="llvm")
    for rows in (1, 4, 7, 300):
        a = RNG.standard_normal((rows, 96), dtype=np.float32)
        np.testing.assert_allclose(art(a), a @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [97, "symbolic"])
def test_rows_the_tile_does_not_divide_are_padded_per_tile(rows):
    """Rows the 4-row tile does not divide (an odd chunk) or known at run time only are padded
    per tile: the kernel's buffers are one packed panel (256 x 16) and one padded tile of the
    left operand (4 x 256), whatever the rows, and the accumulator a 4 x 16 tile (on the stack:
    under the workspace threshold). A row predicate or a partitioned remainder made the
    accumulator the whole output, or the tile unpacked (2.5-4x slower per row measured)."""
    from relay_passes import _compat as C

    n = tvm.tirx.Var("n", "int64") if rows == "symbolic" else rows
    w = RNG.standard_normal((256, 1024), dtype=np.float32)  # rows 4 KiB apart: packed panels
    mod = _matmul_by_const(n, w, 2048)
    tgt = ac.resolve_target("llvm")
    with tgt:
        low = tvm.transform.Sequential(legalize_passes(tgt))(mod)
    (f,) = [f for _, f in low.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    cols = 2 * cpu_schedules.common.vector_lanes(tgt)  # the tile: 4 rows x 2 vectors
    assert C.prim_func_workspace(f, tgt, {"n": 2048}) == (256 * cols * 4, 4 * 256 * 4)
    if rows != "symbolic":
        assert C.kept_matmul_workspace(mod["main"].body.blocks[0].bindings[0].value, tgt) == (
            256 * cols * 4, 4 * 256 * 4)
    art = ac.build(mod, target="llvm")
    for m in (1, 5, 97, 300) if rows == "symbolic" else (97,):
        a = RNG.standard_normal((m, 256), dtype=np.float32)
        np.testing.assert_allclose(art(a), a @ w, rtol=1e-4, atol=1e-4)


def test_conv_tiles_use_256_bit_vectors_on_avx512():
    """On an AVX-512 target a conv tile row is two 256-bit vectors (16 floats): with two
    512-bit ones (32 floats) the same schedule ran 6-17x slower on a Rocket Lake host
    (UNet-48 163 ms against 26.5, ViT-1024's patch conv 38.9 ms against 2.3). The matmul rule
    keeps 512-bit vectors (GPT-1024 25.6 ms against 29.7 with 256)."""
    import tvm_ffi

    # 32 output channels: a tile of two 16-lane vectors, or of 8 lanes
    body, shapes = (lambda bb, x, w: op.nn.conv2d(x, w, padding=1)), [(1, 8, 8, 16), (32, 8, 3, 3)]
    tgt = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    with tgt:
        low = tvm.transform.Sequential([*legalize_passes(tgt), cpu_schedules.schedule_pass()])(
            _module(body, shapes)
        )
    widths = []
    for gv, f in low.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint:

            def on_for(n, vis):
                if n.kind == tvm.tirx.ForKind.VECTORIZED and isinstance(n.extent, tvm.tirx.IntImm):
                    widths.append(int(n.extent))
                return vis.default_visit(n)

            tvm_ffi.structural_visit(f.body, [(tvm.tirx.For, on_for)])
    assert widths and max(widths) == 16, widths  # 32 without the cap


@pytest.mark.parametrize("width", [1, 12])
def test_a_norm_over_a_unit_axis_is_not_inlined_into_its_sum(width):
    """rms_norm over a size-1 axis: its sum over one element reads as injective to dlight,
    and inlining the epilogue into that reduction block ran rsqrt on the running sum (NaN
    everywhere; fuzz seed 466). The Elementwise rule now leaves blocks with an init alone."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((32, width), "float32"))
    w = relax.const(np.full(width, 1.5, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op.nn.rms_norm(x, w, axes=[-1], epsilon=1e-5))
        bb.emit_func_output(out)
    xs = np.random.default_rng(0).standard_normal((32, width)).astype("float32")
    got = ac.build(bb.get(), "llvm")(xs)
    want = xs / np.sqrt((xs**2).mean(-1, keepdims=True) + 1e-5) * 1.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
