"""relay_passes.candidates: the legal regions around the peak (``enumerate_candidates``), their
copies in repeated layers (``with_copies``, ``layer_prefix``), a later start of the same region
(``shorter_copy``), and what every chunk reads whole (``candidate_of``, ``reread_bytes``)."""

from __future__ import annotations

import numpy as np

import tvm_autochunk as ac
from benchmarks.models import FAMILIES
from relay_passes.auto_chunk import need_bytes
from relay_passes.estimate_memory import estimate_memory
from relay_passes.search import SearchOptions


def test_a_later_start_of_the_best_region_is_not_estimated(gpt):
    import dataclasses

    from relay_passes.candidates import enumerate_candidates, shorter_copy
    from relay_passes.ir_index import block_layout
    from relay_passes.search import Fit

    mod = gpt[0]
    prof = estimate_memory(mod, "llvm")
    cands = enumerate_candidates(mod, [prof.peak_binding], SearchOptions())
    names = block_layout(mod["main"], cands[0].start)[0]
    pos = names.index
    pairs = [
        (a, b) for a in cands for b in cands
        if a.end == b.end and (a.extent, a.granularity) == (b.extent, b.granularity)
        and pos(a.start) < pos(b.start) <= pos(a.end) and not a.copies and not b.copies
    ]
    assert pairs  # GPT: the attention region seeded before and after its LayerNorm
    a, b = pairs[0]
    opts = SearchOptions()
    fit = Fit(a.extent // 4, 1, a.cost(a.extent // 4, opts), 1)
    near = b.cost(fit.chunk, opts) >= 0.95 * fit.cost
    assert shorter_copy(mod, b, a, fit, opts, "main") == near
    assert shorter_copy(mod, b, a, fit, opts, "main", over=True)  # compared by peak
    assert not shorter_copy(mod, a, b, fit, opts, "main", over=True)  # a starts earlier
    off = dataclasses.replace(opts, beat_min_saving=0.0)
    assert not shorter_copy(mod, b, a, fit, off, "main", over=True)
    other = next((c for c in cands if c.end != a.end), None)
    if other is not None:
        assert not shorter_copy(mod, other, a, fit, opts, "main", over=True)


def test_reread_bytes_counts_what_every_chunk_reads_whole():
    """Attention chunked by query rows: every chunk reads k^T (a hoisted binding) and v whole;
    the chunk's rows of q (the seed) and of the mask (sliced per chunk) are not re-read."""
    from tvm import relax

    from relay_passes.candidates import candidate_of
    from relay_passes.chunk_region import analyze_region

    s, d = 64, 16
    bb = relax.BlockBuilder()
    q, k, v = (relax.Var(n, relax.TensorType((s, d), "float32")) for n in "qkv")
    mask = relax.Var("mask", relax.TensorType((s, s), "float32"))
    with bb.function("main", [q, k, v, mask]):
        with bb.dataflow():
            q1 = bb.emit(relax.op.multiply(q, relax.const(0.25, "float32")), name_hint="q1")
            kt = bb.emit(relax.op.permute_dims(k), name_hint="kt")
            sc = bb.emit(relax.op.matmul(q1, kt), name_hint="sc")
            sm = bb.emit(relax.op.add(sc, mask), name_hint="sm")
            p = bb.emit(relax.op.nn.softmax(sm), name_hint="p")
            o = bb.emit_output(relax.op.matmul(p, v), name_hint="o")
        bb.emit_func_output(o)
    mod = bb.get()
    ra = analyze_region(mod, "kt", "o", "q1", 0)
    assert ra.legal and "kt" in ra.hoisted, ra.reason
    assert any(sl.binding == "sm" for sl in ra.slices)  # the mask is sliced per chunk
    c = candidate_of(ra, mod["main"])
    assert c.reread_bytes == 2 * s * d * 4  # k^T and v; not q1, not the mask


def test_with_copies_finds_the_same_region_in_the_other_layer(vit2):
    from relay_passes.candidates import enumerate_candidates, with_copies

    mod, _ = vit2
    prof = estimate_memory(mod, "llvm")
    names = [str(b.var.name) for blk in mod["main"].body.blocks for b in blk.bindings]
    cands = [with_copies(mod, c) for c in enumerate_candidates(mod, [prof.peak_binding],
                                                                SearchOptions())]
    with_c = [c for c in cands if c.copies]
    assert with_c
    for c in with_c:
        lo, hi = names.index(c.start), names.index(c.end)
        for a, b, seed in c.copies:
            i, j = names.index(a), names.index(b)
            assert j < lo or i > hi  # disjoint from the original
            assert j - i == hi - lo and names[i - 1] == seed


def test_region_past_a_layer_boundary_is_shortened_to_find_its_copy():
    """GPT, 2 layers, S=512: the longest legal region from the first layer's queries runs into
    the second layer's row-local prefix (its LayerNorm, its q/k/v projection), so its op
    sequence has no copy, and chunking the first layer alone only raised the peak (refused at
    50%). The search now also tries the longest prefix of such a region that repeats (the
    layer boundary, auto_chunk.layer_prefix) and chunks both layers in one stage."""
    from relay_passes.candidates import enumerate_candidates, layer_prefix, with_copies

    w = FAMILIES["gpt"](512, layers=2)
    mod = ac.from_torch(w.module, w.inputs)
    prof = estimate_memory(mod, "llvm")
    names = [str(b.var.name) for blk in mod["main"].body.blocks for b in blk.bindings]
    longest = max(enumerate_candidates(mod, [prof.peak_binding], SearchOptions()),
                  key=lambda c: names.index(c.end) - names.index(c.start))
    assert not with_copies(mod, longest).copies  # as it is, no copy
    got = layer_prefix(mod, longest)
    assert got is not None and got.copies and got.start == longest.start
    assert names.index(got.end) < names.index(longest.end)
    budget = need_bytes(prof) * 7 // 10
    art = ac.build(mod, "llvm", budget=budget)
    assert art.report.planned_peak_bytes <= budget and art.report.peak_bytes <= budget
    assert any(r["regions_in_stage"] >= 2 for r in art.report.chunking["regions"])
    x = w.inputs[0].numpy()
    np.testing.assert_allclose(art(x), ac.build(mod, "llvm")(x), rtol=1e-5, atol=1e-6)
