"""relay_passes.patch_conv: ``PatchConvToMatmul`` rewrites a stride == kernel conv2d into layout
ops plus one matmul (golden IR; llvm numerics against the unrewritten build and torch; out_dtype;
batch and non-square patches; a constant weight; the ViT model) and leaves every other conv as
it is (each excluded form, structurally equal and the same object)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
import tvm.testing
from _helpers import run_llvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from relay_passes.patch_conv import CONV2D, PatchConvToMatmul

RNG = np.random.default_rng(0)
op = relax.op


def _convs(mod) -> list:
    """Every relax.nn.conv2d call of every Relax function, in visit order."""
    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):

            def cb(e):
                if isinstance(e, tvm.ir.Call) and isinstance(e.op, tvm.ir.Op):
                    if e.op.same_as(CONV2D):
                        found.append(e)

            relax.analysis.post_order_visit(func, cb)
    return found


def _conv_module(xs, ws, dtype="float32", second=None, **conv):
    """``main(x, w[, w2])``: conv2d(x, w, **conv), then ``second`` (a 3x3 pad-1 conv) if given."""
    params = [
        relax.Var("x", relax.TensorType(xs, dtype)),
        relax.Var("w", relax.TensorType(ws, dtype)),
    ]
    if second is not None:
        params.append(relax.Var("w2", relax.TensorType(second, dtype)))
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(op.nn.conv2d(params[0], params[1], **conv))
            if second is not None:
                y = bb.emit(op.nn.conv2d(y, params[2], padding=1))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _torch_conv(x, w, stride):
    return F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride).numpy()


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 3, 32, 32), "float32"), w: R.Tensor((8, 3, 16, 16), "float32")):
        with R.dataflow():
            y = R.nn.conv2d(x, w, strides=[16, 16])
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 3, 32, 32), "float32"), w: R.Tensor((8, 3, 16, 16), "float32")):
        with R.dataflow():
            x6 = R.reshape(x, R.shape([1, 3, 2, 16, 2, 16]))
            xp = R.permute_dims(x6, axes=[0, 2, 4, 1, 3, 5])
            rows = R.reshape(xp, R.shape([4, 768]))
            wk = R.reshape(w, R.shape([8, 768]))
            wt = R.permute_dims(wk, axes=[1, 0])
            m = R.matmul(rows, wt)
            m4 = R.reshape(m, R.shape([1, 2, 2, 8]))
            y = R.permute_dims(m4, axes=[0, 3, 1, 2])
            R.output(y)
        return y


def test_golden_rewrite():
    tvm.ir.assert_structural_equal(PatchConvToMatmul()(Before), Expected)


def test_matches_unrewritten_build_and_torch_and_keeps_the_other_conv():
    mod = _conv_module((1, 3, 64, 64), (32, 3, 16, 16), second=(32, 32, 3, 3), strides=16)
    new = PatchConvToMatmul()(mod)
    left = _convs(new)
    assert len(_convs(mod)) == 2 and len(left) == 1
    assert [int(p) for p in left[0].attrs.padding] == [1, 1, 1, 1]  # the 3x3 one stays
    args = [RNG.standard_normal(s).astype("float32") for s in [(1, 3, 64, 64), (32, 3, 16, 16)]]
    args.append(RNG.standard_normal((32, 32, 3, 3)).astype("float32"))
    before, after = run_llvm(mod, args), run_llvm(new, args)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    t = F.conv2d(torch.from_numpy(_torch_conv(*args[:2], 16)), torch.from_numpy(args[2]), padding=1)
    np.testing.assert_allclose(after, t.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "xs, ws, stride",
    [((2, 3, 32, 32), (8, 3, 16, 16), 16), ((1, 4, 24, 32), (8, 4, 8, 4), (8, 4))],
    ids=["batch2", "kh!=kw"],
)
def test_batch_and_non_square_patches(xs, ws, stride):
    mod = _conv_module(xs, ws, strides=stride)
    new = PatchConvToMatmul()(mod)
    assert not _convs(new)
    x, w = (RNG.standard_normal(s).astype("float32") for s in (xs, ws))
    np.testing.assert_allclose(
        run_llvm(new, [x, w]), _torch_conv(x, w, stride), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize(
    "dtype, out_dtype, want",
    [
        ("float32", None, "float32"),
        ("float32", "", "float32"),  # "" and "void" mean the inputs' dtype
        ("float32", "void", "float32"),
        ("float32", "float64", "float64"),
        ("int8", "int32", "int32"),  # int8 products overflow int8: the matmul must accumulate wide
    ],
)
def test_out_dtype(dtype, out_dtype, want):
    mod = _conv_module((1, 3, 32, 32), (8, 3, 16, 16), dtype, strides=16, out_dtype=out_dtype)
    new = PatchConvToMatmul()(mod)
    assert not _convs(new)
    assert str(new["main"].ret_ty.dtype) == want
    x = RNG.integers(-4, 4, (1, 3, 32, 32)).astype(dtype)
    w = RNG.integers(-4, 4, (8, 3, 16, 16)).astype(dtype)
    got = run_llvm(new, [x, w])
    assert got.dtype == np.dtype(want)
    ref = _torch_conv(x.astype("float64"), w.astype("float64"), 16)  # exact for small ints
    np.testing.assert_array_equal(got, ref.astype(want))


def test_constant_weight_is_transposed_at_rewrite_time():
    x = RNG.standard_normal((1, 3, 32, 32)).astype("float32")
    w = RNG.standard_normal((8, 3, 16, 16)).astype("float32")
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(op.nn.conv2d(xv, relax.const(w), strides=16))
        bb.emit_func_output(out)
    new = PatchConvToMatmul()(bb.get())
    assert not _convs(new)
    assert "patch_wt" not in new.script()  # no transpose left to run per call
    np.testing.assert_allclose(run_llvm(new, [x]), _torch_conv(x, w, 16), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "xs, ws, conv",
    [
        ((1, 3, 32, 32), (8, 3, 16, 16), {"strides": 8}),  # overlapping patches
        ((1, 3, 32, 32), (8, 3, 16, 16), {"strides": 16, "padding": 8}),
        ((1, 4, 32, 32), (8, 2, 16, 16), {"strides": 16, "groups": 2}),
        ((1, 3, 64, 64), (8, 3, 16, 16), {"strides": 16, "dilation": 2}),
        ((1, 32, 32, 3), (8, 3, 16, 16), {"strides": 16, "data_layout": "NHWC"}),
        ((1, 3, 40, 32), (8, 3, 16, 16), {"strides": 16}),  # H % kh != 0
        ((1, 3, tvm.tirx.Var("h", "int64"), 32), (8, 3, 16, 16), {"strides": 16}),  # symbolic
    ],
    ids=["stride", "padding", "groups", "dilation", "nhwc", "ragged", "symbolic"],
)
def test_other_convs_are_left_alone(xs, ws, conv):
    mod = _conv_module(xs, ws, **conv)
    new = PatchConvToMatmul()(mod)
    assert new.same_as(mod)
    tvm.ir.assert_structural_equal(new, mod)


def test_vit_patch_embedding_is_rewritten():
    import tvm_autochunk as ac
    from benchmarks.models import FAMILIES

    w = FAMILIES["vit"](16, layers=1)  # 64x64 image, 16 patches
    mod = ac.from_torch(w.module, w.inputs)
    assert len(_convs(mod)) == 1
    new = PatchConvToMatmul()(mod)
    assert not _convs(new)
    with torch.no_grad():
        ref = w.module(*w.inputs).numpy()
    got = run_llvm(new, [t.numpy() for t in w.inputs])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    tvm.testing.main()
