"""Regenerate the benchmark plots and tables from the JSON lines in ``benchmarks/results/``.

Reads only the result files (it never builds or runs a model) and writes

* PNG plots next to the JSON lines: ``memory_vs_length_<family>.png`` (max_length),
  ``cut_vs_slowdown.png`` (budget sweep), ``estimator_accuracy.png``;
* the tables of ``benchmarks/README.md`` between ``<!-- report:NAME -->`` and
  ``<!-- /report:NAME -->`` markers (hand-written text around them is kept);
* the headline block of the top-level ``README.md`` between ``<!-- report:headline -->`` and
  ``<!-- /report:headline -->`` (the only part of that file it ever rewrites).

A missing or unreadable results file skips its section with a note; the output is
deterministic (sorted rows, no timestamps), so running it twice changes nothing.

    python benchmarks/report.py                       # all of the above
    python benchmarks/report.py --no-plots            # tables and headline only
    python benchmarks/report.py --results DIR --readme README.md --bench-readme B.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
FAMILY_ORDER = ("gpt", "vit", "evoformer", "unet")
FAMILY_LABEL = {"gpt": "GPT", "vit": "ViT", "evoformer": "Evoformer", "unet": "UNet"}
SIZE_NAME = {"gpt": "S", "vit": "tokens", "evoformer": "N", "unet": "side"}
SLOWDOWN_LIMIT = 1.10  # targets: >= 90% cut at <= 10% slowdown (GPT, Evoformer)
CUT_TARGET = 90.0
CUT_TARGET_FAMILIES = ("gpt", "evoformer")
TIGHTEST_TARGET = 10.0  # tightest reachable budget <= 10% of the unchunked peak (every family)
SEARCH_TARGET = 0.2  # AutoChunk search + rewrite time over TVM's build time of the model
BIG_PEAK = 64 * MIB  # estimator target: within 5% of the measured peak for peaks >= 64 MiB

BENCH_SECTIONS = (
    "targets", "estimator_accuracy", "chunk_regions", "budget_sweep", "search_time",
    "max_length", "fuzz", "plots",
)
BENCH_TITLES = {
    "targets": "Targets",
    "estimator_accuracy": "Memory estimator accuracy",
    "chunk_regions": "Hand-picked chunk regions",
    "budget_sweep": "AutoChunk budget sweep",
    "search_time": "AutoChunk search time against TVM's build time",
    "max_length": "Longest input within a fixed budget",
    "fuzz": "Fuzzing",
    "plots": "Plots",
}


# ------------------------------------------------------------------------------------ helpers


def _family_key(fam: str) -> tuple:
    return (FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER), fam)


def _label(fam: str) -> str:
    return FAMILY_LABEL.get(fam, fam)


def _mib(b) -> str:
    return "-" if b is None else f"{b / MIB:.1f}"


def _num(x, fmt: str = "{}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1f}%"


def _budget_key(label: str, budget_bytes) -> tuple:
    """Sort budgets from the loosest down to the search minimum ("min" last)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*%\s*", str(label))
    if m:
        return (0, -float(m.group(1)), 0)
    if str(label) == "min":
        return (2, 0.0, 0)
    return (1, 0.0, -(budget_bytes or 0))


def _regions(regs) -> str:
    """'chunk x n' list; a region is [start, end, chunk, n_chunks] or [chunk, n_chunks]."""
    if not regs:
        return "none"
    out = []
    for r in regs:
        if isinstance(r, dict):
            out.append(f"{r.get('chunk')}x{r.get('n_chunks')}")
        elif isinstance(r, (list, tuple)) and len(r) >= 2:
            out.append(f"{r[-2]}x{r[-1]}")
        else:
            out.append(str(r))
    return ", ".join(out)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _rel(path: Path, start: Path) -> str:
    """A path relative to ``start``, with forward slashes (stable across machines)."""
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return path.name


def read_jsonl(path: Path, notes: list[str]) -> list[dict] | None:
    """Rows of a JSON-lines file; None when it is missing. Bad lines are skipped with a note."""
    if not path.is_file():
        return None
    rows, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        notes.append(f"{path.name}: cannot read ({e}); skipped")
        return None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: skipped {bad} unreadable line(s)")
    return rows


def _missing(name: str, script: str) -> list[str]:
    return [f"_No results: `{name}` is missing; run `python benchmarks/{script}`._"]


# ------------------------------------------------------------------------------------ loading


