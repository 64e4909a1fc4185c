"""Dim-flow rules: one case per registered op, exact flows, and the registry's behaviour.

Each case builds a call with ``tvm.relax.op`` on small static tensors, normalizes it for its
type, runs the registered rule and compares the exact ``OpFlow``. Every flow is also checked
for consistency with the shapes (a source's extent times its scale is the output extent; a
source is never reduced).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax
from tvm.relax import op as R

from relay_passes import dimflow_rules as rules
from relay_passes.dimflow import (
    OpFlow,
    Src,
    arg_leaves,
    get_dim_rule,
    leaf_slots,
    map_leaf,
    register_dim_rule,
    registered_ops,
)
from relay_passes.dimflow_rules import elementwise as ew

# Ops the four model families import (from the team's op survey).
SURVEY_OPS = """
add subtract multiply divide power maximum minimum equal not_equal less less_equal greater
greater_equal logical_and logical_or logical_not where astype exp log sqrt rsqrt tanh erf sigmoid
negative abs clip nn.relu nn.gelu nn.gelu_tanh nn.silu nn.softmax nn.log_softmax nn.layer_norm
nn.group_norm nn.rms_norm matmul permute_dims reshape expand_dims squeeze flatten broadcast_to
strided_slice split concat take sum mean max min prod variance std argmax argmin cumsum full_like
zeros_like ones_like full zeros ones arange nn.conv2d nn.conv2d_transpose image.resize2d
nn.max_pool2d nn.avg_pool2d nn.adaptive_avg_pool2d nn.dropout nn.attention einsum
""".split()


def t(name, shape, dtype="float32"):
    return relax.Var(name, relax.TensorType(shape, dtype))


def S(arg, dim, scale=1):
    return Src(arg, dim, Fraction(scale))


def flow(*outputs, reduced=()):
    """An OpFlow from per-output lists of per-dim Src lists."""
    return OpFlow(tuple(tuple(tuple(d) for d in o) for o in outputs), frozenset(reduced))


def run_rule(call):
    call = relax.BlockBuilder().normalize(call)
    rule = get_dim_rule(str(call.op.name))
    assert rule is not None, f"no rule for {call.op.name}"
    args, outs = rules.arg_and_out_shapes(call)
    return rule(call, args, outs), args, outs


def check_consistent(fl: OpFlow, args, outs):
    assert len(fl.outputs) == len(outs)
    for o, dims in enumerate(fl.outputs):
        assert len(dims) == len(outs[o])
        for j, srcs in enumerate(dims):
            for s in srcs:
                shape = args[s.arg]
                assert shape is not None and 0 <= s.dim < len(shape)
                assert shape[s.dim] * s.scale == outs[o][j], (o, j, s)
                assert (s.arg, s.dim) not in fl.reduced
    for a, d in fl.reduced:
        assert args[a] is not None and 0 <= d < len(args[a])


def _op(name):
    fn = R
    for part in name.split("."):
        fn = getattr(fn, part)
    return fn


X23 = flow([[S(0, 0)], [S(0, 1)]])
# binary a: (2, 3, 4), b: (3, 1): b's 1 broadcast against 4 is not a source
BCAST = flow([[S(0, 0)], [S(0, 1), S(1, 0)], [S(0, 2)]])
_BOOL = {"logical_not", "logical_and", "logical_or", "logical_xor"}
_INT = {"bitwise_not", "bitwise_and", "bitwise_or", "bitwise_xor"}
_UNARY_CALLS = {
    "astype": lambda x: R.astype(x, "float16"),
    "clip": lambda x: R.clip(x, 0, 1),
}


def _dtype(name):
    return "bool" if name in _BOOL else "int32" if name in _INT else "float32"


def _unary_case(name):
    x = t("x", (2, 3), _dtype(name))
    return _UNARY_CALLS.get(name, _op(name))(x)


def _binary_case(name):
    return _op(name)(t("a", (2, 3, 4), _dtype(name)), t("b", (3, 1), _dtype(name)))


CASES: list[tuple[str, object, OpFlow | None]] = [
    *((f"relax.{n}", lambda n=n: _unary_case(n), X23) for n in ew.UNARY),
    *((f"relax.{n}", lambda n=n: _binary_case(n), BCAST) for n in ew.BINARY),
    # where(cond (3, 1), a (1, 4), b (4,)) -> (3, 4)
    ("relax.where", lambda: R.where(t("c", (3, 1), "bool"), t("a", (1, 4)), t("b", (4,))),
     flow([[S(0, 0)], [S(1, 1), S(2, 0)]])),
    # matmul: batched with broadcast batch dims; (2,1,3,4) @ (5,4,6) -> (2,5,3,6)
    ("relax.matmul", lambda: R.matmul(t("a", (2, 1, 3, 4)), t("b", (5, 4, 6))),
     flow([[S(0, 0)], [S(1, 0)], [S(0, 2)], [S(1, 2)]], reduced={(0, 3), (1, 1)})),
    ("relax.matmul", lambda: R.matmul(t("a", (3, 4)), t("b", (4,))),
     flow([[S(0, 0)]], reduced={(0, 1), (1, 0)})),
    ("relax.matmul", lambda: R.matmul(t("a", (4,)), t("b", (2, 4, 5))),
     flow([[S(1, 0)], [S(1, 2)]], reduced={(0, 0), (1, 1)})),
    # layout
    ("relax.permute_dims", lambda: R.permute_dims(t("x", (2, 3, 4)), [2, 0, 1]),
     flow([[S(0, 2)], [S(0, 0)], [S(0, 1)]])),
    ("relax.permute_dims", lambda: R.permute_dims(t("x", (2, 3, 4))),
     flow([[S(0, 2)], [S(0, 1)], [S(0, 0)]])),
    ("relax.expand_dims", lambda: R.expand_dims(t("x", (2, 3)), [0, -1]),
     flow([[], [S(0, 0)], [S(0, 1)], []])),
    ("relax.squeeze", lambda: R.squeeze(t("x", (1, 3, 1))), flow([[S(0, 1)]])),
    ("relax.squeeze", lambda: R.squeeze(t("x", (1, 3, 1)), [0]), flow([[S(0, 1)], [S(0, 2)]])),
    ("relax.broadcast_to", lambda: R.broadcast_to(t("x", (1, 3, 1)), (2, 3, 4)),
     flow([[], [S(0, 1)], []])),
    ("relax.broadcast_to", lambda: R.broadcast_to(t("x", (3, 1)), (2, 3, 1)),
     flow([[], [S(0, 0)], [S(0, 1)]])),
    # reshape: merge (scale 4), split (scale 1/4), ambiguous many-to-many, flatten
    ("relax.reshape", lambda: R.reshape(t("x", (2, 3, 4)), (2, 12)),
     flow([[S(0, 0)], [S(0, 1, 4)]], reduced={(0, 2)})),
    ("relax.reshape", lambda: R.reshape(t("x", (2, 12)), (2, 3, 4)),
     flow([[S(0, 0)], [S(0, 1, Fraction(1, 4))], []])),
    ("relax.reshape", lambda: R.reshape(t("x", (1, 4, 6)), (6, 4, 1)),
     flow([[], [], []], reduced={(0, 1), (0, 2)})),
    ("relax.reshape", lambda: R.reshape(t("x", (2, 1, 6)), (2, 6, 1)),
     flow([[S(0, 0)], [S(0, 2)], []])),
    ("relax.flatten", lambda: R.flatten(t("x", (2, 3, 4))),
     flow([[S(0, 0, 12)]], reduced={(0, 1), (0, 2)})),
    # slicing and indexing
    ("relax.strided_slice",
     lambda: R.strided_slice(t("x", (2, 3, 4)), axes=[1, 2], begin=[0, 0], end=[2, 4]),
     flow([[S(0, 0)], [], [S(0, 2)]], reduced={(0, 1)})),
    ("relax.strided_slice",  # a whole-dim reversal is not the identity
     lambda: R.strided_slice(t("x", (2, 3, 4)), axes=[2], begin=[3], end=[-5], strides=[-1]),
     flow([[S(0, 0)], [S(0, 1)], []], reduced={(0, 2)})),
    ("relax.split", lambda: R.split(t("x", (2, 6, 4)), 3, axis=1),
     flow(*[[[S(0, 0)], [], [S(0, 2)]]] * 3, reduced={(0, 1)})),
    ("relax.split", lambda: R.split(t("x", (2, 6, 4)), [2, 5], axis=-2),
     flow(*[[[S(0, 0)], [], [S(0, 2)]]] * 3, reduced={(0, 1)})),
    ("relax.split", lambda: R.split(t("x", (2, 6)), 1, axis=1), flow([[S(0, 0)], [S(0, 1)]])),
    # concat: the operands are argument leaves 0, 1, ... of its one tuple argument
    ("relax.concat", lambda: R.concat([t("a", (2, 3, 8)), t("b", (2, 5, 8))], axis=1),
     flow([[S(0, 0), S(1, 0)], [], [S(0, 2), S(1, 2)]], reduced={(0, 1), (1, 1)})),
    ("relax.concat", lambda: R.concat([t("a", (4, 2)), t("b", (4, 3)), t("c", (4, 1))], axis=-1),
     flow([[S(0, 0), S(1, 0), S(2, 0)], []], reduced={(0, 1), (1, 1), (2, 1)})),
    ("relax.concat", lambda: R.concat([t("a", (6,)), t("b", (2,))], axis=None), None),
    ("relax.take", lambda: R.take(t("x", (2, 3, 4)), t("i", (5,), "int64"), axis=1),
     flow([[S(0, 0)], [S(1, 0)], [S(0, 2)]], reduced={(0, 1)})),
    ("relax.take", lambda: R.take(t("w", (5, 8)), t("i", (2, 3), "int64"), axis=0),
     flow([[S(1, 0)], [S(1, 1)], [S(0, 1)]], reduced={(0, 0)})),
    ("relax.tril", lambda: R.tril(t("x", (2, 3, 3))), flow([[S(0, 0)], [], []],
                                                          reduced={(0, 1), (0, 2)})),
    ("relax.triu", lambda: R.triu(t("x", (3, 3)), 1), flow([[], []], reduced={(0, 0), (0, 1)})),
    # creation
    ("relax.full_like", lambda: R.full_like(t("x", (2, 3)), relax.const(1.0)), X23),
    ("relax.zeros_like", lambda: R.zeros_like(t("x", (2, 3))), X23),
    ("relax.ones_like", lambda: R.ones_like(t("x", (2, 3))), X23),
    ("relax.full", lambda: R.full((2, 3), relax.const(1.0)), flow([[], []])),
    ("relax.zeros", lambda: R.zeros((2, 3), "float32"), flow([[], []])),
    ("relax.ones", lambda: R.ones((2, 3), "float32"), flow([[], []])),
    ("relax.arange", lambda: R.arange(0, 10, 1), flow([[]])),
    # reductions and scans
    ("relax.sum", lambda: R.sum(t("x", (2, 3, 4)), axis=[1], keepdims=True),
     flow([[S(0, 0)], [], [S(0, 2)]], reduced={(0, 1)})),
    ("relax.mean", lambda: R.mean(t("x", (2, 3, 4)), axis=[-1]),
     flow([[S(0, 0)], [S(0, 1)]], reduced={(0, 2)})),
    ("relax.max", lambda: R.max(t("x", (2, 3))), flow([], reduced={(0, 0), (0, 1)})),
    ("relax.min", lambda: R.min(t("x", (2, 3)), axis=[0, 1], keepdims=True),
     flow([[], []], reduced={(0, 0), (0, 1)})),
    ("relax.prod", lambda: R.prod(t("x", (2, 3)), axis=[0]), flow([[S(0, 1)]], reduced={(0, 0)})),
    ("relax.variance", lambda: R.variance(t("x", (2, 3)), axis=[1]),
     flow([[S(0, 0)]], reduced={(0, 1)})),
    ("relax.std", lambda: R.std(t("x", (2, 3)), axis=[1], keepdims=True),
     flow([[S(0, 0)], []], reduced={(0, 1)})),
    ("relax.argmax", lambda: R.argmax(t("x", (2, 3, 4)), axis=1),
     flow([[S(0, 0)], [S(0, 2)]], reduced={(0, 1)})),
    ("relax.argmin", lambda: R.argmin(t("x", (2, 3)), axis=None, keepdims=True),
     flow([[], []], reduced={(0, 0), (0, 1)})),
    ("relax.cumsum", lambda: R.cumsum(t("x", (2, 3, 4)), axis=1),
     flow([[S(0, 0)], [], [S(0, 2)]], reduced={(0, 1)})),
    ("relax.cumprod", lambda: R.cumprod(t("x", (2, 3, 4))), None),  # axis=None flattens
    # normalisations
    ("relax.nn.softmax", lambda: R.nn.softmax(t("x", (2, 3, 4)), axis=1),
     flow([[S(0, 0)], [], [S(0, 2)]], reduced={(0, 1)})),
    ("relax.nn.log_softmax", lambda: R.nn.log_softmax(t("x", (2, 3))),
     flow([[S(0, 0)], []], reduced={(0, 1)})),
    ("relax.nn.layer_norm",
     lambda: R.nn.layer_norm(t("x", (2, 3, 4)), t("g", (4,)), t("b", (4,)), axes=[-1]),
     flow([[S(0, 0)], [S(0, 1)], []], reduced={(0, 2)})),
    ("relax.nn.rms_norm", lambda: R.nn.rms_norm(t("x", (2, 3, 4)), t("g", (3, 4)), axes=[1, 2]),
     flow([[S(0, 0)], [], []], reduced={(0, 1), (0, 2)})),
    ("relax.nn.group_norm",
     lambda: R.nn.group_norm(t("x", (2, 4, 3, 3)), t("g", (4,)), t("b", (4,)), num_groups=2,
                             channel_axis=1, axes=[2, 3]),
     flow([[S(0, 0)], [], [], []], reduced={(0, 1), (0, 2), (0, 3)})),
    # convolution
    ("relax.nn.conv2d", lambda: R.nn.conv2d(t("d", (1, 4, 8, 8)), t("w", (6, 4, 3, 3))),
     flow([[S(0, 0)], [S(1, 0)], [], []],
          reduced={(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)})),
    ("relax.nn.conv2d", lambda: R.nn.conv2d(t("d", (1, 4, 8, 8)), t("w", (6, 4, 1, 1))),
     flow([[S(0, 0)], [S(1, 0)], [S(0, 2)], [S(0, 3)]], reduced={(0, 1), (1, 1), (1, 2), (1, 3)})),
    ("relax.nn.conv2d",  # 1x1 but strided: spatial dims are not 1:1
     lambda: R.nn.conv2d(t("d", (1, 4, 8, 8)), t("w", (6, 4, 1, 1)), strides=2),
     flow([[S(0, 0)], [S(1, 0)], [], []],
          reduced={(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)})),
    ("relax.nn.conv2d",
     lambda: R.nn.conv2d(t("d", (1, 8, 8, 4)), t("w", (3, 3, 4, 6)), data_layout="NHWC",
                         kernel_layout="HWIO"),
     flow([[S(0, 0)], [], [], [S(1, 3)]],
          reduced={(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)})),
    ("relax.nn.conv2d_transpose",
     lambda: R.nn.conv2d_transpose(t("d", (1, 4, 8, 8)), t("w", (4, 6, 3, 3))),
     flow([[S(0, 0)], [S(1, 1)], [], []],
          reduced={(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)})),
    # pooling, resize
    ("relax.nn.max_pool2d", lambda: R.nn.max_pool2d(t("d", (1, 4, 8, 8)), pool_size=2, strides=2),
     flow([[S(0, 0)], [S(0, 1)], [], []], reduced={(0, 2), (0, 3)})),
    ("relax.nn.max_pool2d",  # packed layouts are not handled: barrier
     lambda: R.nn.max_pool2d(t("d", (1, 2, 8, 8, 4)), layout="NCHW4c"), None),
    ("relax.nn.avg_pool2d",
     lambda: R.nn.avg_pool2d(t("d", (1, 8, 8, 4)), pool_size=2, strides=2, layout="NHWC"),
     flow([[S(0, 0)], [], [], [S(0, 3)]], reduced={(0, 1), (0, 2)})),
    ("relax.nn.adaptive_avg_pool2d",
     lambda: R.nn.adaptive_avg_pool2d(t("d", (1, 4, 8, 8)), (1, 1)),
     flow([[S(0, 0)], [S(0, 1)], [], []], reduced={(0, 2), (0, 3)})),
    ("relax.image.resize2d", lambda: R.image.resize2d(t("d", (1, 4, 8, 8)), (16, 16)),
     flow([[S(0, 0)], [S(0, 1)], [], []], reduced={(0, 2), (0, 3)})),
    # dropout: (result, mask), both elementwise
    ("relax.nn.dropout", lambda: R.nn.dropout(t("x", (2, 3))),
     flow(X23.outputs[0], X23.outputs[0])),
    # attention: q (2,5,3,8), k (2,7,3,8), v (2,7,3,6) -> (2,5,3,6)
    ("relax.nn.attention",
     lambda: R.nn.attention(t("q", (2, 5, 3, 8)), t("k", (2, 7, 3, 8)), t("v", (2, 7, 3, 6))),
     flow([[S(0, 0), S(1, 0), S(2, 0)], [S(0, 1)], [S(0, 2), S(1, 2), S(2, 2)], [S(2, 3)]],
          reduced={(0, 3), (1, 3), (1, 1), (2, 1)})),
    ("relax.nn.attention",  # grouped-query: TVM legalizes it mixing batches: barrier
     lambda: R.nn.attention(t("q", (2, 5, 4, 8)), t("k", (2, 7, 2, 8)), t("v", (2, 7, 2, 6))),
     None),
    ("relax.nn.attention_bias",  # causal: Sq depends on absolute positions
     lambda: R.nn.attention(t("q", (2, 5, 3, 8)), t("k", (2, 7, 3, 8)), t("v", (2, 7, 3, 6)),
                            t("m", (1, 3, 5, 7)), causal_mask="TopLeft"),
     flow([[S(0, 0), S(1, 0), S(2, 0)], [], [S(0, 2), S(1, 2), S(2, 2), S(3, 1)], [S(2, 3)]],
          reduced={(0, 3), (1, 3), (1, 1), (2, 1), (0, 1), (3, 2), (3, 3)})),
]


def _case_id(case):
    return case[0].removeprefix("relax.")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_rule(case):
    op, build, expected = case
    call = build()
    fl, args, outs = run_rule(call)
    assert str(relax.BlockBuilder().normalize(call).op.name) == op
    assert fl == expected
    if fl is not None:
        check_consistent(fl, args, outs)


def test_every_registered_op_has_a_case_and_is_a_real_op():
    covered = {c[0] for c in CASES}
    assert sorted(covered) == registered_ops()
    for name in registered_ops():
        tvm.ir.Op.get(name)  # raises for a misspelt name


def test_survey_ops_are_registered_or_deliberate_barriers():
    names = {f"relax.{n}" for n in SURVEY_OPS}
    missing = names - set(registered_ops()) - set(rules.DELIBERATE_BARRIERS)
    assert not missing
    assert set(rules.DELIBERATE_BARRIERS) <= names
    for op in rules.DELIBERATE_BARRIERS:
        assert get_dim_rule(op) is None


@pytest.mark.parametrize("op", ["relax.nn.pad", "relax.no_such_op"])
def test_unknown_op_has_no_rule(op):
    assert get_dim_rule(op) is None


def test_register_refuses_overwrite_unless_override():
    original = get_dim_rule("relax.add")
    assert original is not None
    with pytest.raises(ValueError, match=r"relax\.add exists; pass override=True"):
        register_dim_rule("relax.add", rules.barrier)
    assert get_dim_rule("relax.add") is original
    try:
        register_dim_rule("relax.add", rules.barrier, override=True)
        assert get_dim_rule("relax.add") is rules.barrier
        fl, _, _ = run_rule(R.add(t("a", (2,)), t("b", (2,))))
        assert fl is None
    finally:
        register_dim_rule("relax.add", original, override=True)
    assert get_dim_rule("relax.add") is original


def test_arg_and_out_shapes():
    bb = relax.BlockBuilder()
    sl = bb.normalize(R.strided_slice(t("x", (2, 3)), axes=[1], begin=[0], end=[2]))
    assert rules.arg_and_out_shapes(sl) == ([(2, 3), None, None, None], [(2, 2)])
    clip = bb.normalize(R.clip(t("x", (4,)), 0, 1))
    assert rules.arg_and_out_shapes(clip) == ([(4,), None, None], [(4,)])
    sp = bb.normalize(R.split(t("x", (2, 6)), [2], axis=1))
    assert rules.arg_and_out_shapes(sp) == ([(2, 6)], [(2, 2), (2, 4)])
    scalar = bb.normalize(R.sum(t("x", (3,))))
    assert rules.arg_and_out_shapes(scalar) == ([(3,)], [()])


def test_arg_and_out_shapes_rejects_symbolic_and_untyped():
    n = tvm.tirx.Var("n", "int64")
    call = relax.BlockBuilder().normalize(R.add(t("a", (n, 3)), t("b", (3,))))
    with pytest.raises(ValueError, match="symbolic dims"):
        rules.arg_and_out_shapes(call)
    with pytest.raises(ValueError, match="normalize it first"):
        rules.arg_and_out_shapes(R.add(t("a", (2,)), t("b", (2,))))


# --------------------------------------------- numeric check of every source (slow, llvm)


def _out_chunk(srcs, extent):
    """(c, off): the smallest output chunk whose every source slice is whole; off > 0 if it fits."""
    c = math.lcm(*(s.scale.numerator for s in srcs))
    return c, (c if 2 * c <= extent else 0)


def _numeric_cases():
    for case in CASES:
        op, build, expected = case
        if expected is None or op in ("relax.nn.dropout",):  # dropout is random
            continue
        for o, dims in enumerate(expected.outputs):
            for j, srcs in enumerate(dims):
                if srcs:
                    yield pytest.param(build, o, j, id=f"{_case_id(case)}-o{o}-d{j}")


def _random(ty, rng):
    shape, dtype = [int(d) for d in ty.shape.values], str(ty.dtype)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("int"):
        return rng.integers(0, 2, shape).astype(dtype)  # valid indices: every dim is >= 2
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.slow
@pytest.mark.parametrize(("build", "o", "j"), list(_numeric_cases()))
def test_sources_slice_numerically(build, o, j):
    """Slicing each source of output dim j reproduces the same slice of the full output."""
    bb = relax.BlockBuilder()
    call = bb.normalize(build())
    fl, _, outs = run_rule(call)
    srcs = fl.outputs[o][j]
    c, off = _out_chunk(srcs, outs[o][j])
    leaves = arg_leaves(call.args)  # what Src.arg indexes (concat's tuple opened)
    params = list(dict.fromkeys(a for a in leaves if isinstance(a, relax.Var)))
    slots = leaf_slots(call.args)
    with bb.function("main", params):
        with bb.dataflow():
            full = bb.emit(call)
            new_args = list(call.args)
            for s in srcs:
                b, e = off / s.scale, (off + c) / s.scale
                map_leaf(new_args, slots[s.arg], lambda a, s=s, b=b, e=e: bb.emit(
                    R.strided_slice(a, axes=[s.dim], begin=[int(b)], end=[int(e)])))
            for i, a in enumerate(call.args):  # explicit output shapes take the chunked one
                if isinstance(a, relax.ShapeExpr) and len(a.values) == len(outs[0]):
                    new_args[i] = relax.ShapeExpr([*outs[0][:j], c, *outs[0][j + 1:]])
            part = bb.emit(relax.Call(call.op, new_args, call.attrs))
            res = bb.emit_output(relax.Tuple([full, part]))
        bb.emit_func_output(res)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())
    rng = np.random.default_rng(0)
    got_full, got_part = vm["main"](*[tvm.runtime.tensor(_random(p.ty, rng)) for p in params])
    if len(outs) > 1:
        got_full, got_part = got_full[o], got_part[o]
    want = np.take(got_full.numpy(), range(off, off + c), axis=j)
    np.testing.assert_allclose(got_part.numpy(), want, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    tvm.testing.main()
