"""Constant attention masks read at import (tvm_autochunk.torch_masks), and bool cumsum.

transformers passes SDPA a mask built inside forward from arange and comparisons: all True
(BERT, ViT) or plain causal (GPT2, Llama). Such a mask must import as no mask or as
``is_causal`` (no safe-softmax check, no S x S bias, the attention fused); any other mask must
stay, with torch's numerics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from _helpers import op_names

import tvm_autochunk as ac
from relay_passes.attention import fuse_attention
from tvm_autochunk.torch_masks import read_constant_masks

S, D = 24, 8
CHECK_OPS = {"relax.max", "relax.logical_not"}  # the safe-softmax check's any(..)


def _mask(kind: str, s: int) -> torch.Tensor:
    """A mask computed in forward from constants only, as transformers' masking utils do."""
    q = torch.arange(s).view(1, 1, s, 1)
    k = torch.arange(s).view(1, 1, 1, s)
    if kind == "all_true":
        return (q >= 0).expand(1, 1, s, s)
    if kind == "causal":
        return k <= q
    if kind == "causal_float":
        return torch.zeros(1, 1, s, s).masked_fill(k > q, float("-inf"))
    if kind == "window":  # a real mask: keys older than 4 positions are masked
        return (k <= q) & (k > q - 4)
    if kind == "empty_row":  # row 3 keeps no key: torch's check zeroes it
        return (k <= q) & (q != 3)
    raise ValueError(kind)


class _Attn(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = torch.nn.Linear(D, 3 * D)

    def forward(self, x):
        q, k, v = self.proj(x).view(1, x.shape[1], 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(self.kind, x.shape[1]))


def _model(kind: str):
    torch.manual_seed(0)
    return _Attn(kind).eval(), torch.randn(1, S, D)


@pytest.mark.parametrize(
    "kind,read", [("all_true", "none"), ("causal", "causal"), ("causal_float", "causal"),
                  ("window", None), ("empty_row", None)]
)
def test_a_constant_mask_reads_as_what_it_is(kind, read):
    model, x = _model(kind)
    ep = torch.export.export(model, (x,))
    reads = read_constant_masks(ep, torch)
    assert list(reads.values()) == ([read] if read else [])


@pytest.mark.parametrize("kind", ["all_true", "causal", "causal_float", "window", "empty_row"])
def test_constant_masks_import_as_torch_computes(kind):
    model, x = _model(kind)
    mod = ac.from_torch(model, (x,))
    kept = kind in ("window", "empty_row")
    # the check stays only where the mask stays; a dropped mask leaves no bias behind
    assert (CHECK_OPS <= op_names(mod)) == kept, op_names(mod)
    fused_ops = op_names(fuse_attention(mod))
    assert ("relax.nn.softmax" in fused_ops) == kept, fused_ops
    got = ac.build(mod, "llvm")(x.numpy())
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if kind == "empty_row":
        assert np.all(got[0, :, 3] == 0) and not np.isnan(got).any()


def test_a_mask_that_depends_on_an_input_is_left_alone():
    class Padded(torch.nn.Module):
        def forward(self, q, keep):
            return F.scaled_dot_product_attention(q, q, q, attn_mask=keep[:, None, None, :])

    q, keep = torch.randn(1, 2, S, 4), torch.ones(1, S, dtype=torch.bool)
    ep = torch.export.export(Padded(), (q, keep))
    assert read_constant_masks(ep, torch) == {}
    assert CHECK_OPS <= op_names(ac.from_exported_program(ep))


def test_the_callers_program_is_left_as_it_was():
    model, x = _model("causal")
    ep = torch.export.export(model, (x,))
    before = str(ep.graph)
    first = ac.from_exported_program(ep)
    assert str(ep.graph) == before
    tvm.ir.assert_structural_equal(first, ac.from_exported_program(ep))


def test_bool_cumsum_counts_as_torch_does():
    # torch sums bools as int64; TVM's importer kept bool, which LLVM could not build
    class Count(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x > 0, dim=-1) + torch.cumsum(x, dim=-1).to(torch.int64)

    x = torch.randn(3, 17)
    got = ac.build(Count(), "llvm", example_args=(x,))(x.numpy())
    np.testing.assert_array_equal(got, Count()(x).numpy())


def test_a_mask_over_the_size_read_at_import_stays_and_says_so(monkeypatch, caplog):
    """A mask whose computation is bigger than ``MAX_MASK_ELEMENTS`` is not computed: it
    stays a mask (correct, but its attention is not fused) and a warning says so."""
    from tvm_autochunk import torch_masks

    model, x = _model("causal")
    ep = torch.export.export(model, (x,))
    assert list(read_constant_masks(ep, torch).values()) == ["causal"]
    monkeypatch.setattr(torch_masks, "MAX_MASK_ELEMENTS", S * S - 1)
    with caplog.at_level("WARNING", logger="tvm_autochunk.torch_masks"):
        assert read_constant_masks(ep, torch) == {}
    assert "its attention is not fused" in caplog.text


def test_big_intermediates_of_a_mask_chain_are_freed(monkeypatch):
    """The chain's tensors over ``_big`` are dropped once read (the mask itself is kept): at
    S=16384 a float S x S is 1 GiB, and a chain held whole did not fit the import."""
    from tvm_autochunk import torch_masks

    model, x = _model("causal_float")
    ep = torch.export.export(model, (x,))
    memo: dict = {}
    monkeypatch.setattr(torch_masks, "_big", lambda v, t: isinstance(v, t.Tensor))
    op = torch.ops.aten.scaled_dot_product_attention.default
    sdpa = next(n for n in ep.graph.nodes if n.target is op)
    mask = torch_masks._sdpa_mask(sdpa)
    value = torch_masks._evaluate(mask, torch, torch_masks._constant_inputs(ep), memo)
    assert isinstance(value, torch.Tensor) and memo[mask] is value
    chain = [n for n, v in memo.items() if n is not mask and n.op == "call_function"]
    assert chain and all(memo[n] is None for n in chain)
