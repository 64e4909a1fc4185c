"""Chunking under a symbolic length (issue 23): a region whose extent is a symbolic dim becomes
one call of a run-time loop (``chunk_loop``), planned at the dim's bound.

Checked here: the loop alone at every length around its chunk size (odd, shorter than one
chunk, exact multiples), with one output and with several; a GPT with ``Dim("S")`` built
under a budget: numerics against torch at the minimum, an odd length, half the bound and the
bound; the estimate equals TVM's plan, which fits the budget; the IR does not grow with the
bound; the alias and liveness analyses read a loop's results as its buffers; attention in a
loop keeps its causal diagonal; calls outside the bounds are refused by the artifact and the
CLI; the CUDA pipeline compiles a loop; an ONNX dynamic axis, once bounded, builds chunked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvm_autochunk as ac
from benchmarks.models import FAMILIES
from relay_passes.alias import returned_params
from relay_passes.chunk_loop import build_loop
from relay_passes.dynamic_chunk import _with_bounds, is_symbolic, specialize, symbolic_bounds
from relay_passes.errors import SymbolicShapeError
from relay_passes.estimate_memory import _lower_and_walk, estimate_memory
from relay_passes.planned_memory import planned_memory
from relay_passes.rewrite import make_write_slice

ROOT = Path(__file__).resolve().parents[1]
D = 256  # the GPT family's width


def _loop_module(chunk: int, outputs: int):
    """main(x: (n, 4)) = (exp(x), x * 2, ...)[:outputs], computed by a loop over row chunks
    of ``chunk`` rows, written in place into zero buffers."""
    n = tvm.tirx.Var("n", "int64")
    ty = relax.TensorType((n, 4), "float32")
    bb = relax.BlockBuilder()
    wgv = bb.add_func(make_write_slice("float32", 2, 0), "write_slice")

    def chunk_fn(name, rows_param: bool):
        x = relax.Var("x", ty)
        bufs = [relax.Var(f"buf{k}", ty) for k in range(outputs)]
        off = relax.Var("off", tvm.ir.PrimType("int64"))
        params, c = [x, *bufs, off], chunk
        if rows_param:
            c = tvm.tirx.Var("t", "int64")
            params.append(relax.Var("rows", relax.ShapeType([c])))
        with bb.function(name, params, private=True):
            with bb.dataflow():
                s = bb.emit(relax.op.strided_slice(x, [0], [off], [off + c], assume_inbound=True))
                vals = [relax.op.exp(s), relax.op.multiply(s, relax.const(2.0, "float32"))]
                outs = [
                    bb.emit(relax.call_tir_inplace(wgv, relax.Tuple([b, bb.emit(v), off]), [0], ty))
                    for b, v in zip(bufs, vals)
                ]
                r = bb.emit_output(relax.Tuple(outs) if outputs > 1 else outs[0])
            g = bb.emit_func_output(r)
        bb.update_func(g, relax.utils.copy_with_new_vars(bb.get()[g]))
        return g

    full, tail = chunk_fn("chunk", False), chunk_fn("tail", True)
    loop = build_loop(bb, "loop", full, tail, [ty], [ty] * outputs, chunk)
    x = relax.Var("x", ty)
    with bb.function("main", [x]):
        with bb.dataflow():
            zs = [bb.emit(relax.op.zeros(relax.ShapeExpr([n, 4]), "float32"))
                  for _ in range(outputs)]
            r = bb.emit_output(relax.Call(loop, [x, *zs, tvm.tirx.IntImm("int64", 0), n]))
        bb.emit_func_output(r)
    return bb.get(), loop


@pytest.mark.parametrize("outputs", [1, 2])
def test_loop_covers_every_length(outputs):
    mod, loop = _loop_module(3, outputs)
    relax.analysis.well_formed(mod)
    assert returned_params(mod, loop) == [[1 + k] for k in range(outputs)]
    # each result of a chunk is its own buffer, also when several come back in one tuple
    for fn in ("chunk", "tail"):
        assert returned_params(mod, mod.get_global_var(fn)) == [[1 + k] for k in range(outputs)]
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
    for n in (1, 2, 3, 4, 6, 7, 100):
        x = np.random.default_rng(n).standard_normal((n, 4)).astype("float32")
        got = vm["main"](tvm.runtime.tensor(x))
        got = [got[k].numpy() for k in range(outputs)] if outputs > 1 else [got.numpy()]
        np.testing.assert_allclose(got[0], np.exp(x), rtol=1e-6)
        if outputs > 1:
            np.testing.assert_allclose(got[1], 2 * x, rtol=1e-6)


@pytest.mark.parametrize("outputs", [1, 2])
def test_a_loop_frame_allocates_nothing(outputs):
    """A loop writes in place into the buffers it is passed: its recursion's result and its
    chunks' results (one tensor or a tuple) are those buffers, not new allocations; the
    estimate of one call is the zero buffers plus a chunk's frame."""
    mod, _loop = _loop_module(4, outputs)
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {"n": 4096})
    mod["tail"] = mod["tail"].with_attr("tir_var_upper_bound", {"t": 4})
    mod = _with_bounds(mod, {"n": 4096})  # as apply_plan leaves them: storage sized statically
    tgt = ac.resolve_target("llvm")
    frames = _lower_and_walk(mod, "main", tgt, {})
    assert frames["loop"].blocks == () and not frames["loop"].protos
    buffers = outputs * 4096 * 4 * 4
    prof = estimate_memory(mod, tgt)
    assert buffers <= prof.runtime_peak_bytes < buffers + 16 * 1024
    assert prof.peak_bytes == planned_memory(mod, tgt).peak_bytes


