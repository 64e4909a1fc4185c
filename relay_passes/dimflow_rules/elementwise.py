"""Elementwise ops: unary math, casts, activations, binary arithmetic/comparison, where, clip.

Every output dim comes 1:1 from the aligned dim of each tensor argument of the same extent
(numpy broadcasting, right-aligned); a size-1 argument dim broadcast against a larger output
dim is not a source, so that argument stays whole. Nothing is reduced.
"""

from __future__ import annotations

from ..dimflow import OpFlow, builtin_rule, identity_flow


def _elementwise(tensor_args: tuple[int, ...]):
    """Rule factory: broadcasting elementwise op over the tensor args at ``tensor_args``."""

    def rule(call, arg_shapes, out_shapes) -> OpFlow:
        args = tuple(a for a in tensor_args if a < len(arg_shapes) and arg_shapes[a] is not None)
        out = out_shapes[0]
        return identity_flow(len(out), args, arg_shapes, out)

    return rule


_unary = _elementwise((0,))
_binary = _elementwise((0, 1))
_ternary = _elementwise((0, 1, 2))

UNARY = (
    "abs", "acos", "asin", "astype", "atan", "bitwise_not", "ceil", "cos", "cosh", "erf", "exp",
    "floor", "isfinite", "isinf", "isnan", "log", "logical_not", "negative", "round", "rsqrt",
    "sigmoid", "sign", "sin", "sinh", "sqrt", "square", "tan", "tanh", "trunc",
    # activations live in relax.nn but are plain elementwise maps
    "nn.gelu", "nn.gelu_tanh", "nn.leakyrelu", "nn.relu", "nn.silu", "nn.softplus",
    # clip(x, min, max): min/max are prim values, not tensors
    "clip",
)  # fmt: skip
BINARY = (
    "add", "bitwise_and", "bitwise_or", "bitwise_xor", "divide", "equal", "floor_divide",
    "floor_mod", "greater", "greater_equal", "less", "less_equal", "logical_and", "logical_or",
    "logical_xor", "maximum", "minimum", "mod", "multiply", "not_equal", "power", "subtract",
)  # fmt: skip
TERNARY = ("where",)

for _name in UNARY:
    builtin_rule(f"relax.{_name}", _unary)
for _name in BINARY:
    builtin_rule(f"relax.{_name}", _binary)
for _name in TERNARY:
    builtin_rule(f"relax.{_name}", _ternary)
