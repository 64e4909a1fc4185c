"""One tiny configuration of each benchmark script, so they cannot rot (numbers not checked
beyond sanity: the benchmarks themselves print and record them)."""

from __future__ import annotations

import json

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
    # Evoformer N=128 at 20%: the re-fit gives the first stage fewer calls, within the budget
    assert f["refit_from"][0] == g["regions"][0][1] > f["regions"][0][1]
    assert max(g["planned_bytes"], f["planned_bytes"]) <= row["budget_bytes"]
    assert f["predicted_overhead_us"] < g["predicted_overhead_us"]
    assert g["vs_unchunked"] > 0 and f["vs_unchunked"] > 0
