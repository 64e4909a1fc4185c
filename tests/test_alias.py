"""relay_passes.alias: which region input a chunk loop may overwrite with a region output
(``reusable_inputs``): a dead seed read back by a residual add is reused; a parameter, a tensor
(or a view of it) read after the region, a tensor every chunk reads whole, and one written at
other rows are not. Every case checks numerics against the unchunked module, so a wrong reuse
(a chunk overwriting rows another chunk still reads) fails even where the analysis claims it
is safe (the modules are ``_helpers.INPLACE_CASES``)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import INPLACE_CASES as CASES
from _helpers import run_llvm as _run  # build for llvm, run main, return the first output

from relay_passes.alias import reusable_inputs
from relay_passes.chunk_region import analyze_region
from relay_passes.plan import ChunkPlan, ChunkRegion
from relay_passes.rewrite import _region_inputs as region_inputs
from relay_passes.rewrite import apply_chunk_plan


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [2, 3])
def test_reuse_decision_and_numerics(case, chunk):
    mod, (start, end, seed, dim), want = CASES[case]
    ra = analyze_region(mod, start, end, seed, dim)
    assert ra.legal, ra.reason
    got = reusable_inputs(mod, ra, region_inputs(mod["main"], ra))
    assert {k: str(v.name) for k, v in got.items()} == want
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
            for p in mod["main"].params]
    plan = ChunkPlan((ChunkRegion(start, end, seed, dim, chunk),))
    after = apply_chunk_plan(mod, plan)
    np.testing.assert_allclose(_run(after, args), _run(mod, args), rtol=1e-5, atol=1e-6)
    fresh = "R.builtin.alloc_tensor" in after["main"].script()
    assert fresh == (not want), "a reused buffer needs no fresh allocation"
