"""FastMathPolynomial: float32 exp/tanh/erf/sigmoid as plain TIR arithmetic.

LLVM lowers these intrinsics to scalar libm calls, so a kernel that uses them (softmax, GELU,
SiLU) does not vectorize: a vectorized gelu_tanh on 1024x1024 took 6.4 ms on one core, 1.6 ms
after this pass. Each scalar float32 call becomes a branch-free polynomial (mul/add/select/
floor, bit tricks for 2^n) that vectorizes, with libm's inf/nan/-0.0 results; measured max
error: exp 8.4e-8 relative, tanh/erf/sigmoid 1.1e-7 absolute and 1.7e-7 relative.

Pipeline position: on PrimFuncs before TIR lowering, before or after scheduling (a vectorized
loop is still scalar code then), e.g. right after ``cpu_schedules.schedule_pass()``.
Not handled, left as they are: other dtypes, vector-typed calls (after VectorizeLoop), and
calls with more than ``MAX_NESTING`` levels of these calls inside them.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import tvm
import tvm_ffi
from tvm import tirx

_F32 = "float32"
# Above ln(FLT_MAX) the scaled result overflows to inf on its own.
_EXP_CLAMP = 88.8
# Below ln(2^-150) exp rounds to 0; clamping there keeps n >= -150 and the bit tricks in range.
_EXP_MIN = -104.0
# Cody-Waite ln2: _LN2_HI has 9 significant bits, so n * _LN2_HI is exact for |n| <= 150.
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
# Cephes expf (exp(r) = 1 + r + r^2 P(r) on |r| <= ln2/2) and tanhf (|x| < 0.625).
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1)
_EXP_P += (5.0000001201e-1,)
_TANH_P = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1)
_TANH_P += (-3.33332819422e-1,)
_TANH_SMALL = 0.625
# Our fits (Chebyshev-node least squares, float64): erf(x)/x in x^2 on |x| < 1 (rel. error
# 4e-8), and log(erfc(x)) on [1, 4] (abs. error 1.3e-8, i.e. erfc relative); erf(4) is 1.0f.
_ERF_SMALL = (-5.62539597e-4, 4.91602339e-3, -2.67099495e-2, 1.12801303e-1, -3.76123197e-1)
_ERF_SMALL += (1.12837912,)
_LOG_ERFC = (1.61406161e-06, -4.55906226e-05, 5.92769539e-04, -4.74022235e-03, 2.63647174e-02)
_LOG_ERFC += (-1.09978245e-01, -6.31937094e-01, -1.13016668, 3.03212968e-04)
_ERF_CLAMP = 4.0


def _c(value: float):
    return tirx.const(value, _F32)


class _Lets:
    """Sequential let-bindings: the builders reuse operands many times, and a plain expression
    tree would repeat (and re-evaluate) them; a Let must also appear once in a well-formed tree."""

    def __init__(self):
        self._bindings = []

    def __call__(self, name: str, value):
        var = tirx.Var(name, value.ty)
        self._bindings.append((var, value))
        return var

    def wrap(self, body):
        for var, value in reversed(self._bindings):
            body = tirx.Let(var, value, body)
        return body


def _horner(x, coefs):
    acc = _c(coefs[0])
    for coef in coefs[1:]:
        acc = acc * x + _c(coef)
    return acc


def _pow2(k):
    """2^k for int32 k in [-126, 127], written straight into the exponent field."""
    return tirx.reinterpret(_F32, tirx.shift_left(k + tirx.const(127, "int32"), 23))


# isnan and copysign are calls TVM's VectorizeLoop cannot widen (it scalarizes the whole loop):
# both are written on the bits instead
def _bits(x):
    return tirx.reinterpret("int32", x)


def _int(v: int):
    return tirx.const(v, "int32")


def _isnan(x):
    return tirx.bitwise_and(_bits(x), _int(0x7FFFFFFF)) > _int(0x7F800000)


def _copysign(mag, sign):
    bits = tirx.bitwise_or(
        tirx.bitwise_and(_bits(mag), _int(0x7FFFFFFF)),
        tirx.bitwise_and(_bits(sign), _int(-(1 << 31))),
    )
    return tirx.reinterpret(_F32, bits)


def fast_exp(x):
    """exp(x), float32: rel. error < 1e-7; inf from 88.7228394, 0 below ln(2^-150), nan kept."""
    let = _Lets()
    x = let("x", x)
    # Past 88.8 the product below overflows to inf by itself (as exp must from 88.7228394 up,
    # checked by the tests), so no select is needed there; min/max lose nan (restored below).
    xc = let("xc", tirx.min(tirx.max(x, _c(_EXP_MIN)), _c(_EXP_CLAMP)))
    n = let("n", tirx.floor(xc * _c(math.log2(math.e)) + _c(0.5)))
    r = let("r", xc - n * _c(_LN2_HI) - n * _c(_LN2_LO))
    k = let("k", n.astype("int32"))
    # k spans [-150, 128], wider than one exponent field: scale by two halves (one rounding,
    # in the second product, so denormal results come out right).
    half = let("half", tirx.shift_right(k, 1))
    y = (_horner(r, _EXP_P) * (r * r) + r + _c(1.0)) * _pow2(half) * _pow2(k - half)
    return let.wrap(tirx.Select(_isnan(x), x, y))


# Signs go through a copysign, not Select: LLVM codegen re-simplifies every Let value with the
# earlier ones substituted, entering each Select's condition as a constraint; with Selects
# erf(erf(x)) took 1.4 s to compile, with copysign 0.09 s.
def fast_tanh(x):
    """tanh(x), float32: odd polynomial near 0 (relative accuracy, -0.0 kept), else via exp."""
    let = _Lets()
    x = let("x", x)
    z = let("z", x * x)
    # x * (1 + ...) rather than x + x * (...): the latter turns -0.0 into +0.0.
    small = x * (_c(1.0) + z * _horner(z, _TANH_P))
    ax = let("ax", tirx.abs(x))
    # exp(2|x|) is inf for |x| > 44.4, giving exactly 1; nan propagates through exp.
    big = _c(1.0) - _c(2.0) / (fast_exp(ax + ax) + _c(1.0))
    return let.wrap(tirx.Select(ax < _c(_TANH_SMALL), small, _copysign(big, x)))


def fast_erf(x):
    """erf(x), float32: x * P(x^2) below 1, else 1 - exp(Q(|x|)) with Q fitted to log(erfc)."""
    let = _Lets()
    x = let("x", x)
    small = x * _horner(let("z", x * x), _ERF_SMALL)
    ax = let("ax", tirx.abs(x))
    big = _c(1.0) - fast_exp(_horner(let("t", tirx.min(ax, _c(_ERF_CLAMP))), _LOG_ERFC))
    y = tirx.Select(ax < _c(1.0), small, _copysign(big, x))
    return let.wrap(tirx.Select(_isnan(x), x, y))


def fast_sigmoid(x):
    """sigmoid(x) = 1 / (1 + exp(-x)), float32; exp's inf and 0 give exactly 0 and 1."""
    return _c(1.0) / (_c(1.0) + fast_exp(-x))


