"""Linear algebra: ``relax.matmul``.

``a: (..., M, K) @ b: (..., K, N) -> (..., M, N)`` with numpy semantics: batch dims broadcast
(right-aligned; a size-1 batch dim against a larger one is not a source), a 1-D ``a`` has no M
and a 1-D ``b`` has no N in the output. M comes from ``a``'s dim ``ndim_a-2``, N from ``b``'s
dim ``ndim_b-1``; K is contracted, so it is reduced in both operands.

``relax.einsum`` has no rule on purpose (see ``DELIBERATE_BARRIERS``).
"""

from __future__ import annotations

from ..dimflow import OpFlow, Src, builtin_rule


@builtin_rule("relax.matmul")
def matmul(call, arg_shapes, out_shapes) -> OpFlow:
    a, b = arg_shapes[0], arg_shapes[1]
    out = out_shapes[0]
    na, nb = len(a), len(b)
    has_m, has_n = na >= 2, nb >= 2
    n_batch = len(out) - has_m - has_n
    dims: list[list[Src]] = [[] for _ in out]
    for arg, shp in ((0, a), (1, b)):
        batch = shp[:-2]
        for k, size in enumerate(batch):
            j = n_batch - len(batch) + k
            if size == out[j]:
                dims[j].append(Src(arg, k))
    if has_m:
        dims[n_batch].append(Src(0, na - 2))
    if has_n:
        dims[-1].append(Src(1, nb - 1))
    reduced = frozenset({(0, na - 1), (1, nb - 2 if has_n else 0)})
    return OpFlow((tuple(tuple(d) for d in dims),), reduced)