class Data:
    """Everything read from the results folder (None where a file is missing)."""

    def __init__(self, results: Path, notes: list[str]):
        self.results = results
        self.estimator = read_jsonl(results / "estimator_accuracy.jsonl", notes)
        self.regions = read_jsonl(results / "chunk_regions.jsonl", notes)
        self.max_length = read_jsonl(results / "max_length.jsonl", notes)
        self.fuzz = read_jsonl(results / "fuzz.jsonl", notes)
        self.search_time = read_jsonl(results / "search_time.jsonl", notes)
        self.sweep, self.sweep_files = self._load_sweep(results, notes)

    @staticmethod
    def _load_sweep(results: Path, notes: list[str]) -> tuple[list[dict] | None, list[str]]:
        files = sorted(results.glob("budget_sweep*.jsonl"),
                       key=lambda p: (p.name != "budget_sweep.jsonl", p.name))
        if not files:
            return None, []
        merged: dict[tuple, dict] = {}
        for f in files:
            for r in read_jsonl(f, notes) or []:
                if "family" not in r or "size" not in r or "budget" not in r:
                    continue
                merged[(r["family"], r["size"], str(r["budget"]))] = r  # later files win
        rows = sorted(
            merged.values(),
            key=lambda r: (_family_key(r["family"]), r["size"],
                           _budget_key(r["budget"], r.get("budget_bytes"))),
        )
        return rows, [f.name for f in files]


# ----------------------------------------------------------------------------------- analysis


def best_cut(sweep: list[dict]) -> dict[str, dict]:
    """Per family: the built row with the largest cut among those with slowdown <= 1.10."""
    best: dict[str, dict] = {}
    for r in sweep:
        if not r.get("ok") or r.get("cut_pct") is None or r.get("slowdown") is None:
            continue
        if r["slowdown"] > SLOWDOWN_LIMIT:
            continue
        cur = best.get(r["family"])
        if cur is None or (r["cut_pct"], -r["slowdown"]) > (cur["cut_pct"], -cur["slowdown"]):
            best[r["family"]] = r
    return best


def tightest(sweep: list[dict]) -> dict[tuple, dict]:
    """Per (family, size): the smallest budget built (as % of the unchunked peak) and the
    search minimum (the "min" row)."""
    out: dict[tuple, dict] = {}
    for r in sweep:
        if not r.get("unchunked_peak_bytes") or not r.get("budget_bytes"):
            continue
        key = (r["family"], r["size"])
        d = out.setdefault(key, {"best": None, "min": None})
        pct = 100.0 * r["budget_bytes"] / r["unchunked_peak_bytes"]
        if str(r["budget"]) == "min":
            d["min"] = pct
        if r.get("ok") and (d["best"] is None or pct < d["best"][0]):
            d["best"] = (pct, str(r["budget"]))
    return out


def tightest_by_family(sweep: list[dict]) -> dict[str, tuple]:
    """family -> (pct, size, budget label) of the tightest budget built at any size."""
    out: dict[str, tuple] = {}
    for (fam, size), d in tightest(sweep).items():
        if d["best"] is None:
            continue
        cand = (d["best"][0], size, d["best"][1])
        if fam not in out or cand[0] < out[fam][0]:
            out[fam] = cand
    return out


