"""The registered ``autochunk`` pipeline and ``build`` are one driver: same plans, same checks,
same errors (``relay_passes.driver.AutochunkPipeline``)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import relay_passes.pipeline  # noqa: F401  (registers "autochunk")
import tvm_autochunk as ac
from benchmarks.models import FAMILIES
from relay_passes.attention import leave_unfused
from relay_passes.auto_chunk import need_bytes
from relay_passes.errors import BudgetInfeasibleError, UnsupportedTargetError
from relay_passes.estimate_memory import estimate_memory

LLVM = ac.resolve_target("llvm")  # what build() compiles for: the same kernels


# GPT with its attention left unfused (relay_passes.attention.leave_unfused): its S x S scores
# are the peak, so budgets well under it are met by chunking, as on CUDA. On llvm the fused
# kernel keeps no scores and the model barely chunks (tests/test_attention.py builds it so).
@pytest.fixture(scope="module")
def gpt():
    w = FAMILIES["gpt"](512, layers=1)
    mod = leave_unfused(ac.from_torch(w.module, w.inputs))
    x = w.inputs[0].numpy()
    return mod, x, ac.estimate(mod).peak_bytes


@pytest.fixture(scope="module")
def gpt512(gpt512):
    mod, x, out = gpt512
    return leave_unfused(mod), x, out


def _registered(mod, budget):
    """tvm.compile with the registered pipeline: (executable, the pipeline pass)."""
    p = relax.get_pipeline("autochunk", budget_bytes=budget)
    return tvm.compile(mod, target=LLVM, relax_pipeline=p), p


@pytest.mark.parametrize("share", [0.6, 0.8])
def test_build_and_the_registered_pipeline_pick_the_same_plan(gpt, share):
    mod, x, peak = gpt
    budget = int(peak * share)
    art = ac.build(mod, "llvm", budget=budget)
    ex, p = _registered(mod, budget)
    assert art.report.chunking["regions"], "expected a chunked build"
    assert p.chunking["regions"] == art.report.chunking["regions"]
    assert p.plan == art.report.planned
    assert p.plan.peak_bytes <= budget
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x))[0].numpy()
    np.testing.assert_allclose(got, art(x), rtol=1e-5, atol=1e-6)


def test_build_and_the_registered_pipeline_raise_the_same_error(gpt):
    mod, _, _ = gpt
    with pytest.raises(BudgetInfeasibleError) as built:
        ac.build(mod, "llvm", budget=1000)
    p = relax.get_pipeline("autochunk", budget_bytes=1000)
    with pytest.raises(BudgetInfeasibleError) as compiled:
        tvm.compile(mod, target=LLVM, relax_pipeline=p)
    assert str(compiled.value) == str(built.value)
    # the fields cross TVM's FFI only as text: the pass keeps the error itself
    assert p.error.fields() == built.value.fields()
    assert built.value.budget == 1000 and built.value.min_budget > built.value.best_peak


def test_the_plan_check_refuses_the_same_way_through_both(gpt, monkeypatch):
    """TVM's plan over the budget after every attempt: one refusal, naming the plan."""
    import dataclasses

    import relay_passes.driver as drv

    mod, _, peak = gpt
    budget = int(peak * 0.7)  # above the floor after two searches aiming 5% lower
    real = drv.read_plan
    monkeypatch.setattr(
        drv, "read_plan", lambda *a: dataclasses.replace(real(*a), peak_bytes=budget + 1)
    )
    with pytest.raises(BudgetInfeasibleError, match="TVM's memory plan needs") as built:
        ac.build(mod, "llvm", budget=budget)
    with pytest.raises(BudgetInfeasibleError) as compiled:
        _registered(mod, budget)
    assert str(compiled.value) == str(built.value)
    assert built.value.planned_peak == budget + 1


def test_without_a_budget_the_pipeline_is_tvms_with_the_plan_read(gpt):
    mod, x, _ = gpt
    ex = tvm.compile(mod, target=LLVM, relax_pipeline="autochunk")
    base = ac.build(mod, "llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
    np.testing.assert_allclose(got, base(x), rtol=1e-6)
    assert base.report.chunking is None and base.report.planned is not None


def test_the_pipeline_needs_a_target(gpt):
    p = relax.get_pipeline("autochunk", budget_bytes=10**9)
    with pytest.raises(UnsupportedTargetError, match="needs a target"):
        p(gpt[0])


def test_registered_pipeline_with_tvm_compile(gpt512):
    import tvm
    from tvm import relax

    import relay_passes  # noqa: F401  (registers "autochunk")
    from relay_passes.pipeline import register_autochunk_pipeline

    register_autochunk_pipeline()
    mod, x, ref = gpt512
    need = need_bytes(estimate_memory(mod, "llvm"))
    tgt = tvm.target.Target("llvm")
    ex = tvm.compile(
        mod,
        target=tgt,
        relax_pipeline=relax.get_pipeline("autochunk", budget_bytes=int(need * 0.6)),
    )
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))[0].numpy()
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) <= 1e-5
    # by name, without a budget: TVM's pipeline plus the plan check
    ex2 = tvm.compile(mod, target=tgt, relax_pipeline="autochunk")
    vm2 = relax.VirtualMachine(ex2, tvm.cpu())
    out2 = vm2["main"](tvm.runtime.tensor(x))[0].numpy()  # a plain llvm target: other vectors
    assert float(np.abs(out2 - ref).max() / np.abs(ref).max()) <= 1e-5


