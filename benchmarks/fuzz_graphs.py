"""Random Relax graphs for fuzzing AutoChunk (issue 7).

A graph is first drawn as a ``Recipe`` (plain, JSON-able data: input shapes, a list of steps,
which values are outputs) and then built with ``relax.BlockBuilder`` by ``build_recipe``. Both
are pure functions: the same draws give the same recipe, the same recipe the same IRModule.

Draws come from a ``Draw`` source, so one generator serves two masters:

* ``RandomDraw(seed)``: a ``random.Random`` (the long profile, ``benchmarks/fuzz.py``);
* ``HypothesisDraw(data)``: hypothesis' ``st.data()`` (the fast profile, ``tests/test_fuzz.py``),
  so hypothesis can shrink a failing graph step by step.

The op set is what the chunker supports plus a few barriers: elementwise unary/binary (with
residuals between earlier values and broadcast constants), linear layers (constant weights),
activation x activation matmuls (attention scores ``a @ b^T``, ``p @ v``), softmax /
log_softmax, layer_norm / rms_norm, reductions (sum/mean/max/min, keepdims or not),
reshapes that split or merge dims, permutes, and ``concat`` (no dim-flow rule: a barrier);
two motifs add the patterns chunking is for: attention (q/k/v projections, optional causal
mask, softmax, p @ v) and a fan-out MLP (2-6x wider, activation, back, optional residual).
One graph in four returns a tuple (several outputs); a graph may also return an input as is.
Shapes are small (at most 32K elements per tensor, rows 8..128, often odd) so one example
compiles in under a second on 2 cores, yet its big tensors span many 4 KiB pages (the VM's
pools round to pages, so KiB-sized graphs could not show chunking at all).

``generate(draw) -> FuzzGraph(mod, input_shapes, recipe)`` is the entry point.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import numpy as np

MAX_RANK = 4
MAX_ELEMS = 1 << 15  # per tensor (128 KiB fp32): tens of pages, still fast to compile and run

UNARY = ("relu", "gelu", "silu", "tanh", "sigmoid", "negative", "exp_tanh", "abs")
BINARY = ("add", "subtract", "multiply", "maximum")
REDUCE = ("sum", "mean", "max", "min")
STEP_KINDS = (
    "unary",
    "binary",
    "bias",
    "linear",
    "scores",
    "pv",
    "softmax",
    "norm",
    "reduce",
    "split",
    "merge",
    "permute",
    "concat",
    "attention",
    "mlp",
)


# ------------------------------------------------------------------------------ draw sources
class RandomDraw:
    """Draws from ``random.Random(seed)``."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options):
        options = list(options)
        return options[self.rng.randrange(len(options))]

    def boolean(self) -> bool:
        return self.rng.random() < 0.5


