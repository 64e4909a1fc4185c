"""relay_passes.attention: the flash-style CPU kernel against numpy, which attention the
matcher fuses and which it leaves alone, and fused builds (unchunked and chunked) against torch
and against TVM's build of the unfused module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvm_autochunk as ac
from benchmarks.models import FAMILIES
from relay_passes.attention import (
    AttentionShape,
    Module,
    cpu_kernel,
    find_attention,
    fuse_attention,
    leave_unfused,
)
from relay_passes.cpu_schedules.fast_math import fast_math_pass
from relay_passes.fold_weight_layouts import fold_weight_layouts
from relay_passes.plan import ChunkPlan, ChunkRegion

RNG = np.random.default_rng(0)


def _reference(a, k, v, bias, causal, diag):
    s = a.astype(np.float64) @ k.transpose(0, 2, 1).astype(np.float64)
    if bias is not None:
        s = s + bias
    if causal:
        sq, sk = s.shape[-2:]
        s = np.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + diag, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    return (s / s.sum(-1, keepdims=True)) @ v


# (batch, Sq, Sk, H, Hv, causal, bias (rows, bq, bk, div) or None, diag)
KERNEL_CASES = {
    "causal": (4, 130, 130, 64, 64, True, None, 0),
    "causal_query_chunk": (2, 7, 200, 32, 32, True, None, 150),  # a chunk at offset 150
    "one_row": (2, 1, 65, 16, 16, True, None, 64),
    "odd_keys_and_heads": (3, 50, 67, 24, 12, False, None, 0),
    "bias_full": (6, 33, 70, 16, 8, False, (6, 33, 70, 1), 0),
    "bias_per_outer_row": (6, 33, 70, 16, 8, False, (3, 33, 70, 2), 0),
    "bias_key_row": (6, 33, 70, 16, 8, False, (1, 1, 70, 1), 0),
    "bias_and_causal": (6, 33, 70, 16, 8, True, (6, 33, 1, 1), 5),
}


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_equals_softmax_attention(case):
    bn, sq, sk, h, hv, causal, bias, diag = KERNEL_CASES[case]
    shape = AttentionShape(bn, sq, sk, h, hv, "float32", causal, bias)
    mod = tvm.IRModule({"main": cpu_kernel(shape).with_attr("global_symbol", "main")})
    lib = tvm.compile(fast_math_pass()(mod), ac.resolve_target("llvm"))
    a = RNG.standard_normal((bn, sq, h), dtype=np.float32) / 4
    k = RNG.standard_normal((bn, sk, h), dtype=np.float32)
    v = RNG.standard_normal((bn, sk, hv), dtype=np.float32)
    rows, bq, bk, div = bias or (1, 1, 1, 1)
    b = RNG.standard_normal((rows, bq, bk), dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros((bn, sq, hv), np.float32))
    args = [tvm.runtime.tensor(x) for x in (a, np.ascontiguousarray(k.transpose(0, 2, 1)), v, b)]
    lib["main"](*args, diag, out)
    full_bias = b[(np.arange(bn) // div) % rows] if bias else None
    want = _reference(a, k, v, full_bias, causal, diag)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_one_symbolic_kernel_serves_every_length():
    """Lengths given by name (a symbolic ``s27``): one kernel, built once, at several query and
    key lengths, with a causal diagonal and a bias that varies along the keys."""
    shape = AttentionShape(2, "sq", "sk", 16, 8, "float32", True, (1, 1, "sk", 1))
    mod = tvm.IRModule({"main": cpu_kernel(shape).with_attr("global_symbol", "main")})
    lib = tvm.compile(fast_math_pass()(mod), ac.resolve_target("llvm"))
    for sq, sk, diag in ((1, 1, 0), (7, 200, 150), (50, 50, 0), (130, 67, 10)):
        a = RNG.standard_normal((2, sq, 16), dtype=np.float32) / 4
        k = RNG.standard_normal((2, sk, 16), dtype=np.float32)
        v = RNG.standard_normal((2, sk, 8), dtype=np.float32)
        b = RNG.standard_normal((1, 1, sk), dtype=np.float32)
        out = tvm.runtime.tensor(np.zeros((2, sq, 8), np.float32))
        kt = np.ascontiguousarray(k.transpose(0, 2, 1))
        lib["main"](*[tvm.runtime.tensor(x) for x in (a, kt, v, b)], diag, out)
        want = _reference(a, k, v, b, True, diag)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def _imported(fam, size, **kw):
    w = FAMILIES[fam](size, **kw)
    return w, fold_weight_layouts(ac.from_torch(w.module, w.inputs))


def test_matcher_reads_gpts_causal_mask_and_vits_missing_one():
    _, gpt = _imported("gpt", 64, layers=2)
    found = find_attention(Module(gpt), "main")
    assert len(found) == 2  # one per layer
    assert all(int(m.diag) == 0 and m.bias is None for m in found)
    assert {(m.shape.batch, m.shape.sq, m.shape.sk, m.shape.h, m.shape.hv) for m in found} == {
        (4, 64, 64, 64, 64)
    }
    _, vit = _imported("vit", 16, layers=1)
    (m,) = find_attention(Module(vit), "main")
    assert m.diag is None and m.bias is None and (m.shape.sq, m.shape.sk) == (17, 17)


def _attention_module(mask: str):
    """softmax(q @ kt [+ mask]) @ v, with the scores also returned when ``mask == 'reuse'``."""
    q = relax.Var("q", relax.TensorType((2, 8, 4), "float32"))
    kt = relax.Var("kt", relax.TensorType((2, 4, 8), "float32"))
    v = relax.Var("v", relax.TensorType((2, 8, 4), "float32"))
    m = relax.Var("m", relax.TensorType((8, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, kt, v, m]):
        with bb.dataflow():
            s = bb.emit(relax.op.matmul(q, kt))
            x = bb.emit(relax.op.add(s, m)) if mask == "bias" else s
            p = bb.emit(relax.op.nn.softmax(x, axis=-1))
            o = bb.emit(relax.op.matmul(p, v))
            out = bb.emit_output(relax.Tuple([o, s]) if mask == "reuse" else o)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("mask", ["bias", "reuse"])
def test_a_bias_is_read_and_reused_scores_are_left_alone(mask):
    mod = _attention_module(mask)
    found = find_attention(Module(mod), "main")
    if mask == "reuse":  # the scores are an output: fusing would compute them twice
        assert found == [] and fuse_attention(mod) is mod
        return
    (m,) = found
    assert m.diag is None and m.shape.bias == (1, 8, 8, 1) and m.bias is not None
    fused = fuse_attention(mod)
    ops = {str(c.op.name) for c in _calls(fused["main"]) if isinstance(c.op, tvm.ir.Op)}
    assert "relax.nn.softmax" not in ops and "relax.call_tir" in ops
    args = [RNG.standard_normal(s, dtype=np.float32) for s in [(2, 8, 4), (2, 4, 8), (2, 8, 4)]]
    args.append(RNG.standard_normal((8, 8), dtype=np.float32))
    got = ac.build(mod, "llvm")(*args)
    want = _reference(args[0], args[1].transpose(0, 2, 1), args[2], args[3], False, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _calls(func):
    out = []
    relax.analysis.post_order_visit(
        func, lambda e: out.append(e) if isinstance(e, relax.Call) else None
    )
    return out


def _attention_calls(func):
    return [
        c for c in _calls(func)
        if isinstance(c.op, tvm.ir.Op) and c.op.name == "relax.call_tir"
        and c.args[0].name_hint.startswith("attention_cpu")
    ]


def _torch_out(w):
    with torch.no_grad():
        return w.module(*w.inputs).numpy()


@pytest.mark.parametrize("fam,size", [("gpt", 96), ("vit", 16), ("evoformer", 16), ("unet", 8)])
def test_fused_builds_equal_torch_and_lose_the_scores(fam, size):
    kw = {"layers": 1} if fam in ("gpt", "vit") else {}
    w = FAMILIES[fam](size, **kw)
    mod = ac.from_torch(w.module, w.inputs)
    art = ac.build(mod, "llvm")
    got = art(*[x.numpy() for x in w.inputs])
    np.testing.assert_allclose(got, _torch_out(w), rtol=2e-4, atol=2e-4)
    fused = fuse_attention(fold_weight_layouts(mod))
    ops = {str(c.op.name) for c in _calls(fused["main"]) if isinstance(c.op, tvm.ir.Op)}
    assert "relax.nn.softmax" not in ops, f"{fam}: an attention was not fused"


def test_a_module_left_unfused_keeps_its_scores_through_build():
    # the mark survives build's weight detaching (keep_params_as_input drops module attrs)
    w = FAMILIES["gpt"](96, layers=1)
    mod = ac.from_torch(w.module, w.inputs, keep_params_as_input=True)
    plain = leave_unfused(mod)
    assert fuse_attention(plain) is plain
    fused, unfused = ac.build(mod, "llvm"), ac.build(plain, "llvm")
    assert unfused.report.peak_bytes > fused.report.peak_bytes
    x = w.inputs[0].numpy()
    np.testing.assert_allclose(unfused(x), fused(x), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_query_chunks_pass_their_offset_as_the_causal_diagonal(chunk):
    """GPT S=96 chunked along its rows: each chunk function's kernel sees keys up to its own
    rows (diag = the chunk's offset); outputs equal torch's."""
    w, mod = _imported("gpt", 96, layers=1)
    plan = ChunkPlan((ChunkRegion("lv8", "lv67", "lv7", 1, chunk),))
    art = ac.build(mod, "llvm", chunk_plan=plan)
    assert art.report.chunking["regions"][0]["chunk"] == chunk
    np.testing.assert_allclose(art(w.inputs[0].numpy()), _torch_out(w), rtol=2e-4, atol=2e-4)
    from relay_passes.rewrite import apply_chunk_plan

    chunked = fuse_attention(apply_chunk_plan(mod, plan))
    for gv, f in chunked.functions.items():
        if isinstance(f, relax.Function) and "chunk" in gv.name_hint:
            (k,) = _attention_calls(f)
            diag = k.args[1].fields[4]
            assert str(diag) == "off", f"{gv.name_hint}: diag {diag}"


def test_a_chunk_reads_the_causal_mask_its_caller_passes_in():
    """transformers GPT2: the mask's 0 and -inf are variables of main, so a query chunk gets
    them as parameters. Its kernel still sees a causal diagonal at the chunk's offset, not a
    chunk x S bias (which kept the mask chain's chunk x S tensors: GPT2 S=1024 chunked in two
    planned 17.3 MiB, over its unchunked 10.5)."""
    pytest.importorskip("transformers")
    from benchmarks.models import workload
    from relay_passes.rewrite import apply_chunk_plan

    w = workload("hf_gpt2", 96)
    mod = fold_weight_layouts(ac.from_torch(w.module, w.inputs))
    # the first layer's attention and MLP by query rows, as the search picks at S=1024
    plan = ChunkPlan((ChunkRegion("lv57", "lv112", "lv56", 1, 40),))
    chunked = fuse_attention(apply_chunk_plan(mod, plan))
    funcs = [f for gv, f in chunked.functions.items()
             if isinstance(f, relax.Function) and gv.name_hint.startswith("main_lv57")]
    assert len(funcs) == 2  # 40 rows, and the last 16
    for f in funcs:
        (k,) = _attention_calls(f)
        assert str(k.args[1].fields[4]) == "off" and len(k.args[1].fields) == 5
    art = ac.build(mod, "llvm", chunk_plan=plan)
    got = art(*[x.numpy() for x in w.inputs])
    np.testing.assert_allclose(got, _torch_out(w), rtol=2e-4, atol=2e-4)