def test_build_tightens_and_retries_when_the_built_plan_is_over(gpt512, monkeypatch):
    """The promise is checked on TVM's plan; if it were over, the driver searches again aiming
    lower instead of returning an over-budget artifact."""
    import dataclasses

    import relay_passes.driver as drv

    mod, x, ref = gpt512
    budget = int(need_bytes(estimate_memory(mod, "llvm")) * 0.6)
    calls = []
    real = drv.read_plan

    def first_time_over(*args):
        plan = real(*args)
        calls.append(plan.peak_bytes)
        return dataclasses.replace(plan, peak_bytes=budget + 1) if len(calls) == 1 else plan

    monkeypatch.setattr(drv, "read_plan", first_time_over)
    msgs = []
    art = ac.build(mod, "llvm", budget=budget, progress=msgs.append)
    assert len(calls) == 2
    assert any("searching again for" in m for m in msgs)
    assert art.report.peak_bytes <= budget
    np.testing.assert_allclose(art(x), ref, rtol=1e-5, atol=1e-5)


def test_build_searches_balanced_chunks_when_tvm_cannot_build_a_kernel(gpt512, monkeypatch):
    """A chunked module has kernels at new shapes, and TVM may fail on one (a TVM bug: see
    the next test). build then searches again with balanced chunks (other shapes) and says so
    in the report, instead of failing."""
    import tvm

    import relay_passes.driver as drv
    from relay_passes.errors import BuildError

    mod, x, ref = gpt512
    need = need_bytes(estimate_memory(mod, "llvm"))
    budget = int(need * 0.6)
    real = tvm.compile
    seen = []

    def first_chunked_build_fails(m, target=None, relax_pipeline=None, **kw):
        ex = real(m, target=target, relax_pipeline=relax_pipeline, **kw)
        seen.append([(r["chunk"], r["n_chunks"]) for r in relax_pipeline.chunking["regions"]])
        if len(seen) == 1:
            raise RuntimeError("(injected)")  # as TVM's codegen fails, after the pipeline
        return ex

    monkeypatch.setattr(tvm, "compile", first_chunked_build_fails)
    msgs = []
    art = ac.build(mod, "llvm", budget=budget, progress=msgs.append)
    assert len(seen) == 2 and any("balanced chunks" in m for m in msgs)
    assert "injected" in art.report.chunking["fallback"]
    from relay_passes.chunk_region import analyze_region

    for r in art.report.chunking["regions"]:  # balanced: ceil(extent / n) rows per chunk
        extent = analyze_region(mod, r["start"], r["end"], r["seed"], r["dim"]).extent
        assert r["chunk"] == -(-extent // r["n_chunks"]), r
    assert art.report.planned_peak_bytes <= budget
    np.testing.assert_allclose(art(x), ref, rtol=1e-5, atol=1e-5)

    # a second failure is an error that names both
    def always_fails(m, target=None, relax_pipeline=None, **kw):
        real(m, target=target, relax_pipeline=relax_pipeline, **kw)
        raise RuntimeError("(injected again)")

    monkeypatch.setattr(tvm, "compile", always_fails)
    with pytest.raises(BuildError, match="first plan failed too"):
        ac.build(mod, "llvm", budget=budget)
    # balanced chunks can need more memory near the floor: when they cannot meet the budget,
    # the error says why the first plan was dropped (not a bare BudgetInfeasibleError)
    seen.clear()
    monkeypatch.setattr(tvm, "compile", first_chunked_build_fails)
    real_search = drv.auto_chunk

    def balanced_refused(m, tgt, budget_bytes, **kw):
        if kw.get("options") is not None and kw["options"].last_chunk == "balanced":
            raise BudgetInfeasibleError(budget=budget_bytes, unchunked_peak=need,
                                        best_peak=budget_bytes + 1, min_budget=need)
        return real_search(m, tgt, budget_bytes, **kw)

    monkeypatch.setattr(drv, "auto_chunk", balanced_refused)
    with pytest.raises(BuildError, match=r"balanced chunks .* cannot be met"):
        ac.build(mod, "llvm", budget=budget)


def test_tvm_kernel_bug_at_a_chunk_shape_is_avoided():
    """Found by fuzzing (seed 80): chunking 5904 rows in 32 calls of 190 leaves a 14-row last
    chunk, and TVM 0.27's llvm code for silu on a (4, 14) float32 tensor fails LLVM's
    verifier ("Instruction does not dominate all uses"). The build falls back to balanced
    chunks and its output equals the unchunked build's."""
    from benchmarks.fuzz_graphs import Recipe, from_recipe

    recipe = Recipe.from_json(
        '{"dtype": "float32", "inputs": [[2, 123, 48], [2, 123, 8]], "outputs": [14], '
        '"seed": 439130407, "steps": [{"args": [1, 1], "axis": 0, "op": "concat"}, '
        '{"args": [2], "fn": "add", "ndim": 3, "op": "bias"}, {"args": [3], "fn": "subtract", '
        '"ndim": 3, "op": "bias"}, {"args": [1], "bias": true, "op": "linear", "out": 32}, '
        '{"args": [5], "fn": "relu", "op": "unary"}, {"args": [6], "bias": false, "op": '
        '"linear", "out": 8}, {"args": [4], "op": "reshape", "shape": [4, 984]}, {"args": '
        '[8, 8], "fn": "add", "op": "binary"}, {"args": [9], "fn": "multiply", "ndim": 2, '
        '"op": "bias"}, {"args": [10], "bias": true, "op": "linear", "out": 5904}, {"args": '
        '[11], "fn": "silu", "op": "unary"}, {"args": [12], "bias": false, "op": "linear", '
        '"out": 984}, {"args": [10, 13], "fn": "add", "op": "binary"}]}'
    )
    g = from_recipe(recipe)
    xs = g.inputs(0)
    art = ac.build(g.mod, "llvm", budget=215357)
    assert art.report.planned_peak_bytes <= 215357
    np.testing.assert_allclose(art(*xs), ac.build(g.mod, "llvm")(*xs), rtol=1e-5, atol=1e-6)
