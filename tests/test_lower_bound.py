"""relay_passes.lower_bound: the smallest peak any chunking the search can build could reach
(issue 22, item 5). Exact on small graphs; on the models, never above what the search reaches
(the fuzz checker holds every fuzzed graph to that too: ``benchmarks/fuzz.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from tvm import relax

import tvm_autochunk as ac
from relay_passes.auto_chunk import auto_chunk, need_bytes
from relay_passes.errors import BudgetInfeasibleError
from relay_passes.estimate_memory import estimate_memory
from relay_passes.fold_weight_layouts import fold_weight_layouts
from relay_passes.lower_bound import lower_bound

ROWS, COLS = 256, 64
TENSOR = ROWS * COLS * 4


def _module(middle):
    """x -> a = exp(x) -> b = middle(a) -> out = b * 2, one dataflow block."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((ROWS, COLS), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.exp(x), name_hint="a")
            b = bb.emit(middle(a), name_hint="b")
            out = bb.emit_output(
                relax.op.multiply(b, relax.const(2.0, "float32")), name_hint="out"
            )
        bb.emit_func_output(out)
    return bb.get()


def test_an_elementwise_chain_can_go_down_to_its_output():
    """Each op may write over its dying input, so one whole tensor is all a point needs."""
    mod = _module(lambda a: relax.op.add(a, relax.const(1.0, "float32")))
    lb = lower_bound(mod, "llvm")
    assert lb.nbytes == TENSOR
    prof = estimate_memory(mod, "llvm")
    # unchunked: two planned storages (an op's input and output) and the returned tensor
    assert need_bytes(prof) == 3 * TENSOR
    with pytest.raises(BudgetInfeasibleError) as e:
        auto_chunk(mod, "llvm", 1, profile=prof)
    assert lb.nbytes <= e.value.best_peak


def test_a_barrier_keeps_its_input_and_output_whole():
    """No region can hold einsum (no dim-flow rule): its input and output are whole while it
    runs, and the bound names them."""
    w = relax.const(np.eye(COLS, dtype="float32"))
    mod = _module(lambda a: relax.op.einsum((a, w), "ij,jk->ik"))
    lb = lower_bound(mod, "llvm")
    assert lb.nbytes == 2 * TENSOR
    assert (lb.at, lb.region) == ("b", "")
    assert {h.name for h in lb.held} == {"a", "b"}
    assert "unchunked; whole there: 'a' 64.00 KiB, 'b' 64.00 KiB" in lb.describe()


def test_a_view_of_a_parameter_holds_nothing():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 127, 42), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            v = bb.emit(relax.op.reshape(x, (3, 127 * 42)))
            out = bb.emit_output(v)
        bb.emit_func_output(out)
    assert lower_bound(bb.get(), "llvm").nbytes == 0


def test_the_bound_is_under_the_floor_and_in_refusals_and_reports(gpt):
    """GPT-512: under the unchunked peak and under the smallest peak the search reaches; a
    refusal names it, and a chunked build's report shows it."""
    mod = gpt[0]
    folded = fold_weight_layouts(mod)
    prof = estimate_memory(folded, "llvm")
    lb = lower_bound(folded, "llvm")
    assert 0 < lb.nbytes < need_bytes(prof)
    with pytest.raises(BudgetInfeasibleError) as e:
        ac.build(mod, "llvm", budget=lb.nbytes // 2)
    err = e.value
    assert err.lower_bound == lb.nbytes <= err.best_peak
    assert f"No chunking the search can build peaks under {lb.describe()}" in str(err)
    art = ac.build(mod, "llvm", budget=err.min_budget)
    ch = art.report.chunking
    assert ch["lower_bound_bytes"] == lb.nbytes <= art.report.peak_bytes
    assert "lower bound (no chunking the search can build peaks lower)" in str(art.report)
