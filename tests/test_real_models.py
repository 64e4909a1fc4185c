"""Library models (transformers, diffusers; benchmarks/real_models.py) at tiny sizes: each
imports, builds equal to torch with every attention fused, and chunks under a budget.

Needs the ``bench`` extra, which ``make venv`` installs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import op_names

import relay_passes.dimflow_rules  # noqa: F401  (registers the built-in rules)
import tvm_autochunk as ac
from benchmarks.models import SMALL_SIZES, workload
from benchmarks.real_models import REAL_FAMILIES, REAL_SMALL_SIZES
from relay_passes.attention import fuse_attention
from relay_passes.dimflow import get_dim_rule
from relay_passes.fold_weight_layouts import fold_weight_layouts

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

# ops of each benchmark model with no dim-flow rule (a region stops there); call_tir is the
# fused attention, which regions cover through the unfused graph the search reads
NO_RULE = {fam: {"relax.call_tir"} for fam in [*SMALL_SIZES, *REAL_SMALL_SIZES]}
NO_RULE["hf_bert"] |= {"relax.gather_elements"}  # token_type_ids' buffered expand: not chunked


def _torch(w) -> np.ndarray:
    with torch.no_grad():
        return w.module(*w.inputs).numpy()


@pytest.mark.parametrize("fam", sorted(REAL_FAMILIES))
def test_library_model_builds_equal_to_torch_with_attention_fused(fam):
    w = workload(fam, REAL_SMALL_SIZES[fam])
    mod = ac.from_torch(w.module, w.inputs)
    before = op_names(mod)
    # the masks transformers builds (all True, causal) read as such: no safe-softmax check
    assert "relax.max" not in before and "relax.nn.softmax" in before, before
    assert "relax.nn.softmax" not in op_names(fuse_attention(fold_weight_layouts(mod)))
    got = ac.build(mod, "llvm")(*[x.numpy() for x in w.inputs])
    np.testing.assert_allclose(got, _torch(w), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("fam", [*sorted(SMALL_SIZES), *sorted(REAL_SMALL_SIZES)])
def test_ops_without_a_dim_flow_rule(fam):
    kw = {"layers": 1} if fam in ("gpt", "vit") else {}
    size = {**SMALL_SIZES, **REAL_SMALL_SIZES}[fam]
    w = workload(fam, size, **kw)
    mod = fuse_attention(fold_weight_layouts(ac.from_torch(w.module, w.inputs)))
    missing = {op for op in op_names(mod) if get_dim_rule(op) is None}
    assert missing == NO_RULE[fam]


@pytest.mark.parametrize("fam,size,share", [("hf_gpt2", 256, 0.5), ("hf_bert", 256, 0.7)])
def test_library_model_chunks_under_a_budget(fam, size, share):
    w = workload(fam, size)
    mod = ac.from_torch(w.module, w.inputs)
    peak = ac.build(mod, "llvm").report.peak_bytes
    art = ac.build(mod, "llvm", budget=int(peak * share))
    assert art.report.peak_bytes <= int(peak * share)
    ch = art.report.to_dict()["chunking"]
    assert ch["regions"], "no region was chunked"
    if fam == "hf_gpt2":  # the search's first plan: 256 calls of 1 row, 177 ms predicted
        assert ch["predicted_overhead_us"] < 20_000, ch  # its second look: 16 + 2 calls
        assert any("candidates per stage" in n for n in ch["notes"]), ch["notes"]
    got = art(*[x.numpy() for x in w.inputs])
    np.testing.assert_allclose(got, _torch(w), rtol=2e-4, atol=2e-4)
