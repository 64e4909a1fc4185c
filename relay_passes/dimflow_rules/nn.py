"""Neural-network ops: normalisations, convolution, pooling, resize, dropout, attention.

* softmax/log_softmax, layer_norm, rms_norm, group_norm: identity on argument 0 except the
  normalized axes, which are reduced (group_norm also reduces its channel axis: groups mix
  channels). gamma/beta/weight are indexed by the reduced axes, so they are never sources.
* conv2d (any permutation of NCHW/OIHW layouts): out N <- data N, out C <- weight O; data C
  and weight I are contracted, spatial dims are reduced (kernel window) except for a 1x1,
  stride-1 kernel whose output spatial size equals the input's (then identity).
  conv2d_transpose likewise (kernel IOHW; out C <- weight O only when groups == 1).
* pooling and image.resize2d: N and C identity, spatial dims reduced.
* dropout: both outputs (result, mask) are elementwise in argument 0.
* attention/attention_bias (BSNH): out (B, Sq, H, Dv). B and H come from q, k, v (and the
  bias where its dim is not broadcast), Sq from q, Dv from v; Sk and D are contracted. A
  causal mask or sliding window depends on absolute query positions, so Sq is then reduced.
  Grouped-query attention (k/v heads != q heads) is a barrier: TVM 0.27 legalizes it by
  reshaping k/v to B*H heads, which mixes batches.
"""

from __future__ import annotations

from ..dimflow import OpFlow, Src, builtin_rule
from .common import const_ints, norm_axes, norm_axis, pairs, same_dims

# ------------------------------------------------------------------- normalisations


def _normalize_over(axes_of):
    """Rule factory: identity on arg 0 except the axes ``axes_of(call)``, which are reduced."""

    def rule(call, arg_shapes, out_shapes) -> OpFlow:
        nd = len(arg_shapes[0])
        axes = norm_axes(axes_of(call), nd)
        return OpFlow((tuple(same_dims(0, nd, axes)),), frozenset(pairs(0, axes)))

    return rule


_softmax = _normalize_over(lambda call: (call.attrs.axis,))
for _name in ("nn.softmax", "nn.log_softmax"):
    builtin_rule(f"relax.{_name}", _softmax)
builtin_rule("relax.nn.layer_norm", _normalize_over(lambda call: call.attrs.axes))
builtin_rule("relax.nn.rms_norm", _normalize_over(lambda call: call.attrs.axes))
builtin_rule(
    "relax.nn.group_norm",
    _normalize_over(lambda call: (*call.attrs.axes, call.attrs.channel_axis)),
)


# -------------------------------------------------------------------------- layouts


def _letters(layout, letters: str) -> dict[str, int] | None:
    """{letter: position} when ``layout`` is a permutation of ``letters``, else None."""
    s = str(layout)
    if sorted(s) != sorted(letters):
        return None
    return {c: i for i, c in enumerate(s)}


def _spatial_flow(layout, out_layout, nd_out) -> tuple[list, set] | None:
    """N, C identity and H, W reduced for a data-layout op (pooling, resize)."""
    d = _letters(layout, "NCHW")
    o = _letters(out_layout if out_layout is not None else layout, "NCHW")
    if d is None or o is None:
        return None
    dims: list[tuple[Src, ...]] = [() for _ in range(nd_out)]
    for c in "NC":
        dims[o[c]] = (Src(0, d[c]),)
    return dims, pairs(0, (d["H"], d["W"]))


def _pool(call, arg_shapes, out_shapes) -> OpFlow | None:
    r = _spatial_flow(call.attrs.layout, call.attrs.out_layout, len(out_shapes[0]))
    return None if r is None else OpFlow((tuple(r[0]),), frozenset(r[1]))


def _resize(call, arg_shapes, out_shapes) -> OpFlow | None:
    r = _spatial_flow(call.attrs.layout, None, len(out_shapes[0]))
    return None if r is None else OpFlow((tuple(r[0]),), frozenset(r[1]))


for _name in ("nn.max_pool2d", "nn.avg_pool2d", "nn.adaptive_avg_pool2d"):
    builtin_rule(f"relax.{_name}", _pool)
builtin_rule("relax.image.resize2d", _resize)


# ----------------------------------------------------------------------- convolution


