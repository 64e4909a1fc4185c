"""build -> call -> export -> load in a fresh process; budgets; CUDA compile; measured peak."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tvm

import tvm_autochunk as ac
from benchmarks.models import FAMILIES, SMALL_SIZES
from relay_passes.auto_chunk import need_bytes
from relay_passes.estimate_memory import estimate_memory
from tvm_autochunk.measure import measure_peak

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_gpt():
    w = FAMILIES["gpt"](SMALL_SIZES["gpt"])
    mod = ac.from_torch(w.module, w.inputs)
    ref = w.module(*w.inputs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    return w, mod, ref.detach().numpy()


def test_build_call_equals_torch(small_gpt):
    w, mod, ref = small_gpt
    art = ac.build(mod, target="llvm")
    out = art(w.inputs[0].numpy())
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    rep = art.report
    assert isinstance(rep.peak_bytes, int)
    # the built report carries TVM's own plan, and our replay of it agrees
    assert rep.planned_peak_bytes == rep.estimated_peak_bytes
    assert rep.peak_bytes >= rep.planned_peak_bytes


def test_build_does_not_mutate_input(small_gpt):
    _, mod, _ = small_gpt
    before = mod.script()
    ac.build(mod, target="llvm")
    assert mod.script() == before


def test_export_load_in_fresh_process(small_gpt, tmp_path):
    w, mod, ref = small_gpt
    art = ac.build(mod, target="llvm")
    path = art.export(tmp_path / "gpt.so")
    meta = ac.read_metadata(path)
    assert meta["inputs"][0]["shape"] == list(w.inputs[0].shape)
    assert meta["report"]["peak_bytes"] == art.report.peak_bytes
    np.save(tmp_path / "x.npy", w.inputs[0].numpy())
    code = textwrap.dedent(
        f"""
        import sys, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        import tvm_autochunk as ac
        art = ac.load({str(path)!r})
        np.save({str(tmp_path / "y.npy")!r}, art(np.load({str(tmp_path / "x.npy")!r})))
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=1e-4, atol=1e-4)


def test_wrong_inputs_are_clear_errors(small_gpt):
    w, mod, _ = small_gpt
    art = ac.build(mod, target="llvm")
    x = w.inputs[0].numpy()
    with pytest.raises(ac.InputError, match=r"expected 1 input\(s\) \(x\), got 2"):
        art(x, x)
    with pytest.raises(ac.InputError, match="dtype float64, expected float32"):
        art(x.astype("float64"))
    with pytest.raises(ac.InputError, match="shape"):
        art(x[:, :3])


def test_impossible_budget_names_peak_site_and_blocker(small_gpt):
    _, mod, _ = small_gpt
    with pytest.raises(
        ac.BudgetInfeasibleError,
        match=r"cannot fit the budget .* unchunked module needs .* smallest peak reached .* "
        r"after binding .* Blocked by: .* Remedy",
    ):
        ac.build(mod, target="llvm", budget="64KiB")
    need = ac.estimate(mod, "llvm").peak_bytes
    art = ac.build(mod, target="llvm", budget=need)  # exactly enough: no chunking needed
    assert art.report.peak_bytes <= need
    assert art.report.chunking is None


@pytest.mark.parametrize("bad", ["2 parsecs", -5, 0, "", 1.5])
def test_bad_budget_is_budget_error(small_gpt, bad):
    _, mod, _ = small_gpt
    with pytest.raises(ac.BudgetError, match="expected a positive number of bytes"):
        ac.build(mod, target="llvm", budget=bad)


def test_bad_target():
    with pytest.raises(ac.UnsupportedTargetError, match="rejects target strings"):
        ac.resolve_target("llvm -mcpu=skylake")
    with pytest.raises(ac.UnsupportedTargetError, match="invalid CUDA arch"):
        ac.resolve_target("cuda", arch="ampere")


