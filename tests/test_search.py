"""relay_passes.search over plain data, without TVM: ``fit_chunk`` (the fewest calls that fit,
the guesses and the floor), ``chunk_for_calls``, ``refit_calls``, ``rank_candidates``, and
``SearchOptions`` / ``Candidate.cost`` (the cost constants against the recorded calibrations)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from relay_passes.search import (
    Candidate,
    SearchOptions,
    chunk_for_calls,
    fit_chunk,
    rank_candidates,
    refit_calls,
)

ROOT = Path(__file__).resolve().parents[1]
# the call-count logic on its own: no preferred row multiple (tested apart)
OPTS = SearchOptions(row_multiple=1)


def test_search_module_imports_no_tvm():
    code = "import sys; import relay_passes.search; sys.exit('tvm' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _cand(extent=1024, gran=1, ops=10):
    return Candidate("main", "a", "b", "x", 0, extent, gran, ops, 100, 10)


def _pool_model(c, extent=1024):
    """(static plan, run-time) peaks: 1000 + 10 bytes per row of a chunk; at run time also
    the last, shorter chunk's own frame (the VM pool keeps both: ``chunk_for_calls``)."""
    return 1000 + 10 * c, 1000 + 10 * c + 10 * (extent % c)


def test_fit_takes_the_fewest_chunks_that_fit_not_one():
    # a budget of 6000: 3 calls need chunks of 342 (balanced: 3420 + 3400 for the last one's
    # frame) or 511 (the last 2 rows: 5110 + 20): neither fits; 4 calls of 256 do
    calls = []
    fit = fit_chunk(
        _cand(), 6000, lambda c: calls.append(c) or _pool_model(c), OPTS
    )
    assert fit is not None and fit.peak <= 6000
    assert max(_pool_model(342)) > 6000 and max(_pool_model(511)) > 6000
    assert fit.chunk == 256 and -(-1024 // fit.chunk) == 4
    assert fit.evaluations == len(calls) <= OPTS.max_evals_per_candidate
    # 1001 rows in 5000: 4 calls of 333 (the last 2 rows) fit; balanced 4 calls (251, the
    # last 248) would not, and would need a fifth call
    fit = fit_chunk(_cand(extent=1001), 5000, lambda c: _pool_model(c, 1001), OPTS)
    assert fit.chunk == 333 and -(-1001 // 333) == 4
    assert max(_pool_model(251, 1001)) > 5000 and max(_pool_model(201, 1001)) <= 5000
    # two chunks fit: no smaller chunk is tried after that
    fit = fit_chunk(_cand(), 10**6, lambda c: 1000 + 10 * c, OPTS)
    assert fit.chunk == 512 and fit.evaluations == 1


def test_chunk_for_calls_divides_or_leaves_the_shortest_last_chunk():
    assert chunk_for_calls(4096, 4) == 1024  # a divisor: no last, shorter chunk
    assert chunk_for_calls(4096, 12) == 372  # 11 x 372 + 4
    assert chunk_for_calls(4096, 5) == 1023  # 4 x 1023 + 4
    assert chunk_for_calls(1001, 2) == 501  # two calls over an odd extent: balanced
    for extent, gran in [(4096, 1), (2304, 1), (1000, 8), (96, 8), (65536, 1)]:
        for n in range(2, 64):
            c = chunk_for_calls(extent, n, gran)
            assert c % gran == 0 and c >= gran
            m = -(-extent // c)
            if extent % n == 0 and (extent // n) % gran == 0:
                assert c == extent // n
            elif m == n and n > 2:  # no longer chunk makes n calls
                assert -(-extent // (c + gran)) < n or c + gran > extent
            elif m != n:  # no chunk makes exactly n calls (e.g. 14 of 128 rows): fewer
                assert m < n


def test_fit_under_half_the_peak_skips_two_chunks_and_brackets_with_the_unchunked_point():
    # peak before the stage 20000 (one call); memory ~ 1000 + 10 * rows held
    calls = []
    fit = fit_chunk(_cand(), 6000, lambda c: calls.append(c) or _pool_model(c),
                    OPTS, unchunked=(20000, 20000))
    assert 512 not in calls  # two chunks are not probed under half of the peak
    assert fit.chunk == 256 and fit.evaluations == len(calls) <= 2
    # the unchunked point is a bracket, never a result, and not counted as an estimate
    assert all(c < 1024 for c in calls)
    # at or above half of the peak, two chunks are probed first (and fit here)
    calls = []
    fit = fit_chunk(_cand(), 12000, lambda c: calls.append(c) or _pool_model(c),
                    OPTS, unchunked=(20000, 20000))
    assert calls[0] == 512 and fit.chunk == 512
    # a region whose chunks save nothing: 2 chunks are evaluated to say so, as without it
    calls = []
    fit = fit_chunk(_cand(), 6000, lambda c: calls.append(c) or 19000, OPTS,
                    unchunked=(20000, 20000))
    assert 512 in calls and fit.chunk == 512 and fit.peak == 19000


def test_fit_predicts_static_and_run_time_peaks_apart():
    # 4096 rows; the static plan (one frame: linear in the chunk) is the larger peak unless the
    # last, shorter chunk is long (the run-time pool holds its frame too). Given both parts,
    # the chords land on the fewest calls that fit; given only their maximum, on 5 calls more.
    extent, budget = 4096, 1800

    def parts(c):
        return 1000 + 10 * c, 400 + 10 * (c + extent % c)

    fewest = next(
        n for n in range(2, extent)
        if -(-extent // (c := chunk_for_calls(extent, n))) == n and max(parts(c)) <= budget
    )
    full = (1000 + 10 * extent,) * 2
    fit = fit_chunk(_cand(extent=extent), budget, parts, OPTS, unchunked=full)
    assert -(-extent // fit.chunk) == fewest == 52 and fit.evaluations <= 3
    fit = fit_chunk(_cand(extent=extent), budget, lambda c: max(parts(c)), OPTS,
                    unchunked=full)
    assert -(-extent // fit.chunk) > fewest


def _linear(fixed, per_row, extent):
    """(static plan, run-time) peaks: ``fixed`` + ``per_row`` per row of one frame (static),
    of the chunk's and the last, shorter chunk's frames (run time); and the unchunked point."""

    def peaks(c):
        return fixed + per_row * c, fixed + per_row * (c + extent % c)

    return peaks, (fixed + per_row * extent,) * 2


def _fewest_calls(extent, gran, budget, peaks):
    """Brute force: the fewest calls (at chunk_for_calls' chunk) whose peaks fit."""
    for n in range(2, extent + 1):
        c = chunk_for_calls(extent, n, gran)
        if -(-extent // c) == n and max(peaks(c)) <= budget:
            return n
    return None


def test_fit_guesses_the_first_try_from_the_unchunked_point():
    # little memory that does not shrink with the chunk: memory proportional to the chunk
    # puts the first try on 8 calls of 512 (a divisor), which fits; the chord to the
    # unchunked point says 7 calls would not: one estimate in all
    peaks, full = _linear(300, 10, 4096)
    calls = []
    fit = fit_chunk(_cand(extent=4096), 6000, lambda c: calls.append(c) or peaks(c),
                    OPTS, unchunked=full)
    assert calls == [512] and fit.chunk == 512 and fit.evaluations == 1
    assert _fewest_calls(4096, 1, 6000, peaks) == 8
    # the first guess is moved to a divisor (no last, shorter chunk: a cheaper estimate) for
    # at most a third more calls; the chord then tries fewer: 6 calls of 819 fit
    calls = []
    fit = fit_chunk(_cand(extent=4096), 10000, lambda c: calls.append(c) or peaks(c),
                    OPTS, unchunked=full)
    assert calls == [512, 819] and -(-4096 // fit.chunk) == 6
    assert _fewest_calls(4096, 1, 10000, peaks) == 6
    # much memory that does not shrink: the first guess (8 calls of 512) misses; the line
    # through it and the unchunked point (a secant) lands on the fewest calls that fit (12
    # of 372), without probing 32 calls (128 rows)
    peaks, full = _linear(6000, 10, 4096)
    calls = []
    fit = fit_chunk(_cand(extent=4096), 10000, lambda c: calls.append(c) or peaks(c),
                    OPTS, unchunked=full)
    assert calls == [512, 372] and fit.chunk == 372
    assert _fewest_calls(4096, 1, 10000, peaks) == 12


def _through(pts):
    """(static, run-time) peaks interpolated linearly between measured points {chunk: peaks}."""

    def peaks(c):
        ks = sorted(pts)
        lo = max((k for k in ks if k <= c), default=ks[0])
        hi = min((k for k in ks if k >= c), default=ks[-1])
        if lo == hi:
            return pts[lo]
        w = (c - lo) / (hi - lo)
        return tuple(a + (b - a) * w for a, b in zip(pts[lo], pts[hi]))

    return peaks


def test_fit_guesses_on_the_static_line_when_chunking_raised_the_run_time_peak():
    # Evoformer N=256 at 10%, second stage (estimated MiB): the peak before it is set by the
    # first stage's chunk call; two chunks of this region raise the run-time peak above it, so
    # the run-time line through them and the unchunked point says no shorter chunk fits. The
    # run-time peak is then taken as at two chunks (shorter chunks shrink the frame that
    # raised it) and the static plan on its line: 4 calls are guessed, and fit. (The probe of
    # 32 calls and a refinement took three estimates to land there.)
    peaks = _through({32768: (90.3, 85.5), 16384: (78.3, 73.3), 2048: (68.7, 62.7),
                      256: (60.0, 55.0)})

    calls = []

    def kib(c):
        calls.append(c)
        return tuple(int(v * 1024) for v in peaks(c))

    fit = fit_chunk(_cand(extent=65536, gran=256), int(85.7 * 1024), kib, OPTS,
                    unchunked=(int(100.7 * 1024), int(69.2 * 1024)))
    assert calls == [32768, 16384]
    assert fit.chunk == 16384 and fit.evaluations == 2 and max(peaks(16384)) <= 85.7
    # when the guess misses, the probe still follows: a curve where 4 calls do not fit
    peaks = _through({32768: (90.3, 85.5), 16384: (87.0, 80.0), 2048: (68.7, 62.7),
                      256: (60.0, 55.0)})
    calls.clear()
    fit = fit_chunk(_cand(extent=65536, gran=256), int(85.7 * 1024), kib, OPTS,
                    unchunked=(int(100.7 * 1024), int(69.2 * 1024)))
    assert fit is not None and max(peaks(fit.chunk)) <= 85.7 and fit.chunk < 16384
    assert calls[:2] == [32768, 16384]


def test_fit_stops_refining_when_the_predicted_saving_is_within_the_tolerance():
    # Evoformer N=256 at 20% (estimated MiB): 8 calls miss; the secant lands on 14 calls,
    # which fit; the chord then predicts 13 would fit too: 1 call of 14 is within the 10%
    # tolerance, so it is not estimated. With no tolerance it is, and taken
    peaks = _through({8192: (205.4, 173.9), 5376: (168.3, 150.3), 4864: (161.5, 160.4),
                      4096: (151.4, 119.9), 65536: (883.0, 867.0)})

    def run(opts):
        calls = []

        def kib(c):
            calls.append(c)
            return tuple(int(v * 1024) for v in peaks(c))

        fit = fit_chunk(_cand(extent=65536, gran=256), int(171.3 * 1024), kib, opts,
                        unchunked=(883 * 1024, 867 * 1024))
        return fit, calls

    fit, calls = run(OPTS)
    assert calls == [8192, 4864] and fit.chunk == 4864
    fit, calls = run(SearchOptions(chunk_tolerance=0.0, row_multiple=1))
    assert calls == [8192, 4864, 5376] and fit.chunk == 5376


def test_fit_near_a_floor_probes_small_rows_before_shorter_chunks():
    # ViT 2304 tokens (2305 rows) at 10% (estimated MiB): the first guess (209 rows) misses
    # and the line through it says 74 rows (32 calls) cannot fit either; near the floor the
    # next probe is 16 rows (the shortest chunk the cost model does not penalise), which
    # fits: shorter chunks (9 rows, 256 calls) are not estimated
    peaks = _through({209: (47.7, 52.7), 16: (28.2, 28.7), 10: (27.6, 28.5), 3: (27.4, 28.4),
                      2305: (297.3, 287.2)})
    calls = []

    def kib(c):
        calls.append(c)
        return tuple(int(v * 1024) for v in peaks(c))

    fit = fit_chunk(_cand(extent=2305), int(28.8 * 1024), kib, OPTS,
                    unchunked=(297 * 1024, 287 * 1024))
    assert fit.chunk == 16 and min(calls) == 16 and len(calls) == 2, calls


def test_fit_finds_the_fewest_calls_on_random_linear_models():
    # the guesses only choose where to look: on models linear in the rows held, the answer is
    # the fewest calls that fit (within the 10% tolerance on the number of calls), or the
    # floor's best effort, and never more estimates than allowed
    import random

    rng = random.Random(7)
    opts = OPTS
    for _ in range(300):
        extent = rng.choice([96, 1000, 2305, 4096, 65536])
        gran = rng.choice([1, 1, 8]) if extent % 8 == 0 else 1
        if extent == 65536:
            gran = 256
        peaks, full = _linear(rng.randint(0, 10**6), rng.randint(1, 1000), extent)
        budget = int(max(full) * rng.uniform(0.03, 0.9))
        calls = []
        fit = fit_chunk(_cand(extent=extent, gran=gran), budget,
                        lambda c: calls.append(c) or peaks(c), opts, unchunked=full)
        assert fit is not None and fit.evaluations == len(calls)
        assert len(calls) <= opts.max_evals_per_candidate
        assert fit.chunk % gran == 0
        best = _fewest_calls(extent, gran, budget, peaks)
        n = -(-extent // fit.chunk)
        if best is None or n > opts.max_calls:
            continue  # the floor: best effort, checked in test_fit_respects_granularity...
        assert max(peaks(fit.chunk)) <= budget, (extent, gran, budget, calls)
        assert best <= n <= best + max(1, int(opts.chunk_tolerance * n)), (extent, budget, calls)


def test_fit_drops_a_candidate_that_cannot_beat_the_best():
    opts = OPTS
    best = fit_chunk(_cand(), 6000, lambda c: 1000 + 10 * c, opts)
    # the same memory and cost (another seed of the same region): one evaluation, dropped
    calls = []
    got = fit_chunk(_cand(), 6000, lambda c: calls.append(c) or 1000 + 10 * c, opts, beat=best)
    assert got is None and calls == [best.chunk]
    # the same memory curve but cheaper (fewer ops): taken at that chunk, one evaluation
    calls = []
    got = fit_chunk(_cand(ops=5), 6000, lambda c: calls.append(c) or 1000 + 10 * c, opts,
                    beat=best)
    assert got is not None and got.chunk == best.chunk and got.cost < best.cost
    assert calls == [best.chunk]
    # less memory at that chunk: it may fit with fewer chunks, so it is fitted
    got = fit_chunk(_cand(), 6000, lambda c: 500 + 5 * c, opts, beat=best)
    assert got is not None and got.chunk > best.chunk and got.cost < best.cost


def test_fit_respects_granularity_and_floor():
    fit = fit_chunk(_cand(gran=16), 6000, lambda c: 1000 + 10 * c, OPTS)
    assert fit.chunk % 16 == 0
    # a floor above the budget: best effort near the floor, not chunk 1
    fit = fit_chunk(_cand(), 500, lambda c: 5000 + c, OPTS)
    assert fit.peak > 500 and fit.chunk > 1


def test_refit_bisects_the_halvings_while_the_plan_fits():
    cand, opts = _cand(extent=4096), SearchOptions(refit_evals=4, row_multiple=1)
    calls = []

    def plan_peak(c):  # the whole plan: 5000 bytes elsewhere + 10 per row of this stage
        calls.append(-(-4096 // c))
        return 5000 + 10 * c

    # 256 calls fit; so do 128 and 64 (chunks of 64: 5640); 32 calls (128 rows: 6280) do not.
    # Tried: half (128), the fewest (2), then the bisection of the halvings (16, then 64)
    fit = refit_calls(cand, 256, 6000, plan_peak, opts)
    assert (fit.chunk, fit.peak, fit.evaluations) == (64, 5640, 4) and calls == [128, 2, 16, 64]
    assert fit.cost < cand.cost(16, opts)
    calls.clear()
    # the fewest calls fit: two estimates
    fit = refit_calls(cand, 256, 10**6, plan_peak, opts)
    assert (fit.chunk, fit.evaluations) == (2048, 2) and calls == [128, 2]
    calls.clear()
    fit = refit_calls(cand, 256, 6000, plan_peak, SearchOptions(refit_evals=1, row_multiple=1))
    assert fit.chunk == 32 and calls == [128]  # the estimate limit
    calls.clear()
    # half the calls do not fit: one estimate, nothing found
    assert refit_calls(cand, 256, 5300, plan_peak, opts) is None and calls == [128]
    # a plan that cannot be applied at that chunk counts as not fitting
    assert refit_calls(cand, 256, 6000, lambda c: None, opts) is None
    assert refit_calls(cand, 3, 10**9, plan_peak, opts) is None  # 1 call is no chunking
    calls.clear()
    # off when refit_evals is 0
    assert refit_calls(cand, 256, 6000, plan_peak, SearchOptions(refit_evals=0)) is None
    assert not calls


def test_ranking_is_deterministic():
    a = Candidate("main", "a", "z", "x", 0, 64, 1, 5, 1000, 10)
    b = Candidate("main", "b", "z", "x", 0, 64, 1, 3, 1000, 10)
    c = Candidate("main", "c", "z", "x", 0, 64, 1, 3, 5000, 10)
    assert rank_candidates([a, b, c]) == [c, b, a]
    assert rank_candidates([c, a, b]) == [c, b, a]


def test_cost_model_defaults_are_the_recorded_llvm_calibration():
    """SearchOptions' cost constants are benchmarks/calibrate_cost.py's summary (committed:
    equal; after a new run of ``make bench`` on this kind of machine, within run-to-run
    spread, 30%): a calibration that moves them further must update them."""
    import json

    rows = (ROOT / "benchmarks/results/cost_calibration.jsonl").read_text().splitlines()
    summary = json.loads(rows[-1])
    assert summary["kind"] == "summary" and summary["target"] == "llvm"
    o = OPTS
    assert o.small_rows == summary["small_rows"]
    for k in ("call_overhead", "op_overhead", "reread_overhead", "small_penalty"):
        assert getattr(o, k) == pytest.approx(summary[k], rel=0.3), (
            f"SearchOptions.{k} = {getattr(o, k)}, the calibration measured {summary[k]}: "
            "update relay_passes/search.py (and README 'AutoChunk cost model')"
        )
    # the constants reproduce the measured per-chunk times of the calibration regions
    for label, per in summary["per_chunk_us"].items():
        assert summary["predicted_per_chunk_us"][label] == pytest.approx(per, rel=0.35, abs=0.5)


def test_cuda_cost_constants_are_the_recorded_gpu_calibration():
    """CUDA_COSTS are the summary of the H200 calibration (benchmarks/results/
    cost_calibration_cuda.jsonl, fitted by calibrate_cost.py --fit-timings from what
    run_gpu.py --calibration timed): a new GPU calibration must update them."""
    import json

    from relay_passes.search import CUDA_COSTS

    rows = (ROOT / "benchmarks/results/cost_calibration_cuda.jsonl").read_text().splitlines()
    summary = json.loads(rows[-1])
    assert summary["kind"] == "summary" and summary["target"] == "cuda"
    assert summary["gpu"].startswith("NVIDIA")
    for k, v in CUDA_COSTS.items():
        assert v == pytest.approx(summary[k], rel=0.05, abs=1e-4), (k, v, summary[k])
    timed = [json.loads(r) for r in rows[:-1]]
    # every chunked variant computed what the unchunked one did, on the GPU
    assert timed and max(r["max_rel_err"] for r in timed) <= 1e-5
    for label, per in summary["per_chunk_us"].items():
        assert summary["predicted_per_chunk_us"][label] == pytest.approx(per, rel=0.15)


def test_cost_constants_follow_the_target():
    from relay_passes.search import CUDA_COSTS

    cpu, gpu = SearchOptions.for_target(gpu=False), SearchOptions.for_target(gpu=True)
    assert cpu == SearchOptions()
    assert {k: getattr(gpu, k) for k in CUDA_COSTS} == CUDA_COSTS and gpu != cpu
    assert SearchOptions.for_target(True, max_stages=3).max_stages == 3
    c = Candidate("main", "a", "z", "x", 0, 1000, 1, 10, 0, 0, reread_bytes=64 * 1024)
    # 1000 rows in 4 calls; 10 ops; 64 KiB read whole by every chunk
    assert c.cost(250, cpu) == pytest.approx(4 * (cpu.call_overhead + 10 * cpu.op_overhead
                                                  + 64 * cpu.reread_overhead))
    assert c.cost(8, gpu) == pytest.approx(
        125 * gpu.small_penalty * (gpu.call_overhead + 10 * gpu.op_overhead
                                   + 64 * gpu.reread_overhead))


def test_chunks_are_moved_to_the_preferred_row_multiple_at_the_same_calls():
    # 22 calls over 2048 rows: 97 (odd) becomes 96; 5 calls over 1025: 205 (a divisor)
    # becomes 208 (204 would need 6 calls)
    assert chunk_for_calls(2048, 22) == 97 and chunk_for_calls(2048, 22, prefer=4) == 96
    assert chunk_for_calls(1025, 5) == 205 and chunk_for_calls(1025, 5, prefer=4) == 208
    # short chunks are left alone, and so is a chunk no multiple keeps at n calls
    assert chunk_for_calls(100, 8, prefer=4) == chunk_for_calls(100, 8) == 14
    assert chunk_for_calls(97, 6, prefer=4) == chunk_for_calls(97, 6) == 19  # 16: 7, 20: 5
    for extent in (97, 1025, 2048, 4099):
        for n in range(2, 40):
            for gran in (1, 2, 3):
                c0 = chunk_for_calls(extent, n, gran)
                c = chunk_for_calls(extent, n, gran, prefer=4)
                assert c % gran == 0 and -(-extent // c) == -(-extent // c0)
                assert c == c0 or c % (4 * gran // math.gcd(4, gran)) == 0
    # the search's default (CPU) prefers multiples of 4; fitted on the pool model
    fit = fit_chunk(_cand(extent=2048), 2000 + 10 * 200, lambda c: _pool_model(c, 2048),
                    SearchOptions())
    assert fit.chunk % 4 == 0 and max(_pool_model(fit.chunk, 2048)) <= 4000
    assert SearchOptions.for_target(gpu=True).row_multiple == 1


def test_balanced_option_makes_ceil_chunks():
    assert chunk_for_calls(4096, 12, balanced=True) == 342
    assert chunk_for_calls(4096, 16, balanced=True) == 256  # a divisor either way
    calls = []
    opts = SearchOptions(last_chunk="balanced", row_multiple=1)
    fit = fit_chunk(_cand(), 6000, lambda c: calls.append(c) or _pool_model(c), opts)
    assert all(c == -(-1024 // -(-1024 // c)) for c in calls), calls
    with pytest.raises(ValueError, match="last_chunk"):
        fit_chunk(_cand(), 6000, _pool_model, SearchOptions(last_chunk="tiny"))
    assert fit is not None


def test_smallest_chunk_probed_is_bounded_by_max_calls():
    # a floor search evaluates the smallest chunk: at most max_calls calls over the copies
    cand = Candidate("main", "a", "b", "x", 0, 4096, 1, 10, 100, 10, copies=(("c", "d", "y"),))
    calls = []
    opts = SearchOptions(max_calls=512, row_multiple=1)
    fit_chunk(cand, 10, lambda c: calls.append(c) or 10**6 + c, opts)
    assert min(calls) == 16  # 4096 rows x 2 regions / 512 calls
