"""One tiny configuration of each benchmark script, so they cannot rot (numbers not checked
beyond sanity: the benchmarks themselves print and record them)."""

from __future__ import annotations

import json

import pytest

from benchmarks import budget_sweep, chunk_regions, estimator_accuracy


def test_estimator_accuracy_smoke(tmp_path, capsys):
    out = tmp_path / "acc.jsonl"
    rc = estimator_accuracy.main(
        ["--families", "gpt", "--sizes", "64", "--no-measure", "--out", str(out)]
    )
    assert rc == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["estimate_bytes"] == row["plan_bytes"] > 0
    assert "| gpt | 64 |" in capsys.readouterr().out


def test_chunk_regions_smoke():
    row = chunk_regions.region_row("gpt", 64, 16, measure=False, layers=1)
    assert row["n_chunks"] == 4 and row["est_after"] == row["plan_after"] > 0
    ct = chunk_regions.compile_time("gpt", 64, (2, 4), layers=1)
    assert [r["n_chunks"] for r in ct] == [2, 4]


def test_budget_sweep_smoke():
    rows = budget_sweep.sweep("gpt", 128, repeats=1, measure=False, kw={"layers": 1})
    assert rows and {r["budget"] for r in rows} >= {"50%", "min"}
    for r in rows:
        if r["ok"]:
            assert r["plan_within_budget"] and r["max_rel_err"] <= 1e-5
        else:
            assert "Remedy" in r["error"]
    assert all(0 < r["lower_bound_bytes"] < r["unchunked_peak_bytes"] for r in rows)


