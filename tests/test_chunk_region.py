"""relay_passes.chunk_region: which dims a region can be chunked along, with reasons
(``analyze_region``, ``legal_dims``): an op without a dim-flow rule is a barrier, a chunked
tensor is never sliced again, and analyses of regions share one walk per start and seed."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import Before
from _helpers import run_llvm as _run  # build for llvm, run main, return the first output
from tvm.script import ir as I
from tvm.script import relax as R

import tvm_autochunk as ac
from benchmarks.models import FAMILIES
from relay_passes.chunk_region import analyze_region, legal_dims
from relay_passes.dimflow import arg_leaves
from relay_passes.errors import PassContractError
from relay_passes.plan import ChunkPlan, ChunkRegion
from relay_passes.rewrite import apply_chunk_plan


def test_legality_reasons():
    by_seed = {(r.seed.name, r.seed.dim): r for r in legal_dims(Before, "wt", "c")}
    assert by_seed[("x", 0)].legal and by_seed[("x", 0)].hoisted == ("wt",)
    assert not by_seed[("x", 1)].legal
    assert "reduces or mixes dim 1" in by_seed[("x", 1)].reason  # matmul's K
    assert not by_seed[("w", 1)].legal  # becomes wt's dim 0: matmul's K again
    assert not by_seed[("w", 0)].legal  # becomes the softmax axis
    assert "softmax" in by_seed[("w", 0)].reason


@I.ir_module
class WithBarrier:
    @R.function
    def main(x: R.Tensor((8, 4), "float32")) -> R.Tensor((8, 4), "float32"):
        with R.dataflow():
            a = R.add(x, x)
            b = R.einsum((a, x), "ij,ik->ijk")
            c = R.sum(b, axis=[2])
            R.output(c)
        return c


def test_op_without_rule_is_a_barrier_not_a_crash():
    ra = analyze_region(WithBarrier, "a", "c", "x", 0)
    assert not ra.legal
    assert "no dim-flow rule" in ra.reason and "einsum" in ra.reason
    with pytest.raises(PassContractError, match="no dim-flow rule"):
        apply_chunk_plan(WithBarrier, ChunkPlan((ChunkRegion("a", "c", "x", 0, 4),)))
    # a region that stops before the barrier is fine
    assert analyze_region(WithBarrier, "a", "a", "x", 0).legal


def test_regression_second_region_after_a_chunked_one():
    """Found by the demo: the second region's attention does not depend on its seed and was
    moved into the chunk while a consumer still sliced it again (NaN). Two stacked regions on a
    2-layer GPT must give the unchunked outputs."""
    w = FAMILIES["gpt"](128)
    mod = ac.from_torch(w.module, w.inputs)
    x = [w.inputs[0].numpy()]
    ref = _run(mod, x)
    r1 = ChunkRegion("lv8", "lv93", "lv7", 1, 36)  # 36, 36, 36, 20 rows
    m1 = apply_chunk_plan(mod, ChunkPlan((r1,)))
    r2 = ChunkRegion("lv80_part3", "lv134", "lv66_part3", 1, 50)
    ra = analyze_region(m1, r2.start, r2.end, r2.seed, r2.dim)
    assert ra.legal, ra.reason
    sliced = {(s.binding, s.arg) for s in ra.slices}
    chunked = {s.name for s in ra.specs}
    bindings = {str(b.var.name): b for blk in m1["main"].body.blocks for b in blk.bindings}
    for binding, arg in sliced:  # never slice a tensor that is already a chunk
        a = arg_leaves(bindings[binding].value.args)[arg]
        assert str(a.name) not in chunked, (binding, a.name)
    m2 = apply_chunk_plan(m1, ChunkPlan((r2,)))
    out = _run(m2, x)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_region_analyses_reuse_one_walk_per_start_and_seed():
    """analyze_region walks a (start, seed, dim) once and answers shorter and longer regions
    from that walk (chunk_region._Walk): every answer equals a fresh analysis, in any order
    (longest first, as _longest_legal asks, and shortest first)."""
    import random
    import threading

    from relay_passes import caches

    def _fresh(mod, q):
        """analyze_region in a thread of its own: outside this thread's scope, fresh caches."""
        out = []
        t = threading.Thread(target=lambda: out.append(analyze_region(mod, *q)))
        t.start()
        t.join()
        return out[0]

    w = FAMILIES["gpt"](64, layers=2)
    mod = ac.from_torch(w.module, w.inputs)
    func = mod["main"]
    names = [str(b.var.name) for b in func.body.blocks[0].bindings]
    rng = random.Random(0)
    queries = []
    for _ in range(12):
        i = rng.randrange(1, len(names) - 2)
        ends = rng.sample(range(i, len(names)), k=min(6, len(names) - i))
        for d in (0, 1, 2):
            queries += [(names[i], names[e], names[i - 1], d) for e in ends]
    legal = 0
    for order in (queries, sorted(queries, key=lambda q: names.index(q[1]))):
        # one scope: the index (and its walks) that every earlier query of `order` used
        with caches.scope() as shared:
            for q in order:
                got = analyze_region(mod, *q)
                fresh = _fresh(mod, q)  # a fresh index: no walk from any other query
                assert got == fresh, q
                legal += got.legal
            walks = next(iter(shared.index.values())).walks
        assert len(walks) < len(order)  # regions shared walks
    assert legal > 0  # some of them are chunkable regions, not only failures