def test_unbounded_dynamic_dim_build_error():
    import torch

    w = FAMILIES["gpt"](64)
    S = torch.export.Dim("S", min=2)  # no max
    mod = ac.from_torch(w.module, w.inputs, dynamic_shapes=({1: S},))
    with pytest.raises(ac.SymbolicShapeError, match="has no upper bound"):
        ac.build(mod, target="llvm")
    name = str(mod["main"].params[0].ty.shape.values[1].name)
    bounded = ac.bound_dims(mod, {name: 128})
    art = ac.build(bounded, target="llvm")
    assert art.report.estimate.symbolic_bounds == ((name, 128),)
    x = np.random.default_rng(0).standard_normal((1, 40, 256)).astype("float32")
    ref = w.module(torch.from_numpy(x))
    ref = (ref[0] if isinstance(ref, tuple) else ref).detach().numpy()
    np.testing.assert_allclose(art(x), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ac.InputError, match="exceeds the bound 128"):
        art(np.zeros((1, 200, 256), "float32"))


def test_cuda_build_compiles(small_gpt, tmp_path):
    _, mod, _ = small_gpt
    art = ac.build(mod, target="cuda", arch="sm_80")
    assert art.meta["target"] == {"kind": "cuda", "arch": "sm_80"}
    # fused + dlight-scheduled: less memory than the CPU build, and TVM's plan agrees
    assert art.report.planned_peak_bytes == art.report.estimated_peak_bytes
    assert art.report.estimate.workspace_bytes == 0
    path = art.export(tmp_path / "gpt_cuda.so")
    assert ac.read_metadata(path)["target"]["kind"] == "cuda"
    if not tvm.cuda(0).exist:
        return
    out = art(np.zeros((1, SMALL_SIZES["gpt"], 256), "float32"))  # pragma: no cover - GPU only
    assert out.shape == (1, SMALL_SIZES["gpt"], 256)  # pragma: no cover


def _gpt_built_and_measured(tmp_path, seq: int, unfused: bool = False):
    """A 1-layer GPT built for llvm, exported, and one call measured in a fresh process."""
    from relay_passes.attention import leave_unfused

    w = FAMILIES["gpt"](seq, layers=1)
    mod = ac.from_torch(w.module, w.inputs)
    art = ac.build(leave_unfused(mod) if unfused else mod, target="llvm")
    path = art.export(tmp_path / f"gpt{seq}.so")
    return art, measure_peak(path, [w.inputs[0].numpy()])


def test_measured_peak_follows_estimate(tmp_path):
    """One call in a fresh process: measured peak RSS within 5% of the run-time estimate
    (GPT-1280 with its attention left unfused: the scores make it 77 MiB)."""
    art, m = _gpt_built_and_measured(tmp_path, 1280, unfused=True)
    rt = art.report.runtime_peak_bytes
    assert rt >= 64 * 2**20
    assert abs(m.peak_bytes - rt) <= 0.05 * m.peak_bytes, json.dumps(
        {"measured": m.peak_bytes, "runtime_estimate": rt, "plan": art.report.planned_peak_bytes}
    )


def test_measured_peak_of_fused_attention_is_within_the_plan(tmp_path):
    """GPT with attention fused (the llvm default), S=7168: memory linear in S. The measured
    peak is within 1% of TVM's plan, which the budget check holds (max of plan and run-time
    estimate). The run-time estimate is one (S, 256) tensor under it here (the final output is
    modelled as reusing a freed block, and is not: docs/design.md, not explained yet)."""
    art, m = _gpt_built_and_measured(tmp_path, 7168)
    plan = art.report.planned_peak_bytes
    assert plan >= 64 * 2**20
    assert abs(m.peak_bytes - plan) <= 0.01 * m.peak_bytes, json.dumps(
        {"measured": m.peak_bytes, "runtime_estimate": art.report.runtime_peak_bytes,
         "plan": plan}
    )


def test_build_with_budget_chunks_and_keeps_outputs(gpt):
    mod, x, ref = gpt
    need = need_bytes(estimate_memory(mod, "llvm"))
    budget = int(need * 0.8)  # attention fused: 3.5 MiB of 5.6 is K, V and the residual stream
    art = ac.build(mod, "llvm", budget=budget)
    assert art.report.planned_peak_bytes <= budget  # TVM's own plan
    assert art.report.peak_bytes <= budget
    regions = art.report.chunking["regions"]
    assert regions and all(r["chunk"] > 1 for r in regions)
    out = art(x)
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) <= 1e-5
