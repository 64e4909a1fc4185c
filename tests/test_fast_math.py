"""relay_passes.cpu_schedules.fast_math: accuracy of the rewritten kernels against float64 over
dense sweeps, exact libm/numpy special values, a vectorized GELU with no libm call left, and
the calls the pass must leave alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
import tvm.testing
import tvm_ffi
from tvm import relax, te, tirx

from relay_passes.cpu_schedules.fast_math import MAX_NESTING, fast_math_pass, rewrite_fast_math

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
# What our CPU lowering may use: reassociation could fold exp's two-constant ln2 reduction.
FAST_TARGET = tvm.target.Target(
    {**TARGET.export(), "fast-math-reassoc": True, "fast-math-contract": True}
)
INTRINSICS = {tvm.ir.Op.get(f"tirx.{n}") for n in ("exp", "tanh", "erf", "sigmoid")}
LIBM = ("expf", "tanhf", "erff", "floorf", "copysignf", "fabsf")
FLT_MAX = float(np.finfo(np.float32).max)


def _sigmoid64(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


# name: (TIR intrinsic, float64 reference)
FUNCS = {
    "exp": (tirx.exp, np.exp),
    "tanh": (tirx.tanh, np.tanh),
    "erf": (tirx.erf, lambda x: np.frompyfunc(math.erf, 1, 1)(x).astype(np.float64)),
    "sigmoid": (tirx.sigmoid, _sigmoid64),
}


def _vectorized(func, block="y"):
    """``func`` with the innermost loop of ``block`` split by 8 and vectorized."""
    sch = tvm.s_tir.Schedule(func)
    inner = sch.get_loops(sch.get_sblock(block))[-1]
    sch.vectorize(sch.split(inner, [None, 8])[1])
    return sch.mod["main"]


def _compile(fn, shape, fast=True, target=TARGET):
    """An elementwise kernel y = fn(x), rewritten (if ``fast``), vectorized and compiled."""
    x = te.placeholder(shape, "float32", name="x")
    y = te.compute(shape, lambda *i: fn(x[i]), name="y")
    mod = tvm.IRModule({"main": te.create_prim_func([x, y])})
    if fast:
        mod = fast_math_pass()(mod)
    return tvm.compile(_vectorized(mod["main"]).with_attr("global_symbol", "main"), target)


def _run(ex, x):
    out = tvm.runtime.empty(x.shape, "float32")
    ex.jit()(tvm.runtime.tensor(x), out)
    return out.numpy()


def _intrinsic_calls(func):
    found = []

    def on_call(call, visitor):
        if isinstance(call.op, tvm.ir.Op) and call.op in INTRINSICS:
            found.append(f"{call.op.name}:{call.ty.dtype}")
        return visitor.default_visit(call)

    tvm_ffi.structural_visit(func, [(tvm.ir.Call, on_call)])
    return found


def _sweep():
    rng = np.random.default_rng(0)
    tiny = np.logspace(-38, 0, 100_000)
    parts = [np.linspace(-100, 100, 1_000_001), rng.uniform(-6, 6, 200_000), tiny, -tiny]
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize(
    "name, target", [(n, TARGET) for n in sorted(FUNCS)] + [("exp", FAST_TARGET)]
)
def test_accuracy_against_float64(name, target):
    intrinsic, reference = FUNCS[name]
    x = _sweep()
    y = _run(_compile(intrinsic, x.shape, target=target), x).astype(np.float64)
    ref = reference(x.astype(np.float64))
    if name == "exp":
        normal = (ref >= np.finfo(np.float32).tiny) & (ref <= FLT_MAX)
        assert np.max(np.abs(y[normal] - ref[normal]) / ref[normal]) <= 4e-7
        # Denormal results: either flushed or within one denormal ulp.
        sub = ref < np.finfo(np.float32).tiny
        assert np.all((y[sub] == 0) | (np.abs(y[sub] - ref[sub]) <= 2.0**-149))
        assert np.all(np.isinf(y[ref > FLT_MAX * (1 + 2**-24)]))
        return
    err = np.abs(y - ref)
    assert err.max() <= 4e-7, x[err.argmax()]
    big = np.abs(ref) > 1e-30
    rel = err[big] / np.abs(ref[big])
    assert rel.max() <= 1e-6, x[big][rel.argmax()]


SPECIALS = np.float32([-np.inf, np.inf, np.nan, -0.0, 0.0, 1e-10, -1e-10])
EXPECTED = {
    "exp": [0.0, np.inf, np.nan, 1.0, 1.0, 1.0, 1.0],
    "tanh": [-1.0, 1.0, np.nan, -0.0, 0.0, 1e-10, -1e-10],
    "erf": [-1.0, 1.0, np.nan, -0.0, 0.0, 1.1283791e-10, -1.1283791e-10],
    "sigmoid": [0.0, 1.0, np.nan, 0.5, 0.5, 0.5, 0.5],
}
# Around exp's overflow (float32(ln FLT_MAX) = 88.72283935546875 already overflows) and
# underflow (below ln 2^-150 = -103.972 the result is 0).
EXP_EDGES = np.float32([88.72283172607422, 88.72283935546875, 88.7229, 100, -103.98, -104, -200])


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_special_values(name):
    y = _run(_compile(FUNCS[name][0], SPECIALS.shape), SPECIALS)
    want = np.float32(EXPECTED[name])
    np.testing.assert_allclose(y, want, rtol=2e-7, atol=0)  # nan == nan, inf == inf
    signed = ~np.isnan(want)  # -0.0 stays -0.0; a nan's sign bit is unspecified
    np.testing.assert_array_equal(np.signbit(y[signed]), np.signbit(want[signed]))


def test_exp_overflow_and_underflow_edges():
    y = _run(_compile(tirx.exp, EXP_EDGES.shape), EXP_EDGES)
    np.testing.assert_allclose(
        y, np.float32([3.4027985e38, np.inf, np.inf, np.inf, 0, 0, 0]), rtol=2e-7, atol=0
    )


def _gelu_tanh(v):
    return 0.5 * v * (1.0 + tirx.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v * v * v)))


def test_vectorized_gelu_tanh_has_no_libm_call():
    x = np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32) * 4
    fast, base = _compile(_gelu_tanh, x.shape), _compile(_gelu_tanh, x.shape, fast=False)
    assert not [f for f in LIBM if f in fast.mod.inspect_source("asm")]
    assert "expf" in base.mod.inspect_source("asm")  # what the pass is for
    x64 = x.astype(np.float64)
    want = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    np.testing.assert_allclose(_run(fast, x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_rewritten_loop_stays_a_vector_loop(name):
    # TVM's VectorizeLoop scalarizes a whole loop for one call it cannot widen (isnan and
    # copysign are such): no libm call left is not enough, the loop must stay vectorized
    from relay_passes._compat import _lower_for_workspace

    x = te.placeholder((64,), "float32", name="x")
    y = te.compute((64,), lambda i: FUNCS[name][0](x[i]), name="y")
    mod = fast_math_pass()(tvm.IRModule({"main": te.create_prim_func([x, y])}))
    lowered = _lower_for_workspace(_vectorized(mod["main"]), TARGET)
    scalar_loops = []

    def on_for(loop, visitor):
        scalar_loops.append(str(loop.loop_var.name))
        return visitor.default_visit(loop)

    tvm_ffi.structural_visit(lowered.body, [(tirx.For, on_for)])
    assert scalar_loops == ["i_0"], scalar_loops  # the 8 lanes are one vector, not a loop
    assert "float32x8" in str(lowered)


def test_nesting_beyond_the_cap_keeps_libm_calls():
    """The two innermost of four nested calls are rewritten; the outer two keep libm (compile
    time would grow exponentially), and the kernel still compiles fast and computes right."""
    assert MAX_NESTING == 2
    x = te.placeholder((64,), "float32", name="x")
    y = te.compute((64,), lambda i: tirx.exp(tirx.erf(tirx.sigmoid(tirx.tanh(x[i])))), name="y")
    out = fast_math_pass()(tvm.IRModule({"main": te.create_prim_func([x, y])}))["main"]
    assert sorted(_intrinsic_calls(out)) == ["tirx.erf:float32", "tirx.exp:float32"]
    ex = tvm.compile(_vectorized(out).with_attr("global_symbol", "main"), TARGET)
    v = np.linspace(-5, 5, 64, dtype=np.float32)
    inner = np.frompyfunc(math.erf, 1, 1)(_sigmoid64(np.tanh(v.astype(np.float64))))
    np.testing.assert_allclose(_run(ex, v), np.exp(inner.astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_other_dtypes_left_alone(dtype):
    x = te.placeholder((8,), dtype, name="x")
    ops = (tirx.exp, tirx.tanh, tirx.erf, tirx.sigmoid)
    y = te.compute((8,), lambda i: sum(f(x[i]) for f in ops), name="y")
    func = te.create_prim_func([x, y])
    tvm.ir.assert_structural_equal(fast_math_pass()(tvm.IRModule({"main": func}))["main"], func)
    assert [c.split(":")[1] for c in _intrinsic_calls(func)] == [dtype] * 4


def test_vector_typed_call_left_alone():
    v = tirx.Var("v", "float32")
    func = tirx.PrimFunc([v], tirx.Evaluate(tirx.exp(tirx.Broadcast(v, 8))))
    assert rewrite_fast_math(func).same_as(func)
    scalar = tirx.PrimFunc([v], tirx.Evaluate(tirx.exp(v)))
    assert _intrinsic_calls(rewrite_fast_math(scalar)) == []


def test_func_without_intrinsics_unchanged():
    x = te.placeholder((8,), "float32", name="x")
    y = te.compute((8,), lambda i: tirx.log(x[i]) * x[i] + 1.0, name="y")
    func = te.create_prim_func([x, y])
    tvm.ir.assert_structural_equal(fast_math_pass()(tvm.IRModule({"main": func}))["main"], func)


def test_relax_module_only_primfuncs_change():
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.tanh(relax.op.exp(xv)))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    new = fast_math_pass()(mod)
    tvm.ir.assert_structural_equal(new["main"], mod["main"])
    prims = [gv for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(prims) == 2
    assert all(_intrinsic_calls(mod[gv]) for gv in prims)
    assert not any(_intrinsic_calls(new[gv]) for gv in prims)


if __name__ == "__main__":
    tvm.testing.main()
