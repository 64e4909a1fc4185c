"""relax.concat's dim-flow rule and regions through a concat (issue 22 item 2).

A concat's operands arrive as one inline Tuple argument; ``Src.arg`` indexes the call's
*argument leaves* (``dimflow.arg_leaves``: the tuple opened), so every operand is a source of
the dims other than the concat axis, and the axis is reduced in every operand. Regions then
run through a concat along any other dim (ViT's CLS token along tokens chunked over batch or
features, Llama's rotary ``concat((-x2, x1), axis=-1)`` chunked over rows, a channel concat
chunked over tokens), and stop at one along the chunked dim, with the reason. Operands that do
not depend on the seed (a CLS token) are hoisted and sliced (or computed per chunk); the alias
analysis and the estimator see the tuple's fields as reads.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import tvm
import tvm.testing
from _helpers import relax_module
from _helpers import run_llvm as _run
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import tvm_autochunk as ac
from relay_passes import dimflow_rules as rules
from relay_passes.alias import reusable_inputs
from relay_passes.auto_chunk import auto_chunk, need_bytes
from relay_passes.chunk_region import analyze_region, legal_dims
from relay_passes.dimflow import OpFlow, Src, arg_leaves, get_dim_rule, leaf_slots, map_leaf
from relay_passes.estimate_memory import estimate_memory
from relay_passes.plan import ChunkPlan, ChunkRegion
from relay_passes.rewrite import _region_inputs as region_inputs
from relay_passes.rewrite import apply_chunk_plan

op = relax.op
RNG = np.random.default_rng(0)


def t(name, shape):
    return relax.Var(name, relax.TensorType(shape, "float32"))


def rule_of(call):
    call = relax.BlockBuilder().normalize(call)
    args, outs = rules.arg_and_out_shapes(call)
    return get_dim_rule("relax.concat")(call, args, outs), args, outs


def S(arg, dim):
    return Src(arg, dim, Fraction(1))


def _args(mod):
    return [RNG.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
            for p in mod["main"].params]


def _check_chunked(mod, start, end, seed, dim, chunk):
    """The region is legal, and chunking it gives the unchunked outputs (llvm)."""
    ra = analyze_region(mod, start, end, seed, dim)
    assert ra.legal, ra.reason
    after = apply_chunk_plan(mod, ChunkPlan((ChunkRegion(start, end, seed, dim, chunk),)))
    args = _args(mod)
    np.testing.assert_allclose(_run(after, args), _run(mod, args), rtol=1e-5, atol=1e-5)
    return ra, after


# ------------------------------------------------------------------------- the rule alone


def test_rule_concat_along_axis_1():
    fl, args, outs = rule_of(op.concat([t("a", (2, 3, 8)), t("b", (2, 5, 8))], axis=1))
    assert args == [(2, 3, 8), (2, 5, 8)] and outs == [(2, 8, 8)]  # the tuple's fields
    assert fl == OpFlow(
        (((S(0, 0), S(1, 0)), (), (S(0, 2), S(1, 2))),), frozenset({(0, 1), (1, 1)})
    )


def test_rule_negative_axis_is_the_last():
    fl, _, _ = rule_of(op.concat([t("a", (4, 6, 2)), t("b", (4, 6, 3))], axis=-1))
    assert fl.outputs[0] == ((S(0, 0), S(1, 0)), (S(0, 1), S(1, 1)), ())
    assert fl.reduced == {(0, 2), (1, 2)}


def test_rule_with_a_constant_cls_token():
    """ViT: concat((cls (1, 1, D), patches (1, N, D)), axis=1): the constant is leaf 0 and a
    source of batch and D like the patches; tokens are reduced in both."""
    cls = relax.const(np.zeros((1, 1, 8), "float32"))
    fl, args, _ = rule_of(op.concat([cls, t("p", (1, 5, 8))], axis=1))
    assert args == [(1, 1, 8), (1, 5, 8)]
    assert fl.outputs[0] == ((S(0, 0), S(1, 0)), (), (S(0, 2), S(1, 2)))
    assert fl.reduced == {(0, 1), (1, 1)}


def test_rule_is_a_barrier_without_an_axis_or_an_inline_tuple():
    fl, _, _ = rule_of(op.concat([t("a", (6,)), t("b", (2,))], axis=None))
    assert fl is None  # axis=None flattens first
    tup = relax.Var("tup", relax.TupleType([relax.TensorType((2, 3), "float32")] * 2))
    fl, args, _ = rule_of(op.concat(tup, axis=0))
    assert args == [None] and fl is None  # a tuple variable: its fields are no leaves


def test_argument_leaves_open_only_inline_tensor_tuples():
    bb = relax.BlockBuilder()
    a, b = t("a", (2, 3)), t("b", (2, 3))
    cat = bb.normalize(op.concat([a, b], axis=0))
    assert leaf_slots(cat.args) == ((0, 0), (0, 1))
    assert [x.same_as(y) for x, y in zip(arg_leaves(cat.args), (a, b))] == [True, True]
    args = list(cat.args)
    map_leaf(args, (0, 1), lambda x: relax.op.negative(x))
    assert args[0].fields[0].same_as(a) and isinstance(args[0].fields[1], relax.Call)
    # strided_slice's axes/begin/end are tuples of prim values: one leaf each, as before
    sl = bb.normalize(op.strided_slice(a, axes=[1], begin=[0], end=[2]))
    assert leaf_slots(sl.args) == ((0, None), (1, None), (2, None), (3, None))
    assert rules.arg_and_out_shapes(sl)[0] == [(2, 3), None, None, None]


def test_einsum_stays_a_deliberate_barrier_and_concat_is_not_one():
    assert "relax.concat" not in rules.DELIBERATE_BARRIERS
    assert "relax.einsum" in rules.DELIBERATE_BARRIERS
    assert get_dim_rule("relax.einsum") is None


# ------------------------------------------------------------------ regions through a concat


@I.ir_module
class TwoBranches:  # rows chunkable; the concat axis (the last) is not
    @R.function
    def main(x: R.Tensor((8, 4), "float32")) -> R.Tensor((8, 8), "float32"):
        with R.dataflow():
            a = R.exp(x)
            b = R.sigmoid(x)
            c = R.concat((a, b), axis=-1)
            d = R.multiply(c, c)
            R.output(d)
        return d


def test_region_through_a_concat_along_the_last_axis():
    by_dim = {r.seed.dim: r for r in legal_dims(TwoBranches, "a", "d")}
    assert by_dim[0].legal, by_dim[0].reason
    assert by_dim[0].body == ("a", "b", "c", "d") and by_dim[0].slices == ()
    assert not by_dim[1].legal and by_dim[1].failed_at == "c"
    assert "binding 'c' (concat) reduces or mixes dim 1" in by_dim[1].reason
    _check_chunked(TwoBranches, "a", "d", "x", 0, 3)  # 3, 3, 2 rows


@I.ir_module
class TupleVariable:  # the operands bound to a tuple first: not opened (a barrier)
    @R.function
    def main(x: R.Tensor((8, 4), "float32")) -> R.Tensor((8, 8), "float32"):
        with R.dataflow():
            a = R.exp(x)
            b = R.sigmoid(x)
            tup = (a, b)
            c = R.concat(tup, axis=-1)
            d = R.multiply(c, c)
            R.output(d)
        return d


def test_concat_of_a_tuple_variable_is_a_barrier_with_a_reason():
    ra = analyze_region(TupleVariable, "a", "d", "x", 0)
    assert not ra.legal and ra.failed_at == "c"
    assert "chunked tuple variable" in ra.reason
    assert analyze_region(TupleVariable, "a", "b", "x", 0).legal


@I.ir_module
class Rotary:  # Llama's rotate_half: concat((-x2, x1), axis=-1), chunked over rows
    @R.function
    def main(
        x: R.Tensor((8, 16), "float32"),
        cos: R.Tensor((8, 16), "float32"),
        sin: R.Tensor((8, 16), "float32"),
    ) -> R.Tensor((8, 16), "float32"):
        with R.dataflow():
            x1 = R.strided_slice(x, axes=[1], begin=[0], end=[8])
            x2 = R.strided_slice(x, axes=[1], begin=[8], end=[16])
            n = R.negative(x2)
            r = R.concat((n, x1), axis=-1)
            xc = R.multiply(x, cos)
            rs = R.multiply(r, sin)
            y = R.add(xc, rs)
            R.output(y)
        return y


def test_rotary_concat_chunked_over_rows():
    ra, _ = _check_chunked(Rotary, "x1", "y", "x", 0, 3)
    assert "r" in ra.body
    assert {(s.binding, s.dim) for s in ra.slices} == {("xc", 0), ("rs", 0)}  # cos, sin rows
    assert not analyze_region(Rotary, "x1", "y", "x", 1).legal  # the slices need dim 1 whole


@I.ir_module
class RotaryTables:  # the cos/sin tables from concat((freqs, freqs), -1), inside the region
    @R.function
    def main(
        x: R.Tensor((8, 16), "float32"), freqs: R.Tensor((8, 8), "float32")
    ) -> R.Tensor((8, 16), "float32"):
        with R.dataflow():
            emb = R.concat((freqs, freqs), axis=-1)
            cos = R.cos(emb)
            sin = R.sin(emb)
            x1 = R.strided_slice(x, axes=[1], begin=[0], end=[8])
            x2 = R.strided_slice(x, axes=[1], begin=[8], end=[16])
            r = R.concat((R.negative(x2), x1), axis=-1)
            y = R.add(R.multiply(x, cos), R.multiply(r, sin))
            R.output(y)
        return y


def test_hoisted_concat_read_by_rows_is_computed_per_chunk():
    """emb does not depend on x, but the chunks read cos/sin by rows only: the tables are
    computed per chunk from row slices of both concat operands (one leaf each, the same var)."""
    ra, after = _check_chunked(RotaryTables, "emb", "y", "x", 0, 3)
    assert ra.hoisted == () and {"emb", "cos", "sin"} <= set(ra.body)
    assert sorted((s.binding, s.arg, s.dim) for s in ra.slices) == [("emb", 0, 0), ("emb", 1, 0)]
    assert "R.concat" not in after["main"].script()


@I.ir_module
class ClsToken:  # ViT: a broadcast CLS weight concatenated to the patches along tokens
    @R.function
    def main(
        x: R.Tensor((2, 6, 8), "float32"), cls: R.Tensor((1, 1, 8), "float32")
    ) -> R.Tensor((2, 7, 8), "float32"):
        with R.dataflow():
            p = R.multiply(x, x)
            cb = R.broadcast_to(cls, R.shape([2, 1, 8]))
            e = R.concat((cb, p), axis=1)
            y = R.sigmoid(e)
            R.output(y)
        return y


@pytest.mark.parametrize(("dim", "chunk"), [(0, 1), (2, 3)])
def test_cls_token_concat_chunked_over_batch_or_features(dim, chunk):
    """The CLS operand does not depend on the seed: its broadcast is computed per chunk (for
    the chunk's rows or features only), never whole and never from a chunk."""
    ra, after = _check_chunked(ClsToken, "p", "y", "x", dim, chunk)
    assert ra.body == ("p", "cb", "e", "y") and ra.hoisted == ()
    assert ("cb", dim, Fraction(1)) in {(s.name, s.dim, s.scale) for s in ra.specs}
    assert [(s.binding, s.arg, s.dim) for s in ra.slices] == (
        [] if dim == 0 else [("cb", 0, 2)]  # the (1, 1, 8) weight: its features are sliced
    )
    assert "R.broadcast_to" not in after["main"].script()


def test_cls_token_concat_is_not_chunked_along_tokens():
    ra = analyze_region(ClsToken, "p", "y", "x", 1)
    assert not ra.legal and ra.failed_at == "e"
    assert "reduces or mixes dim 1 of argument 1" in ra.reason  # the patches are leaf 1


def test_constant_cls_inline_in_the_tuple_is_sliced():
    cls = RNG.standard_normal((1, 1, 8)).astype("float32")
    mod = relax_module(
        lambda bb, x: op.sigmoid(bb.emit(op.concat([relax.const(cls), x], axis=1), "e")),
        [(1, 6, 8)],
    )
    ra, _ = _check_chunked(mod, "e", "gv", "x0", 2, 4)
    assert [(s.binding, s.arg, s.dim) for s in ra.slices] == [("e", 0, 2)]


# --------------------------------------------------------- alias and estimate see the fields


@I.ir_module
class ConcatResidual:  # h is the seed, read only inside the concat and by the residual add
    @R.function
    def main(x: R.Tensor((8, 4), "float32"), w: R.Tensor((8, 4), "float32")):
        with R.dataflow():
            h = R.multiply(x, x)
            a = R.exp(h)
            c = R.concat((h, a), axis=1)
            d = R.matmul(c, w)
            e = R.add(d, h)
            R.output(e)
        return e


@I.ir_module
class ConcatReadsAfter:  # as ConcatResidual, but a concat after the region reads h again
    @R.function
    def main(x: R.Tensor((8, 4), "float32"), w: R.Tensor((8, 4), "float32")):
        with R.dataflow():
            h = R.multiply(x, x)
            a = R.exp(h)
            c = R.concat((h, a), axis=1)
            d = R.matmul(c, w)
            e = R.add(d, h)
            f = R.concat((e, h), axis=1)
            R.output(f)
        return f


@pytest.mark.parametrize(("mod", "want"), [(ConcatResidual, {"e": "h"}), (ConcatReadsAfter, {})])
def test_alias_sees_the_concat_operands(mod, want):
    ra = analyze_region(mod, "a", "e", "h", 0)
    assert ra.legal, ra.reason
    got = reusable_inputs(mod, ra, region_inputs(mod["main"], ra))
    assert {k: str(v.name) for k, v in got.items()} == want
    _check_chunked(mod, "a", "e", "h", 0, 3)


def _mlp_concat():
    """x (1, 256, 64) -> gelu(x W1) (256 wide) and x W2 (128 wide) -> concat -> @ W3: the
    peak is at the concat (both operands and the result live)."""
    w1 = (RNG.standard_normal((64, 256)) / 8).astype("float32")
    w2 = (RNG.standard_normal((64, 128)) / 8).astype("float32")
    w3 = (RNG.standard_normal((384, 64)) / 20).astype("float32")

    def body(bb, x):
        a = bb.emit(op.nn.gelu(bb.emit(op.matmul(x, relax.const(w1)), "h1")), "a")
        b = bb.emit(op.matmul(x, relax.const(w2)), "b")
        c = bb.emit(op.concat([a, b], axis=-1), "c")
        return op.matmul(c, relax.const(w3))

    return relax_module(body, [(1, 256, 64)]), (w1, w2, w3)


def test_estimate_keeps_the_operands_live_until_the_concat():
    mod, _ = _mlp_concat()
    prof = estimate_memory(mod, "llvm")
    assert prof.peak_binding == "c"
    assert {r.name for r in prof.live_at_peak} == {"a", "b", "c"}
    assert prof.live_peak_bytes == 4 * 256 * (256 + 128 + 384)


# ------------------------------------------------------------------------------ end to end


def test_build_chunks_through_the_concat():
    """Without a rule for concat the regions stop at it, and the concat (a, b and c live:
    768 KiB) is the floor; the budget is below it."""
    mod, (w1, w2, w3) = _mlp_concat()
    need = need_bytes(estimate_memory(mod, "llvm"))
    budget = need // 2
    assert budget < 4 * 256 * (256 + 128 + 384)
    chunked, res = auto_chunk(mod, "llvm", budget)
    assert res.final_peak <= budget
    concat = tvm.ir.Op.get("relax.concat")
    in_chunk_fns = [
        gv.name_hint
        for gv, f in chunked.functions_items()
        if isinstance(f, relax.Function) and gv.name_hint != "main"
        for blk in f.body.blocks
        for b in blk.bindings
        if isinstance(b.value, relax.Call) and b.value.op.same_as(concat)
    ]
    assert in_chunk_fns, chunked.script()
    art = ac.build(mod, "llvm", budget=budget)
    regions = art.report.chunking["regions"]
    assert regions and all(r["chunk"] < 256 for r in regions)
    assert art.report.peak_bytes <= budget
    x = RNG.standard_normal((1, 256, 64)).astype("float32")
    np.testing.assert_allclose(art(x), ac.build(mod, "llvm")(x), rtol=1e-5, atol=1e-5)
    h = x @ w1
    gelu = 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))
    want = np.concatenate([gelu, x @ w2], axis=-1) @ w3
    np.testing.assert_allclose(art(x), want, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    tvm.testing.main()
