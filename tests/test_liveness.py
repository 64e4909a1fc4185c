"""relay_passes.liveness, the frame walk behind ``estimate_memory``, on hand-written Relax: exact
bytes, views, storage reuse and growth, workspace, callee frames, peak sites, and the walk's own
RewriteDataflowReshape. Sizes are whole KiB so every expectation is exact; each case is also
checked against the ground truth read off TVM's StaticPlanBlockMemory (``planned_memory``)."""

from __future__ import annotations

import importlib

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from relay_passes.dataflow_reshape import DataflowReshapeUnknown
from relay_passes.errors import PassContractError, SymbolicShapeError
from relay_passes.estimate_memory import estimate_memory
from relay_passes.lowering import as_target, estimate_passes, run_passes
from relay_passes.planned_memory import planned_memory

KIB = 1024


@I.ir_module
class Chain:
    @R.function
    def main(x: R.Tensor((256, 256), "float32")) -> R.Tensor((256, 256), "float32"):
        with R.dataflow():
            a = R.add(x, x)
            b = R.multiply(a, a)
            c = R.matmul(b, b)
            d = R.add(c, a)
            R.output(d)
        return d


@I.ir_module
class Views:
    """reshape is a view: it must not allocate; a permute is a copy and does."""

    @R.function
    def main(x: R.Tensor((256, 256), "float32")) -> R.Tensor((256, 256), "float32"):
        with R.dataflow():
            a = R.add(x, x)
            v = R.reshape(a, R.shape([65536]))
            w = R.reshape(v, R.shape([256, 256]))
            p = R.permute_dims(w, axes=[1, 0])
            d = R.add(p, w)
            R.output(d)
        return d


@I.ir_module
class Grow:
    """A freed small block is grown for a larger request (TokenAllocator1D step 4)."""

    @R.function
    def main(x: R.Tensor((64, 256), "float32")) -> R.Tensor((64, 256), "float32"):
        with R.dataflow():
            a = R.add(x, x)  # 64 KiB
            b = R.multiply(a, a)  # 64 KiB; a dies
            c = R.broadcast_to(R.sum(b, axis=[0], keepdims=True), R.shape([128, 256]))  # 128 KiB
            d = R.strided_slice(c, axes=[0], begin=[0], end=[64])  # 64 KiB, output
            R.output(d)
        return d


@I.ir_module
class MixedDtypes:
    @R.function
    def main(x: R.Tensor((128, 128), "float16")) -> R.Tensor((128, 128), "float32"):
        with R.dataflow():
            a = R.astype(x, "float32")
            m = R.greater(a, R.const(0.0, "float32"))
            b = R.where(m, a, R.zeros_like(a))
            i = R.astype(b, "int8")
            c = R.astype(i, "float32")
            d = R.add(c, b)
            R.output(d)
        return d


@I.ir_module
class Softmax:
    """CPU softmax keeps its exp buffer as a PrimFunc-internal global buffer: workspace."""

    @R.function
    def main(x: R.Tensor((64, 512), "float32")) -> R.Tensor((64, 512), "float32"):
        with R.dataflow():
            a = R.multiply(x, R.const(2.0, "float32"))
            s = R.nn.softmax(a, axis=-1)
            d = R.add(s, a)
            R.output(d)
        return d


@I.ir_module
class Dynamic:
    @R.function
    def main(x: R.Tensor(("n", 256), "float32")) -> R.Tensor(("n", 256), "float32"):
        n = T.int64()  # noqa: F841 (declares the symbolic dim for TVMScript)
        R.func_attr({"tir_var_upper_bound": {"n": 128}})
        with R.dataflow():
            a = R.add(x, x)
            b = R.multiply(a, a)
            d = R.add(b, a)
            R.output(d)
        return d


@I.ir_module
class Unbounded:
    @R.function
    def main(x: R.Tensor(("n", 256), "float32")) -> R.Tensor(("n", 256), "float32"):
        n = T.int64()  # noqa: F841 (declares the symbolic dim for TVMScript)
        with R.dataflow():
            a = R.add(x, x)
            R.output(a)
        return a


@I.ir_module
class WithCallee:
    @R.function(private=True)
    def inner(x: R.Tensor((128, 256), "float32")) -> R.Tensor((128, 256), "float32"):
        with R.dataflow():
            a = R.add(x, x)
            b = R.multiply(a, a)
            c = R.add(b, a)
            R.output(c)
        return c

    @R.function
    def main(x: R.Tensor((128, 256), "float32")) -> R.Tensor((128, 256), "float32"):
        cls = WithCallee
        with R.dataflow():
            a = R.add(x, x)
            R.output(a)
        y = cls.inner(a)
        with R.dataflow():
            d = R.add(y, x)
            R.output(d)
        return d


