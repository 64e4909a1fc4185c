"""Helpers shared by several test files (no tests here): building and running small Relax
modules, the model families imported once, and the hand-written modules that the tests of
chunk_region, rewrite and alias use."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import tvm_autochunk as ac
from benchmarks.models import FAMILIES

op = relax.op


# ------------------------------------------------------------------- building and running
def run_llvm(mod, args):
    """Build for llvm, run ``main`` on numpy ``args``, return its (first) output as numpy."""
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    out = out[0] if not hasattr(out, "numpy") else out
    return out.numpy()


def op_names(mod, entry: str = "main") -> set[str]:
    """The names of the Relax ops ``entry`` calls (``"relax.nn.softmax"``, ...)."""
    ops: set[str] = set()

    def visit(e) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            ops.add(str(e.op.name))

    relax.analysis.post_order_visit(mod[entry], visit)
    return ops


def relax_module(body, shapes, dtype="float32", attrs=None):
    """A Relax module: ``main(x0, x1, ...)`` whose dataflow block is built by ``body(bb, *xs)``."""
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(s, dtype)) for i, s in enumerate(shapes)]
    with bb.function("main", xs, attrs=attrs):
        with bb.dataflow():
            gv = bb.emit_output(body(bb, *xs))
        bb.emit_func_output(gv)
    return bb.get()


def same_arrays(a, b) -> bool:
    """Nested tuples of arrays, bit for bit."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (
            isinstance(a, tuple)
            and isinstance(b, tuple)
            and len(a) == len(b)
            and all(same_arrays(x, y) for x, y in zip(a, b))
        )
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def attention(bb, x):
    """sigmoid(x x^T) x: the (S, S) scores are the peak; chunkable along the rows. Sigmoid
    attention, not softmax: on llvm a softmax one is fused (no scores) and barely chunks."""
    s = bb.emit(op.matmul(x, bb.emit(op.permute_dims(x, [1, 0]), "xt")), "s")
    p = bb.emit(op.sigmoid(s), "p")
    return op.matmul(p, x)


def onnx_model(op_type="Softmax"):
    """A one-node ONNX model (opset 17): ``y = op_type(x)``, both 8x4 float32."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])
    node = helper.make_node(op_type, ["x"], ["y"], name=f"{op_type.lower()}0")
    graph = helper.make_graph([node], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


_MODS: dict = {}


def family_module(family: str, size: int):
    """A model family at a size, imported once per session (never mutated by the tests)."""
    if (family, size) not in _MODS:
        w = FAMILIES[family](size)
        _MODS[(family, size)] = ac.from_torch(w.module, w.inputs)
    return _MODS[(family, size)]


# ------------------------------------------------------------ modules: chunk_region, rewrite
@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((8, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor(
        (8, 4), "float32"
    ):
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            a = R.matmul(x, wt)
            b = R.nn.softmax(a, axis=1)
            c = R.multiply(b, x)
            R.output(c)
        return c


# ------------------------------------------------ modules: region outputs written in place
@I.ir_module
class Residual:  # h is the seed, read back by the residual add, and dead after the region
    @R.function
    def main(x: R.Tensor((8, 4), "float32"), w: R.Tensor((4, 4), "float32")):
        with R.dataflow():
            h = R.multiply(x, x)
            wt = R.permute_dims(w, axes=[1, 0])
            a = R.matmul(h, wt)
            b = R.nn.softmax(a, axis=1)
            c = R.add(b, h)
            R.output(c)
        return c


@I.ir_module
class UsedAfter:  # h is read again after the region
    @R.function
    def main(x: R.Tensor((8, 4), "float32"), w: R.Tensor((4, 4), "float32")):
        with R.dataflow():
            h = R.multiply(x, x)
            wt = R.permute_dims(w, axes=[1, 0])
            a = R.matmul(h, wt)
            b = R.nn.softmax(a, axis=1)
            c = R.add(b, h)
            d = R.subtract(c, h)
            R.output(d)
        return d


@I.ir_module
class ViewUsedAfter:  # a reshape (a view: same storage) of h is read after the region
    @R.function
    def main(x: R.Tensor((8, 4), "float32"), w: R.Tensor((4, 4), "float32")):
        with R.dataflow():
            h = R.multiply(x, x)
            hv = R.reshape(h, R.shape([4, 8]))
            wt = R.permute_dims(w, axes=[1, 0])
            a = R.matmul(h, wt)
            b = R.nn.softmax(a, axis=1)
            c = R.add(b, h)
            cv = R.reshape(c, R.shape([4, 8]))
            d = R.add(cv, hv)
            R.output(d)
        return d


@I.ir_module
class ReadWhole:  # the chunks contract over every row of h: none may be overwritten early
    @R.function
    def main(x: R.Tensor((8, 4), "float32"), y: R.Tensor((8, 8), "float32")):
        with R.dataflow():
            g = R.multiply(y, y)
            h = R.add(x, x)
            a = R.nn.softmax(g, axis=1)
            c = R.matmul(a, h)
            R.output(c)
        return c


@I.ir_module
class OtherRows:  # same size as h, but each chunk writes columns of a transposed output
    @R.function
    def main(x: R.Tensor((8, 4), "float32"), w: R.Tensor((4, 4), "float32")):
        with R.dataflow():
            h = R.multiply(x, x)
            a = R.matmul(h, w)
            b = R.nn.softmax(a, axis=1)
            c = R.permute_dims(b, axes=[1, 0])
            R.output(c)
        return c


INPLACE_CASES = {
    # module, region (start, end, seed, dim), expected {output: reused input}
    "residual": (Residual, ("a", "c", "h", 0), {"c": "h"}),
    "param_seed": (Residual, ("h", "c", "x", 0), {}),  # x is a parameter: never written
    "used_after": (UsedAfter, ("a", "c", "h", 0), {}),
    "view_used_after": (ViewUsedAfter, ("a", "c", "h", 0), {}),
    "read_whole": (ReadWhole, ("a", "c", "g", 0), {}),
    "other_rows": (OtherRows, ("a", "c", "h", 0), {}),
}
