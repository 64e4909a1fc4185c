"""relay_passes.driver: peaks no chunking can lower (the floors). A refusal names what is left
(the module's outputs, tensors computed from weights alone) and what to do, and its
``min_budget`` builds (``driver.floor_note``)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import attention as _attention
from _helpers import relax_module as _module
from tvm import relax

import tvm_autochunk as ac

op = relax.op
RNG = np.random.default_rng(0)


def test_peak_is_the_output_no_chunking_can_help():
    mod = _module(lambda bb, x: op.multiply(x, relax.const(2.0)), [(256, 256)])
    with pytest.raises(ac.BudgetInfeasibleError) as ei:
        ac.build(mod, budget="64KiB")
    e, msg = ei.value, str(ei.value)
    assert "No chunking can help here" in msg
    assert "256.00 KiB are the module's outputs ('gv' 256x256 float32)" in msg
    assert "the budget is below them alone" in msg and "return smaller outputs" in msg
    assert e.min_budget == e.unchunked_peak == 256 * 256 * 4
    art = ac.build(mod, budget=e.min_budget)
    assert art.report.chunking is None and art.report.peak_bytes <= e.min_budget


def test_outputs_set_the_floor_after_chunking():
    """Chunking lowers the peak, but the two outputs (200 KiB) are most of what is left."""

    def body(bb, x):
        return relax.Tuple([bb.emit(_attention(bb, x), "a"), op.tanh(x)])

    mod = _module(body, [(160, 160)])
    with pytest.raises(ac.BudgetInfeasibleError) as ei:
        ac.build(mod, budget="1KiB")
    e, msg = ei.value, str(ei.value)
    assert e.best_peak < e.unchunked_peak
    assert "Chunking cannot go lower: of the smallest peak, 200.00 KiB are the module's " in msg
    assert "outputs ('a' 160x160 float32, " in msg and "return smaller outputs" in msg
    art = ac.build(mod, budget=e.min_budget)
    assert art.report.chunking["regions"] and art.report.planned_peak_bytes <= e.min_budget


def test_peak_computed_from_weights_alone():
    """A scaled 512x512 constant weight (1 MiB) is the peak: it depends on no parameter, so
    there is no dim to chunk it along. (A transpose would not do: build folds weight layouts.)"""
    w = (RNG.standard_normal((512, 512)) / 23).astype("float32")
    mod = _module(
        lambda bb, x: op.matmul(
            x, bb.emit(op.multiply(relax.const(w), relax.const(2.0, "float32")), "wt_t")
        ),
        [(4, 512)],
    )
    assert ac.estimate(mod).weight_bytes == 512 * 512 * 4 + 4  # apart, not in the budget
    with pytest.raises(ac.BudgetInfeasibleError) as ei:
        ac.build(mod, budget="64KiB")
    msg = str(ei.value)
    assert "No chunking can help here" in msg
    assert "1.00 MiB are tensors computed from weights alone ('wt_t' 512x512 float32)" in msg
    assert "precompute the weight-only tensors offline" in msg
    assert ei.value.min_budget == ei.value.unchunked_peak


def test_weight_parameter_is_chunked_along_its_own_dims():
    """The same model with the weight as a parameter past ``num_input`` (keep_params_as_input):
    it counts as a weight (not an input), and unlike a constant its transpose is chunked along
    the weight's own dims, so the budget a constant cannot meet builds, and computes the same.
    (So ``floor_note`` counts weight parameters as parameters: no floor there.)"""
    from relay_passes.estimate_memory import estimate_memory

    mod = _module(
        lambda bb, x, w: op.matmul(x, bb.emit(op.permute_dims(w, [1, 0]), "wt_t")),
        [(4, 512), (512, 512)],
        attrs={"num_input": 1},
    )
    prof = estimate_memory(mod)
    assert prof.weight_bytes == 512 * 512 * 4 and prof.input_bytes == 4 * 512 * 4
    assert prof.peak_bytes >= 512 * 512 * 4  # unchunked, the transpose is the peak
    art = ac.build(mod, budget="64KiB")
    assert art.report.chunking["regions"] and art.report.peak_bytes <= 64 * 1024
    x = RNG.standard_normal((4, 512)).astype("float32")
    w = (RNG.standard_normal((512, 512)) / 23).astype("float32")
    np.testing.assert_allclose(art.load_params({"x1": w})(x), x @ w.T, rtol=1e-5, atol=1e-5)


def test_a_refused_budget_is_searched_again_aiming_lower(monkeypatch):
    """The greedy search's path follows its aim, and aiming lower can take a path that fits
    (Evoformer-128 once stopped at 41% of its peak aiming at 25%, and fitted aiming at 75% of
    that; since the chunk loops' arguments are planned, both aims fit). The driver searches
    again aiming under the budget and keeps a plan that fits it, with a note saying so. Here
    the search aiming at the budget itself is made to refuse, as that path did."""
    from benchmarks.models import FAMILIES
    from relay_passes import driver
    from relay_passes.auto_chunk import need_bytes
    from relay_passes.estimate_memory import estimate_memory
    from relay_passes.fold_weight_layouts import fold_weight_layouts

    w = FAMILIES["evoformer"](128)
    mod = fold_weight_layouts(ac.from_torch(w.module, w.inputs))
    prof = estimate_memory(mod, "llvm")
    budget = need_bytes(prof) // 4
    real = driver.auto_chunk
    aims = []

    def refusing(*args, explore=None, **kw):
        if explore is None:  # the search aiming at the budget itself
            raise ac.BudgetInfeasibleError("stuck", budget=args[2], best_peak=args[2] + 1,
                                           unchunked_peak=need_bytes(prof))
        aims.append(explore)
        return real(*args, explore=explore, **kw)

    monkeypatch.setattr(driver, "auto_chunk", refusing)
    _, res = driver.chunk_to_budget(mod, "llvm", budget, profile=prof)
    assert res.final_peak <= budget and res.budget_bytes == budget
    assert aims and aims[0] == int(budget * driver.DEEPER_AIMS[0])
    found = [n for n in res.notes if n.startswith("found aiming at 75% of the budget, then re-fit")]
    assert found, res.notes