def max_length_summaries(rows: list[dict]) -> list[dict]:
    """One summary per (family, base size): the file's summary row, or one derived from the
    probes so far (``partial``) while the run is still going."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "family" in r and "base_size" in r:
            groups.setdefault((r["family"], r["base_size"]), []).append(r)
    out = []
    for (fam, base), rs in sorted(groups.items(), key=lambda kv: (_family_key(kv[0][0]), kv[0][1])):
        summ = [r for r in rs if r.get("kind") == "summary"]
        if summ:
            s = dict(summ[-1])
            s["partial"] = False
        else:
            def largest(who, rs=rs, base=base):
                fits = [r["size"] for r in rs if r.get("kind") == "probe"
                        and r.get("who") == who and r.get("fits") and "size" in r]
                return max([*fits, base])

            un = largest("unchunked")
            ac = max(largest("autochunk"), un)
            s = {"family": fam, "base_size": base, "budget_bytes": rs[0].get("budget_bytes"),
                 "max_unchunked": un, "max_autochunk": ac,
                 "ratio": round(ac / un, 2) if un else None, "capped": False, "partial": True}
        s["rows"] = rs
        out.append(s)
    return out


def estimator_stats(rows: list[dict]) -> dict:
    def absmax(vals):
        vals = [abs(v) for v in vals if v is not None]
        return max(vals) if vals else None

    big = [r for r in rows if (r.get("measured_bytes") or 0) >= BIG_PEAK]
    return {
        "n": len(rows),
        "plan": absmax(r.get("err_estimate_vs_plan_pct") for r in rows),
        "measured_all": absmax(r.get("err_runtime_vs_measured_pct") for r in rows),
        "measured_big": absmax(r.get("err_runtime_vs_measured_pct") for r in big),
        "n_big": len(big),
    }


# ------------------------------------------------------------------------------------- tables


def section_estimator(data: Data) -> list[str]:
    rows = data.estimator
    if rows is None:
        return _missing("estimator_accuracy.jsonl", "estimator_accuracy.py")
    rows = sorted((r for r in rows if "family" in r and "size" in r),
                  key=lambda r: (_family_key(r["family"]), r["size"]))

    def err(x):
        return "-" if x is None else f"{x:+.2f}%"

    body = [
        [r["family"], r["size"], _mib(r.get("estimate_bytes")), _mib(r.get("plan_bytes")),
         err(r.get("err_estimate_vs_plan_pct")), _mib(r.get("runtime_estimate_bytes")),
         _mib(r.get("measured_bytes")), err(r.get("err_runtime_vs_measured_pct")),
         _num(r.get("estimate_s"), "{:.2f}"), _num(r.get("build_s"), "{:.1f}"),
         _num(r.get("run_s"), "{:.2f}")]
        for r in rows
    ]
    out = _table(["model", "size", "estimate MiB", "TVM plan MiB", "err vs plan",
                  "runtime est. MiB", "measured MiB", "err vs measured", "estimate s",
                  "build s", "run s"], body)
    st = estimator_stats(rows)
    out.append("")
    parts = [f"{st['n']} cases"]
    if st["plan"] is not None:
        ok = "met" if st["plan"] <= 2.0 else "missed"
        parts.append(f"largest |estimate - TVM plan| {st['plan']:.2f}% (target 2%: {ok})")
    if st["measured_big"] is not None:
        ok = "met" if st["measured_big"] <= 5.0 else "missed"
        parts.append(f"largest |run-time estimate - measured| {st['measured_big']:.2f}% over the "
                     f"{st['n_big']} peaks >= 64 MiB (target 5%: {ok})")
    if st["measured_all"] is not None:
        parts.append(f"{st['measured_all']:.2f}% over all sizes")
    out.append("; ".join(parts) + ".")
    return out


def section_chunk_regions(data: Data) -> list[str]:
    rows = data.regions
    if rows is None:
        return _missing("chunk_regions.jsonl", "chunk_regions.py")
    main = sorted((r for r in rows if "family" in r and "region" in r),
                  key=lambda r: (_family_key(r["family"]), r["size"], str(r["region"])))
    compile_rows = sorted((r["compile_time"] for r in rows
                           if isinstance(r.get("compile_time"), dict)),
                          key=lambda c: (_family_key(c.get("family", "")), c.get("size", 0),
                                         c.get("n_chunks", 0)))

    def arrow(r, a, b, fmt=_mib):
        return f"{fmt(r.get(a))} → {fmt(r.get(b))}"

    def sec(x):
        return _num(x, "{:g}")

    body = [
        [r["family"], r["size"], f"{r['region']} ({r.get('seed', '?')})",
         f"{r.get('chunk')} x {r.get('n_chunks')}", arrow(r, "est_before", "est_after"),
         arrow(r, "plan_before", "plan_after"),
         arrow(r, "runtime_est_before", "runtime_est_after"),
         arrow(r, "measured_before", "measured_after"), _num(r.get("max_rel_err"), "{:.0e}"),
         arrow(r, "run_before_s", "run_after_s", sec)]
        for r in main
    ]
    out = _table(["model", "size", "region (seed[dim])", "chunk x n", "estimate MiB",
                  "TVM plan MiB", "run-time est. MiB", "measured MiB", "max rel err", "run s"],
                 body)
    if compile_rows:
        out += ["", "Compile time against the number of chunks:", ""]
        out += _table(["model", "size", "chunks", "chunk", "TVM build s", "plan MiB"],
                      [[c.get("family"), c.get("size"), c.get("n_chunks"), c.get("chunk"),
                        _num(c.get("build_s")), _mib(c.get("plan"))] for c in compile_rows])
    return out


def section_budget_sweep(data: Data) -> list[str]:
    rows = data.sweep
    if rows is None:
        return _missing("budget_sweep.jsonl", "budget_sweep.py")
    layers = any("layers" in r for r in rows)
    body, n_ok, bad = [], 0, 0
    for r in rows:
        model = [r["family"], r["size"]] + ([_num(r.get("layers"))] if layers else [])
        budget = f"{r['budget']} ({_mib(r.get('budget_bytes'))} MiB)"
        if not r.get("ok"):
            body.append(model + [budget, "refused", "-", _mib(r.get("unchunked_peak_bytes")),
                                 _mib(r.get("lower_bound_bytes"))]
                        + ["-"] * 5 + [_num(r.get("build_s"), "{:.1f}")])
            continue
        n_ok += 1
        meas = _mib(r.get("measured_bytes"))
        flags = []
        if r.get("measured_within") is False:
            flags.append("over budget")
        if r.get("plan_within_budget") is False:
            flags.append("plan over budget")
        err = r.get("max_rel_err")
        if err is not None and err > 1e-5:
            flags.append("error > 1e-5")
        if flags:
            bad += 1
            meas += " (" + ", ".join(flags) + ")"
        body.append([
            *model, budget, _mib(r.get("plan_bytes")), meas, _mib(r.get("unchunked_peak_bytes")),
            _mib(r.get("lower_bound_bytes")), _pct(r.get("cut_pct")),
            _num(r.get("slowdown"), "{:.3f}"),
            _regions(r.get("regions")), _num(err, "{:.1e}"), _num(r.get("search_s"), "{:.2f}"),
            _num(r.get("build_s"), "{:.1f}"),
        ])
    header = ["model", "size"] + (["layers"] if layers else []) + [
        "budget", "plan MiB", "measured MiB", "unchunked MiB", "lower bound MiB", "cut",
        "slowdown",
        "regions (chunk x n)", "max rel err", "search s", "build s"]
    out = [f"From {', '.join(f'`{f}`' for f in data.sweep_files)} (a later file overrides "
           "the same model, size and budget).", ""]
    out += _table(header, body)
    out += ["", f"{len(rows)} points, {n_ok} built, {len(rows) - n_ok} refused, "
            f"{bad} violation(s) (measured over budget + max(1 MiB, 1%), plan over budget, "
            "or error > 1e-5)."]
    return out


def section_search_time(data: Data) -> list[str]:
    rows = data.search_time
    if rows is None:
        return _missing("search_time.jsonl", "search_time.py")
    rows = [r for r in rows if "family" in r and "target" in r]
    body = []
    for r in rows:
        layers = "" if r.get("layers") is None else f", {r['layers']} layer"
        head = [f"{r['family']}{layers}", r["size"], r["target"], r["budget"]]
        if not r.get("ok"):
            body.append([*head, "refused", "-", "-", "-", "-"])
            continue
        body.append([*head, _num(r.get("search_s"), "{:.2f}"), _num(r.get("evaluations")),
                     _num(r.get("tvm_build_s"), "{:.2f}"),
                     _num(r.get("search_over_build"), "{:.2f}"), _regions(r.get("regions"))])
    ratios = [r["search_over_build"] for r in rows if r.get("ok") and r.get("search_over_build")]
    out = ["From `search_time.jsonl` (`benchmarks/search_time.py`; builds only, CUDA compiled "
           "with nvcc, not run). Target (issue 4): search + rewrite under 20% of TVM's build.", ""]
    out += _table(["model", "size", "target", "budget", "search s", "estimates", "TVM build s",
                   "search / build", "regions (chunk x n)"], body)
    for t in sorted({r["target"] for r in rows}):
        rs = [r["search_over_build"] for r in rows
              if r["target"] == t and r.get("ok") and r.get("search_over_build")]
        if rs:
            met = sum(x <= 0.2 for x in rs)
            out += ["", f"{t}: search / build {min(rs):.2f}-{max(rs):.2f}; under 0.2 at {met} of "
                        f"{len(rs)} points."]
    if not ratios:
        out += ["", "No point built."]
    return out


def section_max_length(data: Data) -> list[str]:
    rows = data.max_length
    if rows is None:
        return _missing("max_length.jsonl", "max_length.py")
    sums = max_length_summaries(rows)
    if not sums:
        return ["_`max_length.jsonl` has no rows yet._"]
    body = []
    for s in sums:
        if "autochunk_verified" in s or "unchunked_verified" in s:
            ok = s.get("autochunk_verified") and s.get("unchunked_verified")
            ver = "yes" if ok else "NO"
        else:
            ver = "in progress" if s["partial"] else "not measured"
        torch_rows = {r["size"]: r for r in s["rows"] if r.get("kind") == "torch" and "size" in r}

        def torch_at(size, s=s, torch_rows=torch_rows):
            v = s.get(f"torch_peak_at_{size}")
            if v is None and size in torch_rows:
                v = torch_rows[size].get("peak_bytes")
                if not torch_rows[size].get("ok", True):
                    return "failed"
            return _mib(v)

        ac = f"{s['max_autochunk']}{' (cap)' if s.get('capped') else ''}"
        if s["partial"]:
            ac += " (so far)"
        body.append([s["family"], s["base_size"], _mib(s.get("budget_bytes")),
                     s["max_unchunked"], ac, _num(s.get("ratio"), "{}x"), ver,
                     torch_at(s["base_size"]), torch_at(s["max_autochunk"])])
    out = _table(["model", "base size", "budget MiB", "max unchunked", "max AutoChunk", "ratio",
                  "verified", "torch eager MiB at base", "torch eager MiB at max AutoChunk"],
                 body)
    if any(s["partial"] for s in sums):
        out += ["", "_In progress: no summary line yet for some models; their maxima are the "
                "largest sizes that fit so far._"]
    return out


def section_fuzz(data: Data) -> list[str]:
    rows = data.fuzz
    if rows is None:
        return _missing("fuzz.jsonl", "fuzz.py")
    graphs = [r for r in rows if isinstance(r.get("budgets"), list)]
    summary = [r for r in rows if r.get("summary")]
    gen_err = sum(1 for r in rows if "generator_error" in r)
    if not graphs:  # unknown format: count rows and any status-like field
        out = [f"{len(rows)} rows."]
        for key in ("status", "outcome", "result"):
            c = Counter(str(r[key]) for r in rows if key in r)
            if c:
                out.append(f"`{key}`: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        return out
    outcomes: Counter = Counter()
    min_checks: Counter = Counter()
    kinds: Counter = Counter()
    failing = []
    for g in graphs:
        for b in g["budgets"]:
            outcomes[str(b.get("outcome", "error"))] += 1
            sub = b.get("at_min_budget")
            if isinstance(sub, dict) and not sub.get("repeat"):
                min_checks[str(sub.get("outcome", "error"))] += 1
        for f in g.get("failures") or []:
            kinds[str(f.get("kind") if isinstance(f, dict) else f)] += 1
        if g.get("failures"):
            failing.append(g.get("seed"))
    seeds = sorted(g["seed"] for g in graphs if isinstance(g.get("seed"), int))
    seed_range = f" (seeds {seeds[0]}..{seeds[-1]})" if seeds else ""
    body = [
        ["graphs", f"{len(graphs)}{seed_range}"],
        ["budgets tried", sum(outcomes.values())],
    ]
    body += [[f"budgets {k}", v] for k, v in sorted(outcomes.items())]
    body += [["min_budget checks " + k, v] for k, v in sorted(min_checks.items())]
    body.append(["failures", sum(kinds.values()) + gen_err])
    body += [[f"failures: {k}", v] for k, v in sorted(kinds.items())]
    if gen_err:
        body.append(["generator errors", gen_err])
    if failing:
        body.append(["failing seeds", ", ".join(str(s) for s in sorted(failing, key=str))])
    secs = sum(g.get("seconds") or 0 for g in graphs)
    body.append(["graph seconds (sum)", f"{secs:.0f}"])
    if summary:
        s = summary[-1]
        if s.get("stopped"):
            body.append(["stopped", s["stopped"]])
        if s.get("command"):
            body.append(["command", f"`{s['command']}`"])
    else:
        body.append(["status", "no summary line (run in progress or interrupted)"])
    return _table(["quantity", "value"], body)


def section_targets(data: Data) -> list[str]:
    out: list[str] = []
    if data.sweep is None:
        out += ["_No budget sweep results: cut and tightest-budget targets not evaluated._"]
    else:
        best = best_cut(data.sweep)
        fams = sorted({r["family"] for r in data.sweep}, key=_family_key)
        body = []
        for fam in fams:
            r = best.get(fam)
            target = f">= {CUT_TARGET:g}%" if fam in CUT_TARGET_FAMILIES else "-"
            if r is None:
                status = "missed" if fam in CUT_TARGET_FAMILIES else "-"
                body.append([fam, "none", "-", "-", target, status])
                continue
            status = "-"
            if fam in CUT_TARGET_FAMILIES:
                status = "met" if r["cut_pct"] >= CUT_TARGET else "missed"
            body.append([fam, _pct(r["cut_pct"]), f"{r['size']}, {r['budget']}",
                         f"{r['slowdown']:.3f}", target, status])
        out += [f"Largest activation-memory cut with slowdown <= {SLOWDOWN_LIMIT:.2f} "
                "(budget sweep, any size):", ""]
        out += _table(["model", "best cut", "at (size, budget)", "slowdown", "target", "status"],
                      body)
        tight = tightest(data.sweep)
        body = []
        for (fam, size), d in sorted(tight.items(),
                                     key=lambda kv: (_family_key(kv[0][0]), kv[0][1])):
            if d["best"] is None:
                body.append([fam, size, "none built", _pct(d["min"]), "missed"])
                continue
            pct, label = d["best"]
            status = "met" if pct <= TIGHTEST_TARGET else "missed"
            body.append([fam, size, f"{pct:.1f}% ({label})", _pct(d["min"]), status])
        out += ["", "Tightest budget built, as % of the unchunked peak (target <= "
                f"{TIGHTEST_TARGET:g}% for every model); \"search minimum\" is the smallest "
                "budget the search itself reports reachable (the \"min\" row):", ""]
        out += _table(["model", "size", "tightest built", "search minimum", "status"], body)
        fam_tight = tightest_by_family(data.sweep)
        met = [f for f in fams if f in fam_tight and fam_tight[f][0] <= TIGHTEST_TARGET]
        out += ["", f"Per model at its best size: {len(met)} of {len(fams)} met "
                f"({', '.join(met) if met else 'none'})."]
    out.append("")
    rows = [r for r in data.search_time or [] if r.get("ok") and r.get("search_over_build")]
    if not rows:
        out += ["_No search-time results: the search-time target is not evaluated._", ""]
    else:
        parts = []
        for t in sorted({r["target"] for r in rows}):
            rs = [r["search_over_build"] for r in rows if r["target"] == t]
            met = sum(x <= SEARCH_TARGET for x in rs)
            parts.append(f"{t} {met} of {len(rs)} points ({min(rs):.2f}-{max(rs):.2f}: "
                         f"{'met' if met == len(rs) else 'missed'})")
        out += [f"Search time under {SEARCH_TARGET:.0%} of TVM's build time (search_time.jsonl): "
                + "; ".join(parts) + ".", ""]
    if data.max_length is None:
        out.append("_No max-length results: ratios not evaluated._")
    else:
        sums = max_length_summaries(data.max_length)
        if sums:
            parts = [f"{s['family']} {s['ratio']}x{' (so far)' if s['partial'] else ''}"
                     f"{' (cap)' if s.get('capped') else ''}" for s in sums]
            out.append("Longest input AutoChunk fits in the unchunked base-size budget, as a "
                       "multiple of the longest unchunked input: " + ", ".join(parts) + ".")
        else:
            out.append("_`max_length.jsonl` has no rows yet._")
    return out


def plot_names(data: Data) -> list[str]:
    names = []
    if data.estimator:
        names.append("estimator_accuracy.png")
    if data.sweep and any(r.get("ok") and r.get("slowdown") is not None for r in data.sweep):
        names.append("cut_vs_slowdown.png")
    if data.max_length:
        fams = sorted({r["family"] for r in data.max_length if "family" in r}, key=_family_key)
        names += [f"memory_vs_length_{f}.png" for f in fams]
    return names


def section_plots(data: Data, bench_dir: Path) -> list[str]:
    names = plot_names(data)
    if not names:
        return ["_No plots: no results to plot._"]
    rel = _rel(data.results, bench_dir)
    return [f"![{n[:-4]}]({rel}/{n})" for n in names]


# -------------------------------------------------------------------------------------- plots


def make_plots(data: Data) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    meta = {"Software": None}  # no version stamp: the PNG bytes depend on the data only

    def save(fig, name):
        path = data.results / name
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.92)  # cheaper than tight
        fig.savefig(path, dpi=110, metadata=meta)
        plt.close(fig)
        written.append(path)

    markers = "osD^vP*X"
    fams_all = sorted({r.get("family", "?") for src in (data.estimator or [], data.sweep or [])
                       for r in src}, key=_family_key)
    style = {f: (f"C{i % 10}", markers[i % len(markers)]) for i, f in enumerate(fams_all)}

    if data.estimator:
        fig, ax = plt.subplots(figsize=(6, 5))
        pts = []
        for fam in fams_all:
            rs = sorted((r for r in data.estimator if r.get("family") == fam
                         and r.get("measured_bytes")), key=lambda r: r["size"])
            if not rs:
                continue
            c, m = style[fam]
            x = [r["measured_bytes"] / MIB for r in rs]
            for key, fill, suffix in (("runtime_estimate_bytes", c, "run-time est."),
                                      ("estimate_bytes", "none", "static plan est.")):
                y = [r[key] / MIB for r in rs if r.get(key)]
                if len(y) != len(x):
                    continue
                ax.scatter(x, y, marker=m, facecolors=fill, edgecolors=c,
                           label=f"{_label(fam)} {suffix}")
                pts += x + y
        if pts:
            lo, hi = min(pts) / 1.5, max(pts) * 1.5
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured peak RSS of one call, MiB")
        ax.set_ylabel("estimated peak, MiB")
        ax.set_title("Memory estimator vs measured peak")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        save(fig, "estimator_accuracy.png")

    pts = [r for r in data.sweep or [] if r.get("ok") and r.get("slowdown") is not None
           and r.get("cut_pct") is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 5))
        sizes: dict[str, set] = {}
        for r in pts:
            sizes.setdefault(r["family"], set()).add(r["size"])
        for fam in sorted(sizes, key=_family_key):
            c, m = style.get(fam, ("C0", "o"))
            rs = [r for r in pts if r["family"] == fam]
            ax.scatter([r["cut_pct"] for r in rs], [r["slowdown"] for r in rs], color=c,
                       marker=m, label=_label(fam), zorder=3)
            for r in rs:
                text = str(r["budget"])
                if len(sizes[fam]) > 1:
                    text = f"{r['size']}:{text}"
                ax.annotate(text, (r["cut_pct"], r["slowdown"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=c)
        ax.axhline(SLOWDOWN_LIMIT, ls="--", color="grey", lw=1)
        ax.axhline(1.0, ls=":", color="grey", lw=0.8)
        for x in (80, 90):
            ax.axvline(x, ls="--", color="grey", lw=1)
        ax.set_xlabel("activation memory cut, % of the unchunked peak")
        ax.set_ylabel("slowdown (chunked / unchunked time)")
        ax.set_title("AutoChunk budget sweep: memory cut vs slowdown")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        save(fig, "cut_vs_slowdown.png")

    for s in max_length_summaries(data.max_length or []):
        fam, rs = s["family"], s["rows"]
        fig, ax = plt.subplots(figsize=(7, 5))
        ys: list[float] = []

        def series(sel, key, *args, rs=rs, **kw):
            pts = sorted((r["size"], r[key] / MIB) for r in rs
                         if sel(r) and r.get(key) and "size" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], *args, **kw)
                ys.extend(p[1] for p in pts)

        def kind(k, who, fits=None):
            return lambda r: (r.get("kind") == k and r.get("who") == who
                              and (fits is None or bool(r.get("fits")) == fits))

        budget = s.get("budget_bytes")
        base_pt = [{"kind": "probe", "who": "unchunked", "size": s["base_size"],
                    "estimate_bytes": budget}] if budget else []
        series(kind("probe", "unchunked"), "estimate_bytes", "o--", rs=base_pt + rs, color="C0",
               label="unchunked TVM, estimate")
        series(kind("verify", "unchunked"), "measured_bytes", "s", color="C0", ms=9,
               mfc="none", label="unchunked TVM, measured")
        series(kind("probe", "autochunk", True), "estimate_bytes", "o-", color="C1",
               label="AutoChunk, estimate (fits)")
        series(kind("probe", "autochunk", False), "best_bytes", "x", color="C1", ms=8,
               label="AutoChunk, smallest peak reached (refused)")
        series(kind("verify", "autochunk"), "measured_bytes", "s", color="C1", ms=9,
               mfc="none", label="AutoChunk, measured")
        series(lambda r: r.get("kind") == "torch" and r.get("ok", True), "peak_bytes", "^-",
               color="C2", label="torch eager, measured")
        if budget:
            ax.axhline(budget / MIB, color="k", ls="--", lw=1,
                       label=f"budget {budget / MIB:.1f} MiB")
            ys.append(budget / MIB)
        for x, txt in ((s["max_unchunked"], "max unchunked"),
                       (s["max_autochunk"], "max AutoChunk")):
            ax.axvline(x, color="grey", ls=":", lw=1)
            ax.annotate(txt, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=7, color="grey", rotation=90,
                        va="top")
        pos = [y for y in ys if y > 0]
        if pos and max(pos) / min(pos) > 10:
            ax.set_yscale("log")
        ax.set_xlabel(f"input size ({SIZE_NAME.get(fam, 'size')})")
        ax.set_ylabel("peak memory of one call, MiB")
        title = f"{_label(fam)}: memory vs input size (budget = unchunked peak at {s['base_size']})"
        ax.set_title(title + (" (in progress)" if s["partial"] else ""), fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        save(fig, f"memory_vs_length_{fam}.png")
    return written


# ----------------------------------------------------------------------------------- markdown


def markers(name: str) -> tuple[str, str]:
    return f"<!-- report:{name} -->", f"<!-- /report:{name} -->"


def _wrap(body: list[str], width: int = 100) -> list[str]:
    """Wrap prose and bullet lines like the hand-written text; tables and images stay."""
    out = []
    for line in body:
        if len(line) <= width or line.startswith(("|", "!", "<!--")):
            out.append(line)
            continue
        indent = "  " if line.startswith("- ") else ""
        out += textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False,
                             break_on_hyphens=False)
    return out


def replace_block(text: str, name: str, body: list[str]) -> tuple[str, bool]:
    """Replace what lies between the markers of ``name``; (text, False) if they are absent."""
    start, end = markers(name)
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        return text, False
    inner = "\n" + "\n".join(_wrap(body)).strip("\n") + "\n"
    return text[: i + len(start)] + inner + text[j:], True


def _block(name: str, body: list[str]) -> str:
    start, end = markers(name)
    return start + "\n" + "\n".join(_wrap(body)).strip("\n") + "\n" + end + "\n"


BENCH_README_HEAD = """# Benchmarks

