"""relay_passes.estimate_memory against TVM's own plan on the four model families (torch.export
-> Relax): the estimate must be within 2% of the plan read off StaticPlanBlockMemory (it
replays the planner, so in practice it is exact), on llvm and CUDA, at a dynamic dim's bound,
and growing with the sequence as attention does. Small sizes keep this CPU-fast; the benchmark
``benchmarks/estimator_accuracy.py`` covers the large sizes and the measured peak."""

from __future__ import annotations

import pytest
import tvm
from _helpers import family_module as _mod  # (family, size) -> Relax module, built once

import tvm_autochunk as ac
from benchmarks.models import FAMILIES, SMALL_SIZES
from relay_passes.estimate_memory import estimate_memory
from relay_passes.planned_memory import planned_memory

CASES = [(f, SMALL_SIZES[f]) for f in FAMILIES] + [
    ("gpt", 256),
    ("vit", 256),
    ("evoformer", 32),
    ("unet", 32),
]


@pytest.mark.parametrize(("family", "size"), CASES)
def test_estimate_within_2pct_of_tvm_plan_llvm(family, size):
    mod = _mod(family, size)
    est = estimate_memory(mod, "llvm")
    plan = planned_memory(mod, "llvm")
    assert plan.peak_bytes > 0
    assert abs(est.peak_bytes - plan.peak_bytes) <= 0.02 * plan.peak_bytes, (est, plan)
    # the parts agree too, not only the sum
    assert est.frame.storage_bytes == plan.frame("main").storage_bytes
    assert est.workspace_bytes == plan.workspace_bytes
    # the live-set view is consistent with the totals
    assert 0 < est.live_peak_bytes <= est.peak_bytes + est.workspace_bytes
    # the run-time pool holds at least the largest tensor live at the peak (not always every
    # storage: blocks freed after their last use are reused, KillAfterLastUse)
    assert est.runtime_peak_bytes >= max(r.nbytes for r in est.live_at_peak)
    assert sum(r.nbytes for r in est.live_at_peak) <= est.live_peak_bytes


@pytest.mark.parametrize("family", ["gpt", "unet"])
def test_estimate_matches_tvm_plan_cuda(family):
    mod = _mod(family, SMALL_SIZES[family])
    tgt = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    est = estimate_memory(mod, tgt)
    plan = planned_memory(mod, tgt)
    assert abs(est.peak_bytes - plan.peak_bytes) <= 0.02 * plan.peak_bytes
    if family == "gpt":
        # CUDA's FuseOps removes the MLP's intermediates (attention is fused on both targets);
        # UNet's CPU peak is lower: attention is its peak, and the CPU kernel keeps no scores
        assert est.peak_bytes < estimate_memory(mod, "llvm").peak_bytes


def test_peak_grows_linearly_with_sequence_when_attention_is_fused():
    # on llvm attention is one kernel (relay_passes.attention): no S x S scores and no S x S
    # causal mask, so doubling S about doubles the peak (unfused, S=1024 -> 2048 was 3.9x).
    # S is not 1024, the MLP's width
    small = estimate_memory(_mod("gpt", 768), "llvm")
    big = estimate_memory(_mod("gpt", 1536), "llvm")
    assert 1.8 < big.peak_bytes / small.peak_bytes < 2.5  # the plan packs a little worse
    assert all(list(r.shape).count(768) < 2 for r in small.live_at_peak)  # no S x S tensor


def test_dynamic_dim_estimated_at_upper_bound():
    import torch

    w = FAMILIES["gpt"](64)
    S = torch.export.Dim("S", min=2, max=320)
    dyn = ac.from_torch(w.module, w.inputs, dynamic_shapes=({1: S},))
    est = estimate_memory(dyn, "llvm")
    assert est.symbolic_bounds and est.symbolic_bounds[0][1] == 320
    static = estimate_memory(_mod("gpt", 320), "llvm")
    assert est.peak_bytes == planned_memory(dyn, "llvm").peak_bytes
    # planned at the bound. Attention over the symbolic length is fused too (its kernel has
    # symbolic extents): no 320 x 320 scores, and about the static model's peak
    from relay_passes.attention import Module, find_attention

    found = find_attention(Module(dyn), "main")
    assert len(found) == 2 and all(m.shape.sq == m.shape.sk == "s27" for m in found)
    assert not any(tuple(r.shape)[-2:] == (320, 320) for r in est.live_at_peak)  # no S x S
    assert 0.9 * static.peak_bytes <= est.peak_bytes <= 1.1 * static.peak_bytes


def test_weight_parameters_estimate_matches_tvm_plan():
    """keep_params_as_input: the weights are parameters past ``num_input``, detached as build()
    does. They count as weights (not inputs, not activations), and the estimate still equals
    TVM's plan and the peak of the same model with its weights as constants."""
    from tvm_autochunk.weights import detach

    w = FAMILIES["gpt"](SMALL_SIZES["gpt"])
    mod, weights = detach(ac.from_torch(w.module, w.inputs, keep_params_as_input=True))
    assert len(weights) == len(mod["main"].params) - 1 == len(list(w.module.parameters()))
    est, plan = estimate_memory(mod, "llvm"), planned_memory(mod, "llvm")
    assert est.peak_bytes == plan.peak_bytes > 0
    assert est.frame.storage_bytes == plan.frame("main").storage_bytes
    const = estimate_memory(_mod("gpt", SMALL_SIZES["gpt"]), "llvm")
    assert est.peak_bytes == const.peak_bytes and est.weight_bytes == const.weight_bytes
    assert est.input_bytes == const.input_bytes == w.inputs[0].numel() * 4
    assert est.weight_bytes >= sum(t.numpy().nbytes for t in weights)
