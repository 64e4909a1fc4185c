"""relay_passes.stage_search: the stage search over a synthetic problem (no TVM).

The problem is two regions over 64 rows: region A holds 5000 bytes unchunked, B 3000, on top
of 1000 that no chunking lowers; a region chunked by c rows holds its bytes x c / 64. The
search must chunk both to meet a target of 3000 (A alone reaches at best 4078).
"""

from __future__ import annotations

import pytest

from relay_passes.search import Candidate, SearchOptions
from relay_passes.stage_search import State, search_stages

EXTENT = 64
BYTES = {"A": 5000, "B": 3000}


def _cand(name: str, body: int) -> Candidate:
    return Candidate("main", name, name, "x", 0, EXTENT, 1, 4, body, 10)


class Synthetic:
    def __init__(self, target: int, regions=("A", "B")):
        self.target = target
        self.cands = {n: _cand(n, BYTES[n]) for n in regions}
        self.children = 0

    def state(self, chunks: frozenset) -> State:
        held = dict(chunks)
        need = 1000 + sum(b * held.get(n, EXTENT) // EXTENT for n, b in BYTES.items())
        return State(need, need, need, max(0, need - self.target), False, chunks, None)

    def candidates(self, st):
        done = {n for n, _ in st.module}
        ranked = [c for n, c in sorted(self.cands.items()) if n not in done]
        return ranked, ([] if ranked else ["every region is chunked"]), "hot"

    def child(self, st, cand, chunk):
        self.children += 1
        return self.state(st.module | {(cand.start, chunk)})

    def skip(self, st, cand, best, fit, over):
        return False

    def with_regions(self, regions):
        return self.state(frozenset((r.start, r.chunk) for r in regions))


def test_two_stages_meet_a_target_neither_region_meets_alone():
    p = Synthetic(3000)
    out = search_stages(p, p.state(frozenset()), 3000, SearchOptions(time_limit_s=60))
    assert out.state.need <= 3000
    assert [s.region.start for s in out.stages] == ["A", "B"]
    assert out.stages[0].peak_before == 9000 and out.stages[-1].peak_after == out.state.need
    assert out.blockers == ()
    # the last stage takes the fewest calls that fit: with A as chosen, B in one call misses
    held = dict(out.state.module)
    assert out.stages[-1].n_chunks == 2
    assert p.state(frozenset({("A", held["A"])})).need > 3000


def test_a_target_out_of_reach_returns_the_lowest_peak_and_why():
    p = Synthetic(1000)
    out = search_stages(p, p.state(frozenset()), 1000, SearchOptions(time_limit_s=60))
    assert 1000 < out.state.need < 9000
    assert out.blockers and "no chunkable region around 'hot'" in out.blockers[-1]


def test_a_problem_without_candidates_is_stuck_at_the_start():
    p = Synthetic(3000, regions=())
    start = p.state(frozenset())
    out = search_stages(p, start, 3000, SearchOptions(time_limit_s=60))
    assert out.state is start and out.stages == ()
    assert out.blockers == ("no chunkable region around 'hot' (every region is chunked)",)
    assert p.children == 0


@pytest.mark.parametrize("stages", [1, 2])
def test_max_stages_bounds_the_search(stages):
    p = Synthetic(3000)
    out = search_stages(
        p, p.state(frozenset()), 3000, SearchOptions(max_stages=stages, time_limit_s=60)
    )
    assert len(out.stages) <= stages
    assert (out.state.need <= 3000) == (stages == 2)