def _conv_layouts(call, kernel_letters: str):
    d = _letters(call.attrs.data_layout, "NCHW")
    w = _letters(call.attrs.kernel_layout, kernel_letters)
    out_layout = call.attrs.out_layout or call.attrs.data_layout
    o = _letters(out_layout, "NCHW")
    return None if d is None or w is None or o is None else (d, w, o)


@builtin_rule("relax.nn.conv2d")
def conv2d(call, arg_shapes, out_shapes) -> OpFlow | None:
    lay = _conv_layouts(call, "OIHW")
    if lay is None:
        return None
    d, w, o = lay
    data, weight, out = arg_shapes[0], arg_shapes[1], out_shapes[0]
    dims: list[tuple[Src, ...]] = [() for _ in out]
    dims[o["N"]] = (Src(0, d["N"]),)
    dims[o["C"]] = (Src(1, w["O"]),)
    reduced = {(0, d["C"]), (1, w["I"]), (1, w["H"]), (1, w["W"])}
    strides = const_ints(call.attrs.strides)
    for i, c in enumerate("HW"):
        pointwise = weight[w[c]] == 1 and strides[i] == 1 and out[o[c]] == data[d[c]]
        if pointwise:
            dims[o[c]] = (Src(0, d[c]),)
        else:
            reduced.add((0, d[c]))
    return OpFlow((tuple(dims),), frozenset(reduced))


@builtin_rule("relax.nn.conv2d_transpose")
def conv2d_transpose(call, arg_shapes, out_shapes) -> OpFlow | None:
    lay = _conv_layouts(call, "IOHW")
    if lay is None:
        return None
    d, w, o = lay
    dims: list[tuple[Src, ...]] = [() for _ in out_shapes[0]]
    dims[o["N"]] = (Src(0, d["N"]),)
    reduced = {(0, d["C"]), (0, d["H"]), (0, d["W"]), (1, w["I"]), (1, w["H"]), (1, w["W"])}
    if int(call.attrs.groups) == 1:
        dims[o["C"]] = (Src(1, w["O"]),)
    else:  # out channel g*O_per_group + o is not 1:1 with weight dim O
        reduced.add((1, w["O"]))
    return OpFlow((tuple(dims),), frozenset(reduced))


# ---------------------------------------------------------------------------- dropout


@builtin_rule("relax.nn.dropout")
def dropout(call, arg_shapes, out_shapes) -> OpFlow:
    return OpFlow(tuple(tuple(same_dims(0, len(s))) for s in out_shapes))


# -------------------------------------------------------------------------- attention


def _attention(call, arg_shapes, out_shapes) -> OpFlow | None:
    q, k, v = arg_shapes[0], arg_shapes[1], arg_shapes[2]
    bias = arg_shapes[3] if len(arg_shapes) > 3 else None
    out = out_shapes[0]  # (B, Sq, H, Dv)
    reduced = {(0, 3), (1, 3), (1, 1), (2, 1)}  # D contracted, Sk reduced
    dims: list[list[Src]] = [[], [], [], [Src(2, 3)]]
    dims[0] = [Src(a, 0) for a, s in ((0, q), (1, k), (2, v)) if s[0] == out[0]]
    if k[2] != q[2] or v[2] != q[2]:
        # Grouped-query: TVM 0.27's legalization reshapes k/v (B, Hk, Sk, D) to (B*H, Sk, D),
        # so batches and heads mix (it also disagrees with numpy GQA): not chunkable at all.
        return None
    dims[2] = [Src(0, 2), Src(1, 2), Src(2, 2)]
    positional = call.attrs.causal_mask is not None or call.attrs.window_size is not None
    if positional:
        reduced.add((0, 1))
    else:
        dims[1] = [Src(0, 1)]
    if bias is not None:  # broadcastable to (B, H, Sq, Sk)
        nb = len(bias)
        reduced.add((3, norm_axis(-1, nb)))
        for bdim, oj in ((nb - 4, 0), (nb - 3, 2), (nb - 2, 1)):
            if bdim < 0:
                continue
            if dims[oj] and bias[bdim] == out[oj]:
                dims[oj].append(Src(3, bdim))
            elif bias[bdim] != 1:
                reduced.add((3, bdim))
    return OpFlow((tuple(tuple(d) for d in dims),), frozenset(reduced))


for _name in ("nn.attention", "nn.attention_bias"):
    builtin_rule(f"relax.{_name}", _attention)