Results of the scripts in this folder, regenerated by `python benchmarks/report.py` from the
JSON lines in `benchmarks/results/`. Text between `<!-- report:... -->` markers is generated.
"""


def update_bench_readme(path: Path, sections: dict[str, list[str]]) -> str:
    text = path.read_text(encoding="utf-8") if path.is_file() else BENCH_README_HEAD
    for name in BENCH_SECTIONS:
        text, found = replace_block(text, name, sections[name])
        if not found:  # append a titled section with fresh markers
            title = f"\n\n## {BENCH_TITLES[name]}\n\n"
            text = text.rstrip("\n") + title + _block(name, sections[name])
    return text


def update_readme(path: Path, body: list[str]) -> str | None:
    """The README with its headline block rewritten (markers added under '## Results')."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    text, found = replace_block(text, "headline", body)
    if found:
        return text
    block = _block("headline", body)
    m = re.search(r"^##\s+Results[^\n]*\n", text, re.M)
    if m:
        return text[: m.end()] + "\n" + block + text[m.end():]
    return text.rstrip("\n") + "\n\n## Results\n\n" + block


def headline(data: Data, link: str) -> list[str]:
    lines = []
    if data.sweep:
        best = best_cut(data.sweep)
        parts = []
        for fam in sorted(best, key=_family_key):
            r = best[fam]
            parts.append(f"{_label(fam)} {r['cut_pct']:.1f}% "
                         f"({SIZE_NAME.get(fam, 'size')}={r['size']}, slowdown "
                         f"{r['slowdown']:.3f})")
        if parts:
            def met(f):
                return "met" if f in best and best[f]["cut_pct"] >= CUT_TARGET else "missed"

            verdict = ", ".join(
                f"{_label(f)} {met(f)}"
                for f in CUT_TARGET_FAMILIES if any(r["family"] == f for r in data.sweep))
            lines.append(f"- **Memory cut at <= 10% slowdown:** {'; '.join(parts)}. "
                         f"Target >= 90% for GPT and Evoformer: {verdict}.")
        tight = tightest_by_family(data.sweep)
        if tight:
            parts = [f"{_label(f)} {t[0]:.1f}% ({SIZE_NAME.get(f, 'size')}={t[1]})"
                     for f, t in sorted(tight.items(), key=lambda kv: _family_key(kv[0]))]
            n_met = sum(t[0] <= TIGHTEST_TARGET for t in tight.values())
            lines.append(f"- **Tightest budget built** (% of the unchunked peak): "
                         f"{'; '.join(parts)}. Target <= 10%: {n_met} of {len(tight)} met.")
    if data.max_length:
        sums = max_length_summaries(data.max_length)
        if sums:
            parts = [f"{_label(s['family'])} {s['max_autochunk']} vs {s['max_unchunked']} "
                     f"({s['ratio']}x{', so far' if s['partial'] else ''})" for s in sums]
            lines.append("- **Longest input in the same budget** (AutoChunk vs unchunked TVM): "
                         + "; ".join(parts) + ".")
    if data.estimator:
        st = estimator_stats(data.estimator)
        if st["plan"] is not None and st["measured_big"] is not None:
            plan = ("equal to TVM's static plan" if st["plan"] == 0
                    else f"within {st['plan']:.2f}% of TVM's static plan")
            lines.append(f"- **Memory estimator:** {plan} in all {st['n']} cases; run-time "
                         f"estimate within {st['measured_big']:.2f}% of the measured peak for "
                         f"the {st['n_big']} peaks >= 64 MiB ({st['measured_all']:.2f}% at any "
                         "size).")
    if data.fuzz:
        graphs = [r for r in data.fuzz if isinstance(r.get("budgets"), list)]
        if graphs:
            n_fail = sum(1 for g in graphs if g.get("failures"))
            n_b = sum(len(g["budgets"]) for g in graphs)
            lines.append(f"- **Fuzzing:** {len(graphs)} random graphs, {n_b} budgets, "
                         f"{n_fail} failing graph(s).")
    if not lines:
        lines.append("- No benchmark results yet.")
    lines.append(f"- Tables, plots and how to rerun them: [{link}]({link}).")
    return lines