def _dyn_gpt(bound: int, lo: int = 2):
    w = FAMILIES["gpt"](bound)
    S = torch.export.Dim("S", min=lo, max=bound)
    return w, ac.from_torch(w.module, w.inputs, dynamic_shapes=({1: S},))


def test_symbolic_bounds_and_specialize():
    w, mod = _dyn_gpt(128)
    (name,) = symbolic_bounds(mod)
    assert symbolic_bounds(mod) == {name: 128} and is_symbolic(mod)
    static = specialize(mod)
    assert not is_symbolic(static)
    assert static["main"].params[0].ty.shape.values[1] == 128
    assert not is_symbolic(ac.from_torch(w.module, w.inputs))
    unbounded = ac.from_torch(w.module, w.inputs, dynamic_shapes=({1: torch.export.Dim("L")},))
    with pytest.raises(SymbolicShapeError, match="--bound"):
        symbolic_bounds(unbounded)


@pytest.fixture(scope="module")
def gpt_built():
    bound = 256
    w, mod = _dyn_gpt(bound)
    full = estimate_memory(mod, "llvm").peak_bytes
    budget = int(full * 0.8)  # the floor at this size: 69%
    art = ac.build(mod, target="llvm", budget=budget)
    return w, mod, art, budget, full, bound


def test_build_under_budget_at_every_length(gpt_built):
    w, _mod, art, budget, full, bound = gpt_built
    rep = art.report
    assert rep.chunking and rep.chunking["regions"]
    assert "each region is a run-time loop" in str(rep)  # chunk counts are at the bound
    # TVM's plan (storage sized at the bound) fits the budget, and the estimate equals it
    assert rep.planned_peak_bytes <= budget < full
    assert rep.estimated_peak_bytes == rep.planned_peak_bytes
    for n in (2, 37, bound // 2, bound):
        x = np.random.default_rng(n).standard_normal((1, n, D)).astype("float32")
        ref = w.module(torch.from_numpy(x))
        ref = (ref[0] if isinstance(ref, tuple) else ref).detach().numpy()
        np.testing.assert_allclose(art(x), ref, rtol=1e-4, atol=1e-4)


def test_short_lengths_run_the_unchunked_entry(gpt_built):
    """Lengths up to the short bound fit the budget unchunked: they run ``main_short`` (TVM's
    plan at that bound within the budget), longer ones the chunked ``main``; both equal torch
    on either side of the bound, and the report lists the peak at lengths on both sides."""
    w, _mod, art, budget, _full, bound = gpt_built
    short = art.meta["short_entry"]
    name, top = short["dim"], short["bound"]
    assert short["function"] == "main_short" and 2 <= top < bound
    assert short["planned_peak_bytes"] <= budget
    assert art.entry_for({name: top}) == "main_short" and art.entry_for({name: top + 1}) == "main"
    for n in (top, top + 1):
        x = np.random.default_rng(n).standard_normal((1, n, D)).astype("float32")
        ref = w.module(torch.from_numpy(x))
        ref = (ref[0] if isinstance(ref, tuple) else ref).detach().numpy()
        np.testing.assert_allclose(art(x), ref, rtol=1e-4, atol=1e-4)
    rows = art.report.to_dict()["lengths"]
    assert {r["length"]: r["function"] for r in rows if r["length"] in (top, top + 1)} == {
        top: "main_short", top + 1: "main"}
    assert all(r["estimated_peak_bytes"] <= budget for r in rows)
    assert f"{name} <= {top} runs 'main_short'" in str(art.report)


def test_memory_does_not_pile_up_over_many_lengths(gpt_built, tmp_path):
    """The VM's pool reuses a freed block only for a request of its size: calls at ever new
    lengths would keep every length's blocks. The artifact empties the pool when the length
    changes, so the process stays near one call's peak (measured: +140 MiB over 32 lengths
    of a 1024-bound GPT before)."""
    _w, _mod, art, budget, _full, bound = gpt_built
    path = art.export(tmp_path / "dyn.so")
    code = f"""
import numpy as np, tvm_autochunk as ac
art = ac.load({str(path)!r})
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
art(np.zeros((1, {bound // 2}, {D}), "float32"))
start = rss()
for n in range({bound // 2 + 1}, {bound + 1}, 2):
    art(np.zeros((1, n, {D}), "float32"))
print(rss() - start)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    grew = int(out.stdout.split()[-1])
    assert grew < 2 * budget, (grew, budget)


def test_calls_outside_the_bounds_are_refused(gpt_built):
    _w, _mod, art, _budget, _full, bound = gpt_built
    with pytest.raises(ac.ArtifactError, match=f"exceeds the bound {bound}"):
        art(np.zeros((1, bound + 1, D), "float32"))
    with pytest.raises(ac.ArtifactError, match="below the minimum 2"):
        art(np.zeros((1, 1, D), "float32"))


def test_ir_does_not_grow_with_the_bound():
    """One loop per region whatever the bound: the chunked module has the same functions and
    the same number of bindings at bounds 256 and 1024 (one plan: the MLP of the last layer
    in chunks of 64 rows)."""
    from relay_passes.dynamic_chunk import apply_plan
    from relay_passes.fold_weight_layouts import fold_weight_layouts
    from relay_passes.plan import ChunkPlan, ChunkRegion

    sizes = []
    for bound in (256, 1024):
        _w, mod = _dyn_gpt(bound)
        mod = fold_weight_layouts(mod)  # as the driver does before searching
        plan = ChunkPlan((ChunkRegion("lv122", "lv133", "lv121", 1, 64),))
        out = apply_plan(mod, plan)
        funcs = sorted(
            g.name_hint for g, f in out.functions_items() if isinstance(f, relax.Function)
        )
        n = sum(len(b.bindings) for b in out["main"].body.blocks)
        sizes.append((funcs, n))
        est, tvm_plan = estimate_memory(out, "llvm"), planned_memory(out, "llvm")
        assert est.peak_bytes == tvm_plan.peak_bytes
    assert sizes[0] == sizes[1]
    assert any(name.endswith("_loop") for name in sizes[0][0])


def test_cli_bound_flag_budget_and_out_of_bounds_run(tmp_path, capsys):
    """A .pt2 exported without a max: a budget is refused naming ``--bound``; with it the
    build chunks, ``inspect`` shows the dim's range, and ``run`` past the bound fails with
    exit status 2 and the dim, the value and the bound."""
    from tvm_autochunk import cli

    w = FAMILIES["gpt"](64)
    ep = torch.export.export(w.module, tuple(w.inputs),
                             dynamic_shapes=({1: torch.export.Dim("S", min=2)},))
    pt2, so = tmp_path / "gpt.pt2", tmp_path / "gpt.so"
    torch.export.save(ep, str(pt2))
    assert cli.main(["build", str(pt2), "-o", str(so), "--budget", "1MiB", "-q"]) == 2
    assert "--bound s27=N" in capsys.readouterr().err
    assert cli.main(["build", str(pt2), "-o", str(so), "--budget", "1.5MiB", "--bound",
                     "s27=128", "-q"]) == 0  # 2.1 MiB unchunked
    capsys.readouterr()
    assert cli.main(["inspect", str(so)]) == 0
    shown = capsys.readouterr().out
    assert "2 <= s27 <= 128" in shown
    short = ac.read_metadata(so)["short_entry"]
    assert f"s27 <= {short['bound']} runs 'main_short' unchunked" in shown
    x = np.random.default_rng(0).standard_normal((1, 129, D)).astype("float32")
    np.savez(tmp_path / "in.npz", arg0=x)
    assert cli.main(["run", str(so), "--inputs", str(tmp_path / "in.npz")]) == 2
    assert "'s27'=129 exceeds the bound 128" in capsys.readouterr().err
    np.savez(tmp_path / "in.npz", arg0=x[:, :100])
    assert cli.main(["run", str(so), "--inputs", str(tmp_path / "in.npz")]) == 0
    assert cli.main(["build", str(pt2), "-o", str(so), "--bound", "s27=x"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_attention_in_a_loop_reads_its_causal_mask():
    """A query-row loop's chunk and tail functions get the key ``arange`` through the loop's
    recursion: the matcher follows it to ``main`` and reads a causal diagonal at the chunk's
    offset, so the fused kernel skips the keys past it and no mask is built per chunk."""
    from relay_passes.attention import Module, find_attention
    from relay_passes.dynamic_chunk import apply_plan
    from relay_passes.fold_weight_layouts import fold_weight_layouts
    from relay_passes.plan import ChunkPlan, ChunkRegion

    _w, mod = _dyn_gpt(256)
    plan = ChunkPlan((ChunkRegion("lv75", "lv133", "lv74", 1, 64),))
    out = apply_plan(fold_weight_layouts(mod), plan)
    module = Module(out)
    found = {name: find_attention(module, name) for name in module.funcs
             if name.endswith(("chunk64", "chunk_tail"))}
    assert len(found) == 2 and all(len(ms) == 1 for ms in found.values())
    for ms in found.values():
        assert ms[0].shape.causal and ms[0].bias is None and ms[0].shape.sk == "s27"


def test_cuda_build_of_a_loop_compiles_and_plans_as_estimated():
    """The CUDA pipeline takes a chunk loop (built for sm_80 here, not run: no GPU in CI)."""
    from relay_passes.plan import ChunkPlan, ChunkRegion

    _w, mod = _dyn_gpt(256)
    plan = ChunkPlan((ChunkRegion("lv122", "lv133", "lv121", 1, 64),))
    art = ac.build(mod, target="cuda", arch="sm_80", chunk_plan=plan)
    assert art.report.planned_peak_bytes == art.report.estimated_peak_bytes > 0
    assert art.meta["bounds"] == {"s27": 256}


def test_onnx_dynamic_axis_bound_then_chunked(tmp_path):
    """An ONNX model with a dynamic axis has no bound: a budget is refused naming the remedy;
    bound, it builds chunked and equals torch at lengths below the bound."""
    pytest.importorskip("onnx")
    w = FAMILIES["gpt"](128)
    path = tmp_path / "gpt.onnx"
    torch.onnx.export(w.module, tuple(w.inputs), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {1: "S"}, "y": {1: "S"}},
                      dynamo=False)
    mod = ac.load_model(str(path))
    with pytest.raises(SymbolicShapeError, match="bound_dims"):
        ac.build(mod, target="llvm", budget=2**20)
    mod = ac.bound_dims(mod, {"S": 128})
    full = ac.estimate(mod, target="llvm").peak_bytes
    art = ac.build(mod, target="llvm", budget=int(full * 0.85))
    assert art.report.chunking and art.report.planned_peak_bytes <= int(full * 0.85)
    for n in (3, 100):
        x = np.random.default_rng(n).standard_normal((1, n, D)).astype("float32")
        ref = w.module(torch.from_numpy(x))
        ref = (ref[0] if isinstance(ref, tuple) else ref).detach().numpy()
        np.testing.assert_allclose(art(x), ref, rtol=1e-4, atol=1e-4)
