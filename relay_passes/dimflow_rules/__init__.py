"""Built-in dim-flow rules, one module per op family (grouped like TVM's ``legalize_ops``).

Importing this package registers every rule with ``relay_passes.dimflow.register_dim_rule``;
the analyses import it. Families: ``elementwise`` (unary, binary, where,
activations), ``matmul``, ``manipulate`` (layout, reshape, slicing, indexing, creation),
``reduce`` (statistics, arg-reductions, scans) and ``nn`` (normalisations, conv, pooling,
resize, dropout, attention). Rules read static shapes only; ``arg_and_out_shapes`` extracts
them from a normalized call.

Ops left *without* a rule on purpose are listed in ``DELIBERATE_BARRIERS`` with the reason,
so a report can tell "not chunkable by design" from "not covered yet".

The helpers shared by the family modules are in ``common``.
"""

from __future__ import annotations

from ..dimflow import get_dim_rule, register_dim_rule, registered_ops
from . import elementwise, manipulate, matmul, nn, reduce
from .common import DELIBERATE_BARRIERS, arg_and_out_shapes, barrier, static_shape

__all__ = [
    "DELIBERATE_BARRIERS",
    "arg_and_out_shapes",
    "barrier",
    "elementwise",
    "get_dim_rule",
    "manipulate",
    "matmul",
    "nn",
    "reduce",
    "register_dim_rule",
    "registered_ops",
    "static_shape",
]
