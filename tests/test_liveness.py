"""Liveness estimator on hand-written Relax: exact bytes, peak sites, and TVM's own plan.

Sizes are whole KiB so every expectation is exact. Each case is also checked against the
ground truth read off TVM's StaticPlanBlockMemory (``planned_memory``).
"""

from __future__ import annotations

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from relay_passes.errors import PassContractError, SymbolicShapeError
from relay_passes.estimate_memory import estimate_memory
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
    assert prof.workspace_bytes == 0
    assert prof.peak_bytes == 1024 * KIB
    assert prof.input_bytes == 256 * KIB and prof.weight_bytes == 0
    # liveness: a, b, c live together when c is written
    assert prof.live_peak_bytes == 3 * 256 * KIB
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
    assert cpu.workspace_bytes >= 64 * 512 * 4  # the exp buffer
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