class HypothesisDraw:
    """Draws from hypothesis' ``data`` object (``@given(st.data())``), so failures shrink."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, options):
        return self.data.draw(self.st.sampled_from(list(options)))

    def boolean(self) -> bool:
        return self.data.draw(self.st.booleans())


# ------------------------------------------------------------------------------ the recipe
@dataclass
class Recipe:
    """``inputs``: shapes; ``steps``: dicts ``{"op": kind, "args": [value ids], ...}`` where
    value ids ``0..len(inputs)-1`` are the inputs and step ``k`` defines id ``len(inputs)+k``;
    ``outputs``: value ids returned (a tuple when more than one); ``seed``: for constants."""

    inputs: list[tuple[int, ...]]
    steps: list[dict] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    seed: int = 0
    dtype: str = "float32"

    def to_json(self) -> str:
        return json.dumps(
            {
                "inputs": [list(s) for s in self.inputs],
                "steps": self.steps,
                "outputs": self.outputs,
                "seed": self.seed,
                "dtype": self.dtype,
            },
            sort_keys=True,
        )

    @staticmethod
    def from_json(text: str) -> Recipe:
        d = json.loads(text)
        return Recipe(
            [tuple(s) for s in d["inputs"]],
            d["steps"],
            d["outputs"],
            d.get("seed", 0),
            d.get("dtype", "float32"),
        )


def _dim(draw) -> int:
    """A dim size, often odd, sometimes 1 (broadcast corner cases)."""
    kind = draw.choice(("small", "odd", "even", "one"))
    if kind == "one":
        return 1
    if kind == "small":
        return draw.integer(2, 7)
    if kind == "odd":
        return 2 * draw.integer(4, 32) + 1  # 9..65
    return 2 * draw.integer(4, 32)  # 8..64


def _chunkable(draw) -> int:
    """A dim long enough to be chunked (the search skips dims shorter than 8), often odd;
    long enough that an S x S tensor spans many 4 KiB pages (the VM pool rounds to pages)."""
    return draw.integer(8, 128) if draw.boolean() else 2 * draw.integer(4, 63) + 1


def _fits(shape) -> bool:
    return math.prod(shape) <= MAX_ELEMS and len(shape) <= MAX_RANK


def draw_recipe(draw, max_steps: int = 10) -> Recipe:
    """Draw a random, well-typed recipe (shape rules are checked here, not by TVM)."""
    rank = draw.choice((2, 3, 3))
    seq = _chunkable(draw)
    hid = draw.integer(3, 48)
    base = (seq, hid) if rank == 2 else (draw.integer(1, 3), seq, hid)
    inputs = [base]
    if draw.boolean():  # a second input of the same shape, or a different last dim
        inputs.append(base if draw.boolean() else (*base[:-1], _dim(draw)))
    shapes: list[tuple[int, ...]] = [tuple(s) for s in inputs]
    steps: list[dict] = []
    n_steps = draw.integer(1, max_steps)

    def add(step: dict, shape: tuple[int, ...]) -> int:
        steps.append(step)
        shapes.append(tuple(shape))
        return len(shapes) - 1

    def pick(pred=lambda s: True) -> int | None:
        cands = [i for i, s in enumerate(shapes) if pred(s)]
        if not cands:
            return None
        # favour recent values so graphs are deep, but reach back for residuals
        return cands[-1] if draw.integer(0, 2) else draw.choice(cands)

    for _ in range(n_steps):
        kind = draw.choice(STEP_KINDS)
        a = pick()
        sa = shapes[a]
        if kind == "unary":
            add({"op": "unary", "fn": draw.choice(UNARY), "args": [a]}, sa)
        elif kind == "binary":
            b = pick(lambda s, sa=sa: s == sa)
            if b is None or b == a:
                b = a  # x op x is still a valid binary op
            add({"op": "binary", "fn": draw.choice(BINARY), "args": [a, b]}, sa)
        elif kind == "bias":  # a broadcast constant along one dim (or the last dims)
            k = draw.integer(1, len(sa))
            add({"op": "bias", "fn": draw.choice(BINARY), "args": [a], "ndim": k}, sa)
        elif kind == "linear":
            n = _dim(draw)
            out = (*sa[:-1], n)
            if _fits(out):
                add({"op": "linear", "args": [a], "out": n, "bias": draw.boolean()}, out)
        elif kind in ("scores", "attention"):
            if len(sa) < 2:
                continue
            b = pick(lambda s, sa=sa: s == sa) if draw.boolean() else a
            out = (*sa[:-1], sa[-2])
            if not _fits(out):
                continue
            if kind == "scores":
                add({"op": "scores", "args": [a, b], "scale": 1.0 / math.sqrt(sa[-1])}, out)
            else:  # q, k, v projections + softmax(q k^T) v, as primitive steps
                d = draw.integer(2, 16)
                proj = (*sa[:-1], d)
                if not _fits(proj):
                    continue
                q = add({"op": "linear", "args": [a], "out": d, "bias": False}, proj)
                k = add({"op": "linear", "args": [b], "out": d, "bias": False}, proj)
                v = add({"op": "linear", "args": [b], "out": d, "bias": draw.boolean()}, proj)
                s = add({"op": "scores", "args": [q, k], "scale": 1.0 / math.sqrt(d)}, out)
                if draw.boolean():
                    s = add({"op": "causal", "args": [s]}, out)
                p = add({"op": "softmax", "args": [s], "axis": -1, "log": False}, out)
                add({"op": "pv", "args": [p, v]}, proj)
        elif kind == "mlp":  # fan out 2-6x, activation, back: a chunkable memory bump
            wide = (*sa[:-1], sa[-1] * draw.integer(2, 6))
            if not _fits(wide):
                continue
            h = add({"op": "linear", "args": [a], "out": wide[-1], "bias": True}, wide)
            h = add({"op": "unary", "fn": draw.choice(("gelu", "relu", "silu")), "args": [h]}, wide)
            h = add({"op": "linear", "args": [h], "out": sa[-1], "bias": False}, sa)
            if draw.boolean():
                add({"op": "binary", "fn": "add", "args": [a, h]}, sa)  # residual
        elif kind == "pv":
            if len(sa) < 2:
                continue
            m = sa[-1]
            b = pick(lambda s, sa=sa, m=m: len(s) == len(sa) and s[:-2] == sa[:-2] and s[-2] == m)
            if b is None:
                continue
            out = (*sa[:-1], shapes[b][-1])
            if _fits(out):
                add({"op": "pv", "args": [a, b]}, out)
        elif kind == "softmax":
            axis = draw.integer(-len(sa), -1)
            add({"op": "softmax", "args": [a], "axis": axis, "log": draw.boolean()}, sa)
        elif kind == "norm":
            if len(sa) < 2:  # TVM 0.27 cannot lower rms_norm of a 1-D tensor (see test_fuzz)
                continue
            add({"op": "norm", "args": [a], "fn": draw.choice(("layer", "rms"))}, sa)
        elif kind == "reduce":
            if len(sa) < 2:
                continue
            axis = draw.integer(0, len(sa) - 1)
            keep = draw.boolean()
            out = sa[:axis] + ((1,) if keep else ()) + sa[axis + 1 :]
            add(
                {
                    "op": "reduce",
                    "fn": draw.choice(REDUCE),
                    "args": [a],
                    "axis": axis,
                    "keepdims": keep,
                },
                out,
            )
        elif kind == "split":
            if len(sa) >= MAX_RANK:
                continue
            axis = draw.integer(0, len(sa) - 1)
            n = sa[axis]
            divs = [f for f in range(2, n) if n % f == 0]
            if not divs:
                continue
            f = draw.choice(divs)
            out = (*sa[:axis], f, n // f, *sa[axis + 1 :])
            add({"op": "reshape", "args": [a], "shape": list(out)}, out)
        elif kind == "merge":
            if len(sa) < 3:
                continue
            axis = draw.integer(0, len(sa) - 2)
            out = (*sa[:axis], sa[axis] * sa[axis + 1], *sa[axis + 2 :])
            add({"op": "reshape", "args": [a], "shape": list(out)}, out)
        elif kind == "permute":
            perm = list(range(len(sa)))
            if draw.boolean() and len(sa) >= 2:
                perm[-1], perm[-2] = perm[-2], perm[-1]
            else:
                for i in range(len(perm) - 1, 0, -1):
                    j = draw.integer(0, i)
                    perm[i], perm[j] = perm[j], perm[i]
            add({"op": "permute", "args": [a], "perm": perm}, tuple(sa[p] for p in perm))
        elif kind == "concat":
            axis = draw.integer(0, len(sa) - 1)
            out = (*sa[:axis], 2 * sa[axis], *sa[axis + 1 :])
            if _fits(out):
                add({"op": "concat", "args": [a, a], "axis": axis}, out)
    n_in = len(inputs)
    last = len(shapes) - 1
    outputs = [last]
    if steps and draw.integer(0, 3) == 0:  # several outputs: a tuple
        other = draw.integer(0, last - 1) if last > 0 else 0
        if other >= n_in or draw.boolean():
            outputs.append(other)
    return Recipe(inputs, steps, outputs, seed=draw.integer(0, 2**31 - 1))


# ------------------------------------------------------------------------------ building
def build_recipe(recipe: Recipe):
    """The Relax IRModule of ``recipe`` (``main`` only, one dataflow block), via BlockBuilder."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(recipe.seed)
    dt = recipe.dtype

    def const(shape, scale=1.0):
        return relax.const((rng.standard_normal(shape) * scale).astype(dt), dt)

    params = [
        relax.Var(f"x{i}", relax.TensorType(tuple(s), dt)) for i, s in enumerate(recipe.inputs)
    ]
    shapes = [tuple(s) for s in recipe.inputs]
    bb = relax.BlockBuilder()
    op = relax.op
    with bb.function("main", params):
        with bb.dataflow():
            vals: list = list(params)
            for st in recipe.steps:
                args = [vals[i] for i in st["args"]]
                sa = shapes[st["args"][0]]
                kind = st["op"]
                if kind == "unary":
                    fn = st["fn"]
                    x = args[0]
                    if fn == "exp_tanh":
                        e = op.exp(bb.emit(op.tanh(x)))
                    elif fn in ("relu", "gelu", "silu"):
                        e = getattr(op.nn, fn)(x)
                    else:
                        e = getattr(op, fn)(x)
                    out = sa
                elif kind == "binary":
                    e, out = getattr(op, st["fn"])(args[0], args[1]), sa
                elif kind == "bias":
                    c = const(sa[-st["ndim"] :], 0.5)
                    e, out = getattr(op, st["fn"])(args[0], c), sa
                elif kind == "linear":
                    n = st["out"]
                    w = const((sa[-1], n), 1.0 / math.sqrt(sa[-1]))
                    e = op.matmul(args[0], w)
                    if st.get("bias"):
                        e = op.add(bb.emit(e), const((n,), 0.1))
                    out = (*sa[:-1], n)
                elif kind == "scores":
                    perm = list(range(len(sa)))
                    perm[-1], perm[-2] = perm[-2], perm[-1]
                    kt = bb.emit(op.permute_dims(args[1], perm))
                    s = bb.emit(op.matmul(args[0], kt))
                    e = op.multiply(s, relax.const(st["scale"], dt))
                    out = (*sa[:-1], sa[-2])
                elif kind == "causal":  # a -inf-free causal mask: large negative above diag
                    n = sa[-1]
                    mask = np.triu(np.full((sa[-2], n), -1e4, dt), 1)
                    e, out = op.add(args[0], relax.const(mask, dt)), sa
                elif kind == "pv":
                    sb = shapes[st["args"][1]]
                    e, out = op.matmul(args[0], args[1]), (*sa[:-1], sb[-1])
                elif kind == "softmax":
                    f = op.nn.log_softmax if st.get("log") else op.nn.softmax
                    e, out = f(args[0], axis=st["axis"]), sa
                elif kind == "norm":
                    d = sa[-1]
                    g = relax.const((1 + 0.1 * rng.standard_normal(d)).astype(dt), dt)
                    if st["fn"] == "layer":
                        b = const((d,), 0.1)
                        e = op.nn.layer_norm(args[0], g, b, axes=[-1])
                    else:
                        e = op.nn.rms_norm(args[0], g, axes=[-1])
                    out = sa
                elif kind == "reduce":
                    ax, keep = st["axis"], st["keepdims"]
                    e = getattr(op, st["fn"])(args[0], axis=[ax], keepdims=keep)
                    out = sa[:ax] + ((1,) if keep else ()) + sa[ax + 1 :]
                elif kind == "reshape":
                    out = tuple(st["shape"])
                    e = op.reshape(args[0], out)
                elif kind == "permute":
                    e = op.permute_dims(args[0], st["perm"])
                    out = tuple(sa[p] for p in st["perm"])
                elif kind == "concat":
                    ax = st["axis"]
                    e = op.concat(args, axis=ax)
                    out = (*sa[:ax], sum(shapes[i][ax] for i in st["args"]), *sa[ax + 1 :])
                else:
                    raise ValueError(f"unknown recipe step {kind!r}")
                vals.append(bb.emit(e))
                shapes.append(tuple(out))
            if len(recipe.outputs) == 1:
                res = bb.emit_output(vals[recipe.outputs[0]])
            else:
                res = bb.emit_output(relax.Tuple([vals[i] for i in recipe.outputs]))
        bb.emit_func_output(res)
    mod = bb.get()
    assert isinstance(mod, tvm.IRModule)
    return mod


@dataclass(frozen=True)
class FuzzGraph:
    mod: object  # tvm.IRModule
    input_shapes: tuple[tuple[int, ...], ...]
    recipe: Recipe

    def inputs(self, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.uniform(-1, 1, s).astype(self.recipe.dtype) for s in self.input_shapes]


def generate(draw, max_steps: int = 10) -> FuzzGraph:
    """Draw a recipe and build it: ``(IRModule, input shapes, recipe)``."""
    recipe = draw_recipe(draw, max_steps)
    return from_recipe(recipe)


def from_recipe(recipe: Recipe) -> FuzzGraph:
    return FuzzGraph(build_recipe(recipe), tuple(tuple(s) for s in recipe.inputs), recipe)