def test_chain_exact():
    prof = estimate_memory(Chain, "llvm")
    # a, b, c planned in three storages (b dies only after c is written); d is the output
    assert prof.frame.storage_bytes == 3 * 256 * KIB
    assert prof.frame.num_storages == 3
    assert prof.frame.unplanned_bytes == prof.frame.output_bytes == 256 * KIB
    # the matmul kernel copies each column panel of its right operand (rows 1 KiB apart) into
    # a contiguous buffer: 256 rows x (2 vectors) of workspace
    assert 0 < prof.workspace_bytes == planned_memory(Chain, "llvm").workspace_bytes < 64 * KIB
    assert prof.peak_bytes == 1024 * KIB + prof.workspace_bytes
    assert prof.input_bytes == 256 * KIB and prof.weight_bytes == 0
    # liveness: a, b, c live together when c is written
    assert prof.live_peak_bytes == 3 * 256 * KIB + prof.workspace_bytes
    assert prof.peak_binding == "c"
    assert {r.name for r in prof.live_at_peak} == {"a", "b", "c"}
    assert [e.name for e in prof.timeline] == ["a", "b", "c", "d"]


def test_views_do_not_allocate():
    prof = estimate_memory(Views, "llvm")
    # a and p are real allocations; v, w are views of a; d is the output
    assert prof.frame.storage_bytes == 2 * 256 * KIB
    assert prof.peak_bytes == 3 * 256 * KIB


def test_growth_matches_tvm():
    prof = estimate_memory(Grow, "llvm")
    plan = planned_memory(Grow, "llvm")
    assert prof.peak_bytes == plan.peak_bytes
    assert prof.frame.storage_bytes == plan.frame("main").storage_bytes


def test_dtypes_do_not_share_storage():
    prof = estimate_memory(MixedDtypes, "llvm")
    plan = planned_memory(MixedDtypes, "llvm")
    assert prof.peak_bytes == plan.peak_bytes
    assert prof.input_bytes == 128 * 128 * 2
    # bool and int8 intermediates exist (one byte each), float32 ones do not reuse them
    assert prof.frame.num_storages == plan.frame("main").num_storages


def test_softmax_workspace_counted_on_cpu_not_gpu():
    cpu = estimate_memory(Softmax, "llvm")
    # the scheduled kernel (cpu_schedules: rows in parallel) keeps one row of its exp buffer
    assert cpu.workspace_bytes == 512 * 4
    assert cpu.peak_bytes == planned_memory(Softmax, "llvm").peak_bytes
    gpu_t = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    gpu = estimate_memory(Softmax, gpu_t)
    assert gpu.workspace_bytes == 0
    assert gpu.peak_bytes == planned_memory(Softmax, gpu_t).peak_bytes


def test_symbolic_dims_use_upper_bound():
    prof = estimate_memory(Dynamic, "llvm")
    assert prof.symbolic_bounds == (("n", 128),)
    assert prof.peak_bytes == planned_memory(Dynamic, "llvm").peak_bytes
    assert prof.input_bytes == 128 * 256 * 4


def test_unbounded_dim_is_a_clear_error():
    with pytest.raises(SymbolicShapeError, match=r"dimension 'n' of input 'x' has no upper bound"):
        estimate_memory(Unbounded, "llvm")
    with pytest.raises(SymbolicShapeError, match="tir_var_upper_bound"):
        estimate_memory(Unbounded, "llvm")


def test_callee_frame_counted():
    prof = estimate_memory(WithCallee, "llvm")
    plan = planned_memory(WithCallee, "llvm")
    assert prof.frame.callee == "inner"
    assert prof.frame.callee_bytes == plan.frame("main").callee_bytes > 0
    assert prof.peak_bytes == plan.peak_bytes


@pytest.mark.parametrize("mod", [Chain, Views, Grow, MixedDtypes, Softmax, Dynamic, WithCallee])
def test_estimator_never_mutates(mod):
    before = mod.script()
    estimate_memory(mod, "llvm")
    assert mod.script() == before


def test_not_a_module():
    with pytest.raises(PassContractError, match=r"expected a tvm\.IRModule"):
        estimate_memory("model.onnx", "llvm")
    with pytest.raises(PassContractError, match="no function 'forward'"):
        estimate_memory(Chain, "llvm", entry="forward")


if __name__ == "__main__":
    tvm.testing.main()


# ------------------------------------------------- RewriteDataflowReshape, made by the walk


