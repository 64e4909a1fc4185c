"""relay_passes.chunk_calls: the tensors a chunk loop reads, and its in-place buffers, stay in
TVM's memory plan (``PlanChunkCalls`` before the planner, ``RestoreChunkCalls`` after it).
Without it the planner discards the tokens of every argument of a Relax call and the plan
counts them all at once as run-time allocations."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from _helpers import run_llvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import tvm_autochunk as ac
from relay_passes import _compat as C
from relay_passes.chunk_calls import PlanChunkCalls, RestoreChunkCalls
from relay_passes.errors import PassContractError
from relay_passes.estimate_memory import estimate_memory
from relay_passes.lowering import planning_passes, run_passes
from relay_passes.plan import ChunkPlan, ChunkRegion
from relay_passes.planned_memory import planned_memory, read_plan
from relay_passes.rewrite import apply_chunk_plan

LLVM = tvm.target.Target("llvm")
MIB = 2**20


@I.ir_module
class TwoBlocks:  # two MLP blocks; each one's input is used again after it
    @R.function
    def main(
        x: R.Tensor((1024, 256), "float32"),
        w1: R.Tensor((256, 512), "float32"),
        w2: R.Tensor((512, 256), "float32"),
    ):
        with R.dataflow():
            a = R.nn.relu(x)
            h = R.matmul(a, w1)
            g = R.nn.relu(h)
            y = R.matmul(g, w2)
            b = R.add(y, a)
            c = R.nn.relu(b)
            h2 = R.matmul(c, w1)
            g2 = R.nn.relu(h2)
            y2 = R.matmul(g2, w2)
            s2 = R.sigmoid(y2)
            d = R.add(y2, s2)
            e = R.add(d, c)
            R.output(e)
        return e


def _chunked():
    plan = ChunkPlan((
        ChunkRegion("h", "y", "a", 0, 256),
        ChunkRegion("h2", "s2", "c", 0, 128),  # two outputs (y2, s2): a tuple of buffers
    ))
    return apply_chunk_plan(TwoBlocks, plan)


def _inputs():
    rng = np.random.default_rng(0)  # weights scaled by 1/sqrt(fan-in): outputs of order 1
    return [(rng.standard_normal(s) / np.sqrt(s[0] if i else 1)).astype("float32")
            for i, s in enumerate(((1024, 256), (256, 512), (512, 256)))]


def _plan_without_pass(mod):
    skip = {"PlanChunkCalls", "RestoreChunkCalls"}
    passes = [p for p in planning_passes(LLVM) if p.info.name not in skip]
    return read_plan(run_passes(mod, passes, LLVM), "main", LLVM)


def test_chunk_loop_arguments_are_planned_storage():
    """a and c (1 MiB each, read by every chunk) and the buffers are planned: the only run-time
    allocation left in main is its output, and the second region's tensors take the storage
    of the first one's (dead by then), where the discarded arguments counted all at once."""
    chunked = _chunked()
    plan = planned_memory(chunked, LLVM)
    main = next(f for f in plan.frames if f.function == "main")
    assert main.unplanned_bytes == 1024 * 256 * 4  # the output alone
    before = _plan_without_pass(chunked)
    assert plan.peak_bytes <= before.peak_bytes - 2 * MIB, (plan.peak_bytes, before.peak_bytes)


def test_estimate_equals_the_plan_with_planned_chunk_arguments():
    chunked = _chunked()
    est = estimate_memory(chunked, LLVM)
    assert est.peak_bytes == planned_memory(chunked, LLVM).peak_bytes


def test_restored_calls_run_as_vm_functions():
    """After planning the calls are plain calls again: built with our pipeline the chunked
    module runs (an ExternFunc call would make the VM look the chunk function up as a packed
    function) and equals the unchunked module."""
    chunked = _chunked()
    planned = run_passes(chunked, planning_passes(LLVM), LLVM)
    externs = []
    relax.analysis.post_order_visit(
        planned["main"], lambda e: externs.append(e) if isinstance(e, C.ExternFunc) else None
    )
    assert not [e for e in externs if "chunk" in str(e.global_symbol)]
    art = ac.build(chunked, "llvm")
    args = _inputs()
    np.testing.assert_allclose(art(*args), run_llvm(TwoBlocks, args), rtol=1e-4, atol=1e-4)


def test_restore_refuses_a_call_without_its_result_binding():
    """RestoreChunkCalls undoes PlanChunkCalls' two bindings; anything else is a contract
    error, not a silently dropped call."""
    chunked = _chunked()
    lowered = run_passes(chunked, planning_passes(LLVM)[:-3], LLVM)  # up to the pass
    ext = PlanChunkCalls(lowered)
    assert any(
        isinstance(b.value, C.Call) and isinstance(b.value.op, C.ExternFunc)
        for blk in ext["main"].body.blocks for b in blk.bindings
    )
    # drop the result bindings PlanChunkCalls wrote after each call
    func = ext["main"]
    blocks = []
    for blk in func.body.blocks:
        keep = [b for b in blk.bindings if not (
            isinstance(b.value, (relax.Var, relax.Tuple)) and any(
                isinstance(c.value, C.Call) and isinstance(c.value.op, C.ExternFunc)
                and str(c.var.name) == f"{b.var.name}_call" for c in blk.bindings))]
        blocks.append(relax.BindingBlock(keep))
    main = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty,
                          func.is_pure, func.attrs)
    broken = tvm.IRModule(
        {gv: main if gv.name_hint == "main" else f for gv, f in ext.functions_items()}
    )
    with pytest.raises(PassContractError, match="no result binding"):
        RestoreChunkCalls(broken)
