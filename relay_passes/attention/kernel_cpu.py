"""A flash-style attention kernel for llvm targets, written as scheduled TIR.

``O[b] = softmax(A[b] @ Bt[b] + bias, masked causally) @ V[b]`` with the row max, row sum and
output accumulated tile by tile (online softmax): no Sq x Sk tensor exists, only a
``TQ x TK`` score tile per task (TVM's per-thread workspace). One parallel task per (batch
row ``b``, block of ``TQ`` query rows); causal tasks stop at the last key tile their rows can
see, so causal work is about half.

Inner loops are register-blocked like ``cpu_schedules.matmul``: ``R`` query rows times a
vector of keys (scores) or of output features (P @ V) accumulate in small stack tiles that
LLVM keeps in registers; a tile that runs past ``Sk`` reads clamped keys and masks them.
Speed against torch SDPA and the unfused build: ``benchmarks/README.md``, "Fused attention".
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

NEG_INF = float("-inf")
TQ, TK, R, NB = 48, 64, 6, 8  # query rows per task, keys per tile, register rows, max/sum lanes


def _lanes(n: int, widest: int = 16) -> int:
    """The widest of 16, 8, 4, 2, 1 that divides ``n`` (a vector loop needs whole vectors)."""
    w = widest
    while n % w:
        w //= 2
    return w


@dataclass(frozen=True)
class AttentionShape:
    """What one fused call computes; the kernel is built per distinct shape.

    ``bias``: None, or ``(rows, bq, bk, div)``: the bias is read as ``bias[(b // div) % rows,
    i if bq > 1 else 0, j if bk > 1 else 0]`` (a broadcast over batch rows, query rows or keys).
    ``causal``: key ``j`` is seen by query row ``i`` iff ``j <= i + diag`` (``diag`` a run-time
    int64 argument: a query chunk's offset). ``sq`` and ``sk`` are ints, or the names of
    symbolic lengths (the kernel is then built once for every length)."""

    batch: int
    sq: int | str
    sk: int | str
    h: int
    hv: int
    dtype: str
    causal: bool
    bias: tuple[int, int, int, int] | None = None


def cpu_kernel(shape: AttentionShape):
    """The PrimFunc (private, already scheduled): params ``(A, Bt, V, bias, diag, O)``; without
    a bias ``bias`` is any (1, 1, 1) tensor (not read), without a causal mask ``diag`` is unused."""
    BN, Sq, Sk, H, Hv, dtype = shape.batch, shape.sq, shape.sk, shape.h, shape.hv, shape.dtype
    # a symbolic length (a name) becomes this kernel's own var, bound by the buffers' shapes
    syms = {n: T.int64() for n in (Sq, Sk) if isinstance(n, str)}
    Sq, Sk = (syms.get(n, n) for n in (Sq, Sk))
    causal = shape.causal
    rows, bq, bk, div = shape.bias or (1, 1, 1, 1)
    read_q, read_k = bq != 1, bk != 1  # the bias varies along query rows / keys
    bq, bk = (syms.get(n, n) for n in (bq, bk))
    has_bias = shape.bias is not None
    nqt = (Sq + TQ - 1) // TQ
    nkt_all = (Sk + TK - 1) // TK
    VK, VD = _lanes(TK), _lanes(Hv)
    zero, ninf = T.float32(0), T.float32(NEG_INF)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(
        a: T.Buffer((BN, Sq, H), dtype),
        bt: T.Buffer((BN, H, Sk), dtype),
        v: T.Buffer((BN, Sk, Hv), dtype),
        bias: T.Buffer((rows, bq, bk), dtype),
        diag: T.int64,
        o: T.Buffer((BN, Sq, Hv), dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        # a root block: TVM's analyses (HasReshapePattern) expect an sblock PrimFunc
        with T.sblock("root"):
            for task in T.parallel(BN * nqt):
                acc = T.decl_buffer((TQ, Hv), dtype, scope="local")
                s = T.decl_buffer((TQ, TK), dtype, scope="local")
                mrow = T.decl_buffer((TQ,), dtype, scope="local")
                lrow = T.decl_buffer((TQ,), dtype, scope="local")
                part = T.decl_buffer((NB,), dtype, scope="local")
                b = task // nqt
                q0 = task % nqt * TQ
                bb = b // div % rows
                for i, d in T.grid(TQ, Hv):
                    acc[i, d] = zero
                for i in range(TQ):
                    mrow[i] = ninf
                    lrow[i] = zero
                # causal: the last key any row of this task sees is q0 + TQ - 1 + diag
                nkt = (
                    T.max(T.min(T.Cast("int32", (T.Cast("int64", q0 + TQ - 1) + diag) // TK + 1),
                                nkt_all), 0)
                    if causal else nkt_all
                )
                for kb in range(nkt):
                    k0 = kb * TK
                    for ib in range(TQ // R):
                        for jb in range(TK // VK):
                            # R x VK scores in a small stack tile: LLVM keeps it in registers
                            # (the 12 KiB tiles come from the workspace pool and stay in memory)
                            cs = T.decl_buffer((R, VK), dtype, scope="local")
                            for i in T.unroll(R):
                                for j in T.vectorized(VK):
                                    cs[i, j] = zero
                            if k0 + TK <= Sk:
                                for h in range(H):
                                    for i in T.unroll(R):
                                        for j in T.vectorized(VK):
                                            cs[i, j] = cs[i, j] + a[
                                                b, T.min(q0 + ib * R + i, Sq - 1), h
                                            ] * bt[b, h, k0 + jb * VK + j]
                            else:  # the last tile: keys past Sk read the last key, masked below
                                for h in range(H):
                                    for i in T.unroll(R):
                                        for j in T.vectorized(VK):
                                            cs[i, j] = cs[i, j] + a[
                                                b, T.min(q0 + ib * R + i, Sq - 1), h
                                            ] * bt[b, h, T.min(k0 + jb * VK + j, Sk - 1)]
                            for i in T.unroll(R):
                                for j in T.vectorized(VK):
                                    s[ib * R + i, jb * VK + j] = cs[i, j]
                    for i in range(TQ):
                        qi = T.min(q0 + i, Sq - 1)
                        if has_bias:
                            if k0 + TK <= Sk:
                                for j in T.vectorized(TK):
                                    s[i, j] = s[i, j] + bias[bb, qi if read_q else 0, k0 + j if read_k else 0]  # noqa: E501 (TVMScript, nested loops)
                            else:
                                for j in T.vectorized(TK):
                                    s[i, j] = s[i, j] + bias[
                                        bb, qi if read_q else 0, T.min(k0 + j, Sk - 1) if read_k else 0  # noqa: E501 (TVMScript, nested loops)
                                    ]
                        for j in T.vectorized(TK):
                            s[i, j] = T.Select(
                                k0 + j < Sk
                                and (not causal or T.Cast("int64", k0 + j) <= T.Cast("int64", q0 + i) + diag),  # noqa: E501 (TVMScript, nested loops)
                                s[i, j],
                                ninf,
                            )
                        for j in T.vectorized(NB):
                            part[j] = s[i, j]
                        for jb in range(1, TK // NB):
                            for j in T.vectorized(NB):
                                part[j] = T.max(part[j], s[i, jb * NB + j])
                        mnew = T.max(
                            mrow[i],
                            T.max(
                                T.max(T.max(part[0], part[1]), T.max(part[2], part[3])),
                                T.max(T.max(part[4], part[5]), T.max(part[6], part[7])),
                            ),
                        )
                        # a row with no finite score yet keeps exp(-inf) = 0 rather than NaN
                        msafe = T.Select(mnew == ninf, zero, mnew)
                        for j in T.vectorized(TK):
                            s[i, j] = T.exp(s[i, j] - msafe)
                        for j in T.vectorized(NB):
                            part[j] = s[i, j]
                        for jb in range(1, TK // NB):
                            for j in T.vectorized(NB):
                                part[j] = part[j] + s[i, jb * NB + j]
                        corr = T.exp(mrow[i] - msafe)
                        lrow[i] = lrow[i] * corr + (
                            ((part[0] + part[1]) + (part[2] + part[3]))
                            + ((part[4] + part[5]) + (part[6] + part[7]))
                        )
                        mrow[i] = mnew
                        for d in T.vectorized(Hv):
                            acc[i, d] = acc[i, d] * corr
                    for ib in range(TQ // R):
                        for db in range(Hv // VD):
                            ca = T.decl_buffer((R, VD), dtype, scope="local")  # as cs above
                            for i in T.unroll(R):
                                for d in T.vectorized(VD):
                                    ca[i, d] = acc[ib * R + i, db * VD + d]
                            for j in range(TK):
                                for i in T.unroll(R):
                                    for d in T.vectorized(VD):
                                        ca[i, d] = ca[i, d] + s[ib * R + i, j] * v[
                                            b, T.min(k0 + j, Sk - 1), db * VD + d
                                        ]
                            for i in T.unroll(R):
                                for d in T.vectorized(VD):
                                    acc[ib * R + i, db * VD + d] = ca[i, d]
                for i in range(TQ):
                    if q0 + i < Sq:
                        for d in T.vectorized(Hv):
                            o[b, q0 + i, d] = acc[i, d] / lrow[i]

    return kernel