_REWRITES = MappingProxyType(
    {
        tvm.ir.Op.get("tirx.exp"): fast_exp,
        tvm.ir.Op.get("tirx.tanh"): fast_tanh,
        tvm.ir.Op.get("tirx.erf"): fast_erf,
        tvm.ir.Op.get("tirx.sigmoid"): fast_sigmoid,
    }
)
# That re-simplification (see fast_tanh) also makes compile time exponential in how deeply
# rewritten calls nest in one expression: tanh(tanh(tanh(x))) 0.6 s, four deep > 10 s. A call
# with more than this many levels of them (itself included) keeps its libm call.
MAX_NESTING = 2


def _build(call):
    """The builder for ``call`` if it is a scalar float32 call we rewrite, else None."""
    build = _REWRITES.get(call.op) if isinstance(call.op, tvm.ir.Op) else None
    return build if build is not None and str(call.ty.dtype) == _F32 else None


def _nesting(func) -> dict[int, int]:
    """Rewritable call (by handle) -> 1 + the deepest nesting of such calls in its argument."""
    depth, stack = {}, [0]

    def on_call(call, visitor):
        if _build(call) is None:
            return visitor.default_visit(call)
        stack.append(0)
        visitor.default_visit(call)
        depth[call.__chandle__()] = stack.pop() + 1
        stack[-1] = max(stack[-1], depth[call.__chandle__()])
        return None

    tvm_ffi.structural_visit(func, [(tvm.ir.Call, on_call)])
    return depth


def rewrite_fast_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with scalar float32 exp/tanh/erf/sigmoid calls replaced (same object if none)."""
    depth = _nesting(func)

    def on_call(call, mutator):
        nested = depth.get(call.__chandle__(), 0)
        call = mutator.default_mutate(call)
        if not 0 < nested <= MAX_NESTING:
            return call
        return _build(call)(call.args[0])

    return tvm_ffi.structural_mutate(func, [(tvm.ir.Call, on_call)]) if depth else func


def fast_math_pass() -> tvm.transform.Pass:
    """The PrimFunc pass ``FastMathPolynomial``: ``rewrite_fast_math`` on every PrimFunc."""
    return tirx.transform.prim_func_pass(
        lambda func, _mod, _ctx: rewrite_fast_math(func), opt_level=0, name="FastMathPolynomial"
    )


__all__ = [
    "MAX_NESTING",
    "fast_erf",
    "fast_exp",
    "fast_math_pass",
    "fast_sigmoid",
    "fast_tanh",
    "rewrite_fast_math",
]
