"""Reports: ``tvm_autochunk.report`` (the readable text and the JSON of an estimate's and a
build's report; these two tests build a model) and ``benchmarks/report.py`` (smoke tests on
copies of the results; no model is built or run for those)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from _helpers import family_module as _mod  # (family, size) -> Relax module, built once

import tvm_autochunk as ac
from benchmarks import report
from benchmarks.models import SMALL_SIZES
from relay_passes.auto_chunk import need_bytes
from relay_passes.estimate_memory import estimate_memory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIB = 2**20

ENV = {"tvm": "0.27.0.post1", "machine": "x86_64", "cpus": 2}
COMMON = {"family": "gpt", "base_size": 128, "budget_bytes": 8 * MIB, "kw": {"layers": 1},
          "env": ENV}
# a finished max_length run in the format of benchmarks/max_length.py
MAX_LENGTH = [
    {**COMMON, "kind": "probe", "who": "unchunked", "size": 256, "fits": False,
     "estimate_bytes": 20 * MIB},
    {**COMMON, "kind": "probe", "who": "unchunked", "size": 192, "fits": False,
     "estimate_bytes": 13 * MIB},
    {**COMMON, "kind": "probe", "who": "autochunk", "size": 256, "fits": True,
     "estimate_bytes": 7 * MIB, "regions": 1, "search_s": 0.5},
    {**COMMON, "kind": "probe", "who": "autochunk", "size": 512, "fits": False,
     "best_bytes": 11 * MIB, "search_s": 0.9},
    {**COMMON, "kind": "probe", "who": "autochunk", "size": 384, "fits": True,
     "estimate_bytes": 15 * MIB // 2, "regions": 1, "search_s": 0.6},
    {**COMMON, "kind": "verify", "who": "unchunked", "size": 128, "build_s": 1.0,
     "plan_bytes": 7 * MIB, "peak_bytes": 8 * MIB, "measured_bytes": 8 * MIB, "run_s": 0.1,
     "measured_within": True},
    {**COMMON, "kind": "verify", "who": "autochunk", "size": 384, "build_s": 2.0,
     "plan_bytes": 7 * MIB, "peak_bytes": 7 * MIB, "measured_bytes": 15 * MIB // 2,
     "run_s": 0.3, "measured_within": True, "max_rel_err": 0.0, "plan_within_budget": True},
    {**COMMON, "kind": "torch", "who": "torch_eager", "size": 128, "ok": True,
     "peak_bytes": 12 * MIB, "seconds": 0.01},
    {**COMMON, "kind": "torch", "who": "torch_eager", "size": 384, "ok": True,
     "peak_bytes": 99 * MIB, "seconds": 0.05},
    {**COMMON, "kind": "summary", "max_unchunked": 128, "max_autochunk": 384, "ratio": 3.0,
     "capped": False, "search_s": 3.0, "unchunked_verified": True, "autochunk_verified": True,
     "torch_peak_at_128": 12 * MIB, "torch_peak_at_384": 99 * MIB},
]

README = """# project

Intro text that must survive.

## Results

Hand-written results text.

### Older table