# the module (``relay_passes.estimate_memory`` is also the name of the function it exports)
_em = importlib.import_module("relay_passes.estimate_memory")
_LLVM = as_target("llvm")


def _frames_both_ways(mod, entry="main"):
    """The frames as the CPU estimator walks them (RewriteDataflowReshape's rewrites made by
    the walk) and after TVM's own pass."""
    names = _em._op_names(mod)
    ours = _em._lower_and_walk(mod, entry, _LLVM, names)
    lowered = run_passes(mod, estimate_passes(_LLVM), _LLVM)
    return ours, _em.analyze_frames(lowered, entry, _LLVM, names)


def _summary(frames):
    return {
        n: (
            fa.memory,
            [(e.index, e.name, e.op, e.workspace, e.callee) for e in fa.events],
            [(p.name, p.shape, p.dtype, p.born, p.last_use, p.planned, p.output)
             for p in fa.protos],
        )
        for n, fa in frames.items()
    }


@I.ir_module
class ReshapesAtEdges:
    """Reshapes TVM's pass leaves as kernels: a dataflow block's output, and one outside any
    dataflow block; one inside that it makes a view."""

    @R.function
    def main(x: R.Tensor((16, 64), "float32")) -> R.Tensor((1024,), "float32"):
        with R.dataflow():
            a = R.add(x, x)
            b = R.reshape(a, (1024,))
            c = R.add(b, b)
            d = R.reshape(c, (64, 16))
            R.output(d)
        e = R.reshape(d, (1024,))
        f = R.add(e, e)
        return f


def test_walk_makes_tvms_dataflow_reshape_rewrites():
    # models, a chunked module (chunk functions), random graphs: the same frames, events and
    # tensors as after TVM's RewriteDataflowReshape, and reshapes really were rewritten
    import random

    import tvm_autochunk as ac
    from benchmarks.fuzz_graphs import RandomDraw, generate
    from benchmarks.models import FAMILIES
    from relay_passes.plan import ChunkPlan, ChunkRegion
    from relay_passes.rewrite import apply_chunk_plan

    mods = []
    for family, size in [("gpt", 128), ("vit", 196), ("evoformer", 32), ("unet", 16)]:
        w = FAMILIES[family](size, **({"layers": 1} if family in ("gpt", "vit") else {}))
        mods.append(ac.from_torch(w.module, w.inputs))
    mods.append(apply_chunk_plan(mods[0], ChunkPlan((ChunkRegion("lv11", "lv67", "lv10", 1, 48),))))
    mods.append(ReshapesAtEdges)
    rng = random.Random(5)
    mods += [generate(RandomDraw(rng.randrange(10**9))).mod for _ in range(25)]
    views = 0
    for m in mods:
        ours, theirs = _frames_both_ways(m)
        assert _summary(ours) == _summary(theirs)
        views += sum(e.op == "reshape" for fa in ours.values() for e in fa.events)
    assert views > 0
    ours, _ = _frames_both_ways(ReshapesAtEdges)
    assert [e.op for e in ours["main"].events if "reshape" in e.op] == ["reshape"] * 3
    assert sum(e.op == "reshape" and not e.allocs for e in ours["main"].events) == 1


@I.ir_module
class TwoInputReshape:
    """A reshape-pattern PrimFunc called on two tensors, reading one (what FuseTIR makes): the
    walk leaves the decision to TVM's pass."""

    @T.prim_func(private=True, s_tir=True)
    def flat(a: T.Buffer((16, 64), "float32"), b: T.Buffer((16, 64), "float32"),
             out: T.Buffer((1024,), "float32")):
        for i in range(1024):
            with T.sblock("flat"):
                vi = T.axis.remap("S", [i])
                out[vi] = a[vi // 64, vi % 64]

    @R.function
    def main(x: R.Tensor((16, 64), "float32")) -> R.Tensor((1024,), "float32"):
        cls = TwoInputReshape
        with R.dataflow():
            y = R.add(x, x)
            f = R.call_tir(cls.flat, (y, x), out_ty=R.Tensor((1024,), "float32"))
            g = R.add(f, f)
            R.output(g)
        return g


def test_walk_defers_to_tvms_pass_on_a_reshape_of_several_arguments():
    ours, theirs = _frames_both_ways(TwoInputReshape)
    assert _summary(ours) == _summary(theirs)
    assert any(e.op == "reshape" for e in ours["main"].events)  # TVM rewrote it: a view
    low = run_passes(TwoInputReshape, estimate_passes(_LLVM, rewrite_reshape=False), _LLVM)
    with pytest.raises(DataflowReshapeUnknown):
        _em.analyze_frames(low, "main", _LLVM, dataflow_reshape=True)