def test_max_length_smoke(tmp_path):
    from benchmarks import max_length

    out = tmp_path / "ml.jsonl"
    assert max_length.main(["--quick", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    summary = [r for r in rows if r["kind"] == "summary"]
    assert len(summary) == 1 and summary[0]["max_autochunk"] >= summary[0]["max_unchunked"]
    probes = [r for r in rows if r["kind"] == "probe"]
    assert probes and all("env" in r and r["env"]["tvm"] for r in rows)
    # every probe that "fits" the unchunked build must have an estimate within the budget
    for r in probes:
        if r["who"] == "unchunked":
            assert r["fits"] == (r["estimate_bytes"] <= r["budget_bytes"])


def test_search_time_smoke(tmp_path):
    from benchmarks import search_time

    out = tmp_path / "st.jsonl"
    assert search_time.main(["--quick", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["ok"] and rows[0]["plan_within_budget"]
    r = rows[0]
    assert r["search_s"] > 0 and r["tvm_build_s"] > 0 and r["evaluations"] >= 1
    assert r["search_over_build"] == round(r["search_s"] / r["tvm_build_s"], 3)


def test_calibrate_cost_smoke(tmp_path):
    from benchmarks import calibrate_cost

    out = tmp_path / "cal.jsonl"
    assert calibrate_cost.main(["--quick", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    summary = rows[-1]
    assert summary["kind"] == "summary" and summary["call_overhead"] >= 0
    assert summary["small_penalty"] >= 1.0 and summary["op_overhead"] >= 0
    timed = [r for r in rows if r.get("median_us")]
    # one row per (region, chunk size); the unchunked variant is n_chunks == 1; 1-row chunks
    assert {r["region"] for r in timed} == {"chain3", "chain17", "matmul128", "matmul256",
                                            "cache"}
    assert len(summary["cache"]) == 3 and summary["cache"]["0.0625"] == 1.0  # unchunked
    assert {r["n_chunks"] for r in timed} >= {1, 16, 64}
    # the regions as the search sees them: ops per chunk, bytes every chunk reads whole
    mm = {r["region"]: r["reread_bytes"] for r in timed if r["region"] != "cache"}
    assert mm["chain3"] == 0 and mm["matmul128"] == 128 * 128 * 4


def test_refit_benchmark_smoke(tmp_path):
    from benchmarks import refit

    out = tmp_path / "refit.jsonl"
    assert refit.main(["--quick", "--out", str(out)]) == 0
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    g, f = row["plans"]["greedy"], row["plans"]["refit"]
    # Evoformer N=256 at 20%: the re-fit gives the second stage fewer calls, within the budget
    assert f["refit_from"][1] == g["regions"][1][1] > f["regions"][1][1]
    assert max(g["planned_bytes"], f["planned_bytes"]) <= row["budget_bytes"]
    assert f["predicted_overhead_us"] < g["predicted_overhead_us"]
    assert g["vs_unchunked"] > 0 and f["vs_unchunked"] > 0


def test_gpu_scripts_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu end to end on the CPU: prepare.py bundles llvm artifacts, calibration
    variants and a runtime-only TVM (self-tested), packs them; run_gpu.py --device cpu unpacks
    the pack, times the calibration variants (outputs equal to unchunked) and runs each model
    artifact in a fresh runtime-only process; calibrate_cost.py fits the timings. On an H200
    the same scripts made benchmarks/results/gpu.jsonl (benchmarks/gpu/README.md)."""
    import os
    import subprocess
    import sys

    from benchmarks import calibrate_cost
    from benchmarks.gpu import prepare

    bundle, pack = tmp_path / "bundle", tmp_path / "b.tar.gz"
    assert prepare.main(["--quick", "--target", "llvm", "--calibration", "--out", str(bundle),
                         "--pack", str(pack)]) == 0
    man = json.loads((bundle / "manifest.json").read_text())
    assert [e["label"] for e in man["entries"]] == ["unchunked", "70%"]
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"} | {"TMPDIR": str(tmp_path)}
    out, cal = tmp_path / "gpu.jsonl", tmp_path / "cal.jsonl"
    p = subprocess.run(
        [sys.executable, "benchmarks/gpu/run_gpu.py", "--bundle", str(pack), "--device", "cpu",
         "--rounds", "2", "--repeats", "1", "--out", str(out), "--calibration-out", str(cal)],
        capture_output=True, text=True, env=env, cwd=prepare.ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "unpacked" in p.stdout and "OUTPUTS DIFFER" not in p.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["unchunked", "70%"] and all(r["ok"] for r in rows)
    assert max(r["max_rel_err"] for r in rows) <= 1e-5
    timed = [json.loads(x) for x in cal.read_text().splitlines()]
    assert {r["region"] for r in timed} == {"chain3", "chain17", "matmul128", "matmul256",
                                            "matmul1024", "cache"}
    assert max(r["max_rel_err"] for r in timed) <= 1e-5
    fit = tmp_path / "fit.jsonl"
    assert calibrate_cost.main(["--fit-timings", str(cal), "--out", str(fit)]) == 0
    summary = json.loads(fit.read_text().splitlines()[-1])
    assert summary["target"] == "llvm" and summary["call_overhead"] >= 0


def test_cpu_speed_smoke(tmp_path):
    """benchmarks/cpu_speed.py --quick: torch, TVM's default build and ours side by side."""
    import json

    from benchmarks import cpu_speed

    out = tmp_path / "cpu_speed.jsonl"
    assert cpu_speed.main(["--quick", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["threads"] >= 1 and row["torch_ms"] > 0 and row["tvm_default_ms"] > 0
    assert row["ours_ms"] > 0 and row["ours_vs_torch"] > 0
    assert max(row["max_rel_err_vs_torch"].values()) < 1e-4


def test_floors_smoke(capsys):
    from benchmarks import floors

    assert floors.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| gpt:256:1 |" in out
    row = floors.run("gpt:256:1", [0.7, 0.01])
    ok, refused = row["points"]
    assert ok["ok"] and ok["peak_bytes"] <= 0.7 * row["unchunked_bytes"]
    assert not refused["ok"] and refused["peak_bytes"] > 0.01 * row["unchunked_bytes"]
    assert 0 < row["lower_bound_bytes"] <= refused["peak_bytes"]


def test_attention_kernel_smoke(tmp_path):
    """benchmarks/attention_kernel.py --quick: SDPA, torch eager, ours fused and unfused."""
    from benchmarks import attention_kernel

    out = tmp_path / "attn.jsonl"
    assert attention_kernel.main(["--quick", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["ours_fused_ms"] > 0 and row["torch_sdpa_ms"] > 0
    assert row["fused_peak_bytes"] < row["unfused_peak_bytes"]
    assert row["max_abs_err_vs_sdpa"]["ours_fused"] < 1e-4


def test_library_models_smoke(tmp_path):
    """benchmarks/library_models.py --quick: a transformers BERT, torch vs ours, masks read
    and kept, and the search's floor."""
    pytest.importorskip("transformers")
    from benchmarks import library_models

    out = tmp_path / "lib.jsonl"
    assert library_models.main(["--quick", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["torch_ms"] > 0 and row["ours_ms"] > 0 and row["ours_masks_kept_ms"] > 0
    # the all-True mask read as no mask: no S x S bias and safe-softmax tensors left
    assert row["peak_bytes"]["ours"] < row["peak_bytes"]["ours_masks_kept"]
    assert max(row["max_abs_err_vs_torch"].values()) < 1e-4
    (point,) = row["floors"]
    assert point["share"] == 0.9 and point["peak_bytes"] > 0
    assert 0 < row["lower_bound_bytes"] <= point["peak_bytes"]


def test_dynamic_lengths_smoke(tmp_path):
    """benchmarks/dynamic_lengths.py --quick: a GPT with Dim("S", max=128) built once under a
    budget, measured in a fresh process and timed against static builds at two lengths."""
    from benchmarks import dynamic_lengths

    out = tmp_path / "dyn.jsonl"
    assert dynamic_lengths.main(["--quick", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["planned_peak_bytes"] <= row["budget_bytes"] < row["unchunked_peak_bytes"]
    assert row["regions"] >= 1
    assert [r["length"] for r in row["rows"]] == [2, 37]
    # a fresh process also touches memory no plan holds (measure.allowance): at this size (a
    # 1.3 MiB budget) the worker threads' stacks and arenas are a third of the budget
    from tvm_autochunk.measure import allowance

    limit = row["budget_bytes"] + allowance(row["budget_bytes"])
    for r in row["rows"]:
        assert r["max_abs_err_vs_torch"] < 1e-4
        assert 0 < r["measured_peak_bytes"] <= limit
        assert r["dynamic_ms"] > 0 and r["static_ms"] > 0
        assert r["function"] in ("main", "main_short")
    # the memory curve: every length up to the bound within the budget, in a fresh process
    assert [c["length"] for c in row["curve"]] == [2, 64, 128]
    assert all(0 < c["measured_peak_bytes"] <= limit for c in row["curve"])
    # the lengths up to the short bound are measured running the unchunked copy, the function
    # the artifact dispatches them to (measure_peak(entry=...); it once measured main there)
    short = [c for c in row["curve"] if c["function"] == "main_short"]
    assert short and all(c["length"] <= row["short_entry"]["bound"] for c in short)