| a | b |
|---|---|
| 1 | 2 |
"""


def _outside(text: str) -> str:
    """The text with every generated block emptied (markers kept)."""
    return re.sub(r"(<!-- report:(\w+) -->).*?(<!-- /report:\2 -->)", r"\1\3", text, flags=re.S)


@pytest.fixture
def tree(tmp_path):
    res = tmp_path / "benchmarks" / "results"
    res.mkdir(parents=True)
    for f in RESULTS.glob("*.jsonl"):
        if f.name != "max_length.jsonl":  # may be mid-run; use a finished synthetic one
            shutil.copy(f, res / f.name)
    (res / "max_length.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MAX_LENGTH))
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    bench = tmp_path / "benchmarks" / "README.md"
    shutil.copy(ROOT / "benchmarks" / "README.md", bench)
    return res, readme, bench


def _run(res, readme, bench, *extra):
    argv = ["--results", str(res), "--readme", str(readme), "--bench-readme", str(bench)]
    assert report.main([*argv, *extra]) == 0


def test_report_end_to_end(tree, capsys):
    res, readme, bench = tree
    readme0, bench0 = readme.read_text(), bench.read_text()
    _run(res, readme, bench)
    out = capsys.readouterr().out

    pngs = ["estimator_accuracy.png", "cut_vs_slowdown.png", "memory_vs_length_gpt.png"]
    for name in pngs:
        assert (res / name).stat().st_size > 1000, name
    b = bench.read_text()
    for name in report.BENCH_SECTIONS:
        start, end = report.markers(name)
        assert b.count(start) == 1 and b.count(end) == 1, name
    # hand-written text outside the markers is untouched (the markers were empty before)
    assert _outside(b) == _outside(bench0)
    assert "## Measuring conventions" in b

    # rows computed from the data
    est = [json.loads(x) for x in (res / "estimator_accuracy.jsonl").read_text().splitlines()]
    r0 = next(r for r in est if r["family"] == "gpt")
    assert f"| gpt | {r0['size']} | {r0['estimate_bytes'] / MIB:.1f} |" in b
    sweep = [json.loads(x) for x in (res / "budget_sweep.jsonl").read_text().splitlines()]
    ok = next(r for r in sweep if r["ok"])
    assert f"{ok['plan_bytes'] / MIB:.1f}" in b and f"{ok['cut_pct']:.1f}%" in b
    if any(not r["ok"] for r in sweep):
        assert "| refused |" in b
    assert "| gpt | 128 | 8.0 | 128 | 384 | 3.0x | yes | 12.0 | 99.0 |" in b
    assert "| graphs |" in b  # fuzz summary
    assert re.search(r"\| (met|missed) \|", b)  # targets
    assert "](../benchmarks/results/cut_vs_slowdown.png)" not in b
    assert "](results/cut_vs_slowdown.png)" in b

    r = readme.read_text()
    start, end = report.markers("headline")
    assert r.count(start) == 1 and r.count(end) == 1
    assert _outside(r) == _outside(readme0) or start not in readme0
    block = r[r.index(start):r.index(end)]
    assert "3.0x" in block and "[benchmarks/README.md](benchmarks/README.md)" in block
    assert 3 <= block.count("\n- ") <= 6
    assert "Memory cut" in out

    # idempotent: a second run changes no byte
    snap = {p: p.read_bytes() for p in [readme, bench, *(res / n for n in pngs)]}
    _run(res, readme, bench)
    assert {p: p.read_bytes() for p in snap} == snap
    assert "unchanged:" in capsys.readouterr().out


def test_headline_markers_added_under_results(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    shutil.copy(RESULTS / "estimator_accuracy.jsonl", res)
    readme, bench = tmp_path / "README.md", tmp_path / "benchmarks" / "README.md"
    readme.write_text(README)
    _run(res, readme, bench, "--no-plots")
    r = readme.read_text()
    start, end = report.markers("headline")
    assert r.index("## Results") < r.index(start) < r.index(end) < r.index("Hand-written")
    assert _outside(r).replace(f"{start}{end}\n\n", "") == README
    assert "Memory estimator" in r
    # hand edits outside the block survive the next run
    r = r.replace("Intro text", "Edited intro text")
    readme.write_text(r)
    _run(res, readme, bench, "--no-plots")
    assert "Edited intro text" in readme.read_text()
    assert not list(res.glob("*.png"))


def test_missing_results_are_skipped_with_a_note(tree, capsys):
    res, readme, bench = tree
    for name in ("max_length.jsonl", "fuzz.jsonl"):
        (res / name).unlink()
    for f in res.glob("budget_sweep*.jsonl"):  # every sweep file: the section has no data
        f.unlink()
    with (res / "chunk_regions.jsonl").open("a") as f:
        f.write('{"family": "gpt", "trunc')  # a line cut off mid-write
    _run(res, readme, bench, "--no-plots")
    out = capsys.readouterr().out
    assert "note: max_length.jsonl: not found" in out
    assert "note: fuzz.jsonl: not found" in out
    assert "note: chunk_regions.jsonl: skipped 1 unreadable line(s)" in out
    b = bench.read_text()
    assert "`max_length.jsonl` is missing" in b and "`fuzz.jsonl` is missing" in b
    assert "`budget_sweep.jsonl` is missing" in b
    assert "| gpt | 2048 |" in b  # the readable chunk_regions rows are still there


def test_empty_results_dir(tmp_path, capsys):
    readme, bench = tmp_path / "README.md", tmp_path / "b" / "README.md"
    readme.write_text(README)
    _run(tmp_path / "nothing", readme, bench)
    assert "No benchmark results yet" in readme.read_text()
    assert "is missing" in bench.read_text()


def test_odd_rows_do_not_crash(tmp_path, capsys):
    res = tmp_path / "results"
    res.mkdir()
    (res / "fuzz.jsonl").write_text('{"status": "ok"}\n{"status": "ok"}\n{"status": "bad"}\n')
    (res / "budget_sweep.jsonl").write_text(
        '{"family": "gpt", "size": 64, "budget": "50%", "ok": true}\n'
        '{"family": "gpt", "size": 64, "budget": "min", "ok": true, "budget_bytes": 10,'
        ' "unchunked_peak_bytes": 200, "cut_pct": 95.0, "slowdown": 1.01, "regions": [[4, 16]]}\n'
    )
    (res / "max_length.jsonl").write_text('{"family": "gpt", "base_size": 64, "kind": "probe"}\n')
    readme, bench = tmp_path / "README.md", tmp_path / "benchmarks" / "README.md"
    readme.write_text(README)
    _run(res, readme, bench)
    b = bench.read_text()
    assert "`status`: bad 1, ok 2" in b
    assert "| gpt | 64 | min (0.0 MiB) |" in b and "4x16" in b
    assert "| gpt | 95.0% | 64, min | 1.010 | >= 90% | met |" in b
    assert "5.0% (min)" in b


def test_report_prints_the_plan_one_line_per_stage(gpt):
    mod, _, _ = gpt
    need = need_bytes(estimate_memory(mod, "llvm"))
    art = ac.build(mod, "llvm", budget=int(need * 0.8))  # attention fused: chunks at 80%
    text = str(art.report)
    ch = art.report.chunking
    stages = {r["stage"] for r in ch["regions"]}
    lines = [ln.strip() for ln in text.splitlines()]
    assert sum(ln.startswith("stage ") for ln in lines) == len(stages) >= 1
    r = ch["regions"][0]
    assert f"{r['n_chunks']} chunks of {r['chunk']} rows" in text
    assert any(ln.startswith("predicted added run time ") for ln in lines)
    assert "{" not in text  # no JSON dumped into the readable report


def test_report_is_readable_and_serialisable():
    import json

    rep = ac.estimate(_mod("gpt", SMALL_SIZES["gpt"]), target="llvm")
    assert isinstance(rep.peak_bytes, int) and rep.peak_bytes > 0
    text = str(rep)
    assert "peak (one call)" in text and rep.peak_binding in text
    d = json.loads(rep.to_json())
    assert d["peak_bytes"] == rep.peak_bytes
    assert d["estimate"]["timeline"], "timeline must not be empty"
    assert d["weight_bytes"] > 0 and d["input_bytes"] > 0