# ------------------------------------------------------------------------------------- main


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def _safe(name: str, fn, *args) -> list[str]:
    """``fn(*args)``, or a note line when the data has a shape it does not expect."""
    try:
        return fn(*args)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        print(f"note: section {name} skipped after an error: {msg}")
        return [f"_Section skipped: the data could not be summarized ({msg})._"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--bench-readme", type=Path, default=ROOT / "benchmarks" / "README.md")
    ap.add_argument("--no-plots", action="store_true", help="tables and headline only")
    args = ap.parse_args(argv)

    notes: list[str] = []
    if not args.results.is_dir():
        print(f"note: results folder {args.results} does not exist; every section is skipped")
    data = Data(args.results, notes)
    for name, rows in (("estimator_accuracy.jsonl", data.estimator),
                       ("budget_sweep*.jsonl", data.sweep),
                       ("chunk_regions.jsonl", data.regions),
                       ("max_length.jsonl", data.max_length), ("fuzz.jsonl", data.fuzz)):
        if rows is None:
            notes.append(f"{name}: not found in {args.results}; section skipped")
    for n in notes:
        print(f"note: {n}")

    if not args.no_plots and args.results.is_dir():
        try:
            for p in make_plots(data):
                print(f"plot: {p}")
        except Exception as e:  # odd data must not stop the tables
            print(f"note: plots skipped after an error: {type(e).__name__}: {e}")

    bench_dir = args.bench_readme.parent
    makers = {
        "targets": section_targets,
        "estimator_accuracy": section_estimator,
        "chunk_regions": section_chunk_regions,
        "budget_sweep": section_budget_sweep,
        "search_time": section_search_time,
        "max_length": section_max_length,
        "fuzz": section_fuzz,
        "plots": lambda d: section_plots(d, bench_dir),
    }
    sections = {name: _safe(name, fn, data) for name, fn in makers.items()}
    bench_dir.mkdir(parents=True, exist_ok=True)
    changed = _write_if_changed(args.bench_readme, update_bench_readme(args.bench_readme, sections))
    print(f"{'wrote' if changed else 'unchanged'}: {args.bench_readme}")

    head = _safe("headline", headline, data, _rel(args.bench_readme, args.readme.parent))
    new = update_readme(args.readme, head)
    if new is None:
        print(f"note: {args.readme} not found; headline not written")
    else:
        changed = _write_if_changed(args.readme, new)
        print(f"{'wrote' if changed else 'unchanged'}: {args.readme} (headline block)")
    print("\n".join(head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
