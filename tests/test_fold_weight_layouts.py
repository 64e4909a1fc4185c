"""relay_passes.fold_weight_layouts: weight transposes and reshapes become constants once, at
build time; nothing else is evaluated, outputs stay equal, and the per-call copies leave the
plan."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_autochunk as ac
from benchmarks.models import FAMILIES
from relay_passes import _compat as C
from relay_passes.estimate_memory import estimate_memory, weight_bytes
from relay_passes.fold_weight_layouts import FoldWeightLayouts, fold_weight_layouts

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def _calls(mod, name):
    found = []

    def visit(e):
        if isinstance(e, C.Call) and C.op_name(e) == name:
            found.append(e)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return (out[0] if not hasattr(out, "numpy") else out).numpy()


@pytest.fixture(scope="module")
def gpt():
    w = FAMILIES["gpt"](64, d=64, heads=2, layers=1)
    return ac.from_torch(w.module, w.inputs), w.inputs[0].numpy()


def test_weight_transposes_fold_and_outputs_stay_equal(gpt):
    mod, x = gpt
    weights_t = [c for c in _calls(mod, "relax.permute_dims")
                 if isinstance(c.args[0], C.GenericConst)]
    assert len(weights_t) == 4  # qkv, proj, fc, fc_out
    folded = fold_weight_layouts(mod)
    assert not [c for c in _calls(folded, "relax.permute_dims")
                if isinstance(c.args[0], C.GenericConst)]
    # the activations' transposes (q, k, v heads) and the causal mask stay computed
    assert len(_calls(folded, "relax.permute_dims")) == len(_calls(mod, "relax.permute_dims")) - 4
    assert _calls(folded, "relax.arange") and _calls(folded, "relax.where")
    # each weight is stored once, transposed: no constant is added
    assert weight_bytes(folded) == weight_bytes(mod)
    np.testing.assert_array_equal(_run(folded, x), _run(mod, x))
    tvm.ir.assert_structural_equal(FoldWeightLayouts(mod), folded)  # the pass form


def test_the_copies_leave_the_plan_and_build_estimates_the_folded_module(gpt):
    mod, _ = gpt
    folded = fold_weight_layouts(mod)
    before = estimate_memory(mod, ac.resolve_target("llvm"))
    after = estimate_memory(folded, ac.resolve_target("llvm"))
    copies = {str(b.var.name) for blk in mod["main"].body.blocks for b in blk.bindings
              if isinstance(b.value, C.Call) and C.op_name(b.value) == "relax.permute_dims"
              and isinstance(b.value.args[0], C.GenericConst)}
    assert copies and not copies & {e.name for e in after.timeline}
    assert copies <= {e.name for e in before.timeline}
    assert after.peak_bytes <= before.peak_bytes
    # build() folds before it plans, and estimate() does the same: the two agree
    art = ac.build(mod, "llvm")
    assert ac.estimate(mod).peak_bytes == art.report.peak_bytes


def test_a_module_without_weight_layouts_is_returned_as_is():
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.permute_dims(x)))
    mod = bb.get()
    assert fold_weight_layouts(mod).same_as(mod)
