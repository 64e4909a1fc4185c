"""relay_passes.gpu_schedules: no kernel of the four CUDA builds (unchunked and chunked) is left
to dlight's Fallback, and a lone max-type row reduction gets a cross-thread (tree) reduction.
No GPU needed: the rules are applied to the PrimFuncs TVM's CUDA pipeline makes."""

from __future__ import annotations

import shutil

import pytest
import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

import tvm_autochunk as ac
from benchmarks.models import FAMILIES
from relay_passes import gpu_schedules
from relay_passes.auto_chunk import auto_chunk, need_bytes
from relay_passes.estimate_memory import estimate_memory
from relay_passes.lowering import legalize_passes

CUDA = tvm.target.Target(ac.resolve_target("cuda", "sm_80"))

# family: (size, model kwargs, a budget share of the unchunked peak that chunks on CUDA)
CASES = {
    "gpt": (1024, {"layers": 1}, 0.5),
    "vit": (1024, {"layers": 1}, 0.6),
    "evoformer": (64, {}, 0.6),
    "unet": (32, {}, 0.5),
}


def _fused(mod):
    """The PrimFuncs TVM's CUDA pipeline hands to the schedule rules (fused, unscheduled)."""
    passes = [p for p in legalize_passes(CUDA) if p.info.name != "ApplyDefaultSchedule"]
    with CUDA:
        out = tvm.transform.Sequential(passes)(mod)
    return {gv.name_hint: f for gv, f in out.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def _left_to_fallback(mod) -> list[str]:
    return sorted(n for n, f in _fused(mod).items()
                  if gpu_schedules.rule_for(f, CUDA) in ("Fallback", None))


@pytest.mark.parametrize("family", sorted(CASES))
def test_no_cuda_kernel_is_left_to_fallback(family):
    size, kw, share = CASES[family]
    w = FAMILIES[family](size, **kw)
    mod = ac.from_torch(w.module, w.inputs)
    assert _left_to_fallback(mod) == []
    peak = need_bytes(estimate_memory(mod, CUDA))
    chunked, res = auto_chunk(mod, CUDA, int(peak * share))
    assert res.stages, f"{family}: a {share:.0%} budget should chunk"
    assert _left_to_fallback(chunked) == []


def _row_max(dtype="int8", shape=(64, 1000)):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.max(x, axis=[-1], keepdims=True)))
    mod = relax.transform.LegalizeOps()(bb.get())
    return next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("dtype,shape", [("int8", (64, 1000)), ("float32", (3, 5, 77)),
                                         ("float32", (4096,))])
def test_row_max_gets_a_tree_reduction_not_fallback(dtype, shape, monkeypatch):
    # CUDA source only: whether TVM would compile it (nvrtc, nvcc) depends on what this
    # process loaded before (a CUDA build loads the CUDA runtime)
    monkeypatch.setenv("TVM_COMPILE_FORCE_FALLBACK", "1")
    func = _row_max(dtype, shape)
    dlight_only = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
    assert all(r.apply(func, CUDA, False) is None for r in dlight_only)  # what Fallback got
    assert gpu_schedules.rule_for(func, CUDA) == "RowReduction"
    sch = gpu_schedules.RowReduction().apply(func, CUDA, False)
    text = sch.mod.script()
    assert 'thread="threadIdx.x"' in text and 'thread="blockIdx.x"' in text
    src = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=CUDA)
    cuda = "".join(m.inspect_source() for m in src.mod.imports)
    # a cross-thread reduction: shared-memory tree steps or warp shuffles
    assert "__syncthreads" in cuda or "__shfl" in cuda


@pytest.mark.cuda_build
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_masked_attention_builds_for_cuda_with_its_check_on_the_row_rule(tmp_path):
    """A mask keeps torch's safe-softmax check (its ``any`` is an int8 row max): the CUDA build
    schedules it with RowReduction and compiles with nvcc."""
    import torch
    import torch.nn.functional as F

    class Masked(torch.nn.Module):
        def forward(self, q, m):
            return F.scaled_dot_product_attention(q, q, q, attn_mask=m)

    q, m = torch.randn(1, 2, 64, 16), torch.zeros(64, 64)
    mod = ac.from_torch(Masked(), (q, m))
    rules = {n: gpu_schedules.rule_for(f, CUDA) for n, f in _fused(mod).items()}
    assert "RowReduction" in rules.values() and "Fallback" not in rules.values(), rules
    art = ac.build(mod, "cuda", arch="sm_80")
    assert art.export(tmp_path / "masked.so").exists()
