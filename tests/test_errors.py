"""relay_passes.errors: a refusal's message is written once, from its fields."""

from __future__ import annotations

import pytest

from relay_passes.errors import AutochunkError, BudgetInfeasibleError

MIB = 2**20


def test_a_search_refusal_says_the_numbers_the_site_the_blockers_and_the_remedy():
    e = BudgetInfeasibleError(
        budget=10 * MIB, unchunked_peak=100 * MIB, best_peak=20 * MIB, min_budget=21 * MIB,
        stages=2, peak_site="'lv3' (matmul)", blockers=("no chunkable region around 'lv9'",),
    )
    msg = str(e)
    assert msg.startswith(f"cannot fit the budget of 10.00 MiB ({10 * MIB} bytes): ")
    assert "the unchunked module needs 100.00 MiB" in msg
    assert f"the smallest peak reached is 20.00 MiB ({20 * MIB} bytes) after 2 chunk" in msg
    assert "the peak is now after binding 'lv3' (matmul)" in msg
    assert "Blocked by: no chunkable region around 'lv9'." in msg
    assert msg.endswith(f"Remedy: raise the budget to at least {21 * MIB} bytes, or shorten "
                        "the input.")
    assert isinstance(e, AutochunkError)


def test_a_floor_replaces_the_generic_remedy_and_a_confirmed_minimum_says_why():
    e = BudgetInfeasibleError(
        budget=1000, unchunked_peak=5000, best_peak=4000, min_budget=4200,
        floor="No chunking can help here: of the smallest peak, ...",
        remedies=("return smaller outputs",), aimed=(4100, 4150), gpu=True,
    )
    msg = str(e)
    assert "nothing left to chunk. No chunking can help here: of the smallest peak" in msg
    assert ("at least 4200 bytes (the search is greedy and its path depends on the budget: "
            "aiming at 4100 bytes it reaches only 4150 bytes), or return smaller outputs.") in msg
    assert "shorten the input" not in msg
    assert msg.endswith("count in whole 2 MiB pages.)")


def test_a_plan_refusal_lists_the_plan():
    e = BudgetInfeasibleError(
        budget=MIB, planned_peak=2 * MIB, plan_parts={"storage": MIB, "kernel workspace": MIB}
    )
    assert str(e) == (
        f"TVM's memory plan needs 2.00 MiB ({2 * MIB} bytes) per call, over the budget of "
        f"1.00 MiB ({MIB} bytes): storage 1.00 MiB, kernel workspace 1.00 MiB. Remedy: raise "
        "the budget."
    )


def test_fields_round_trip_and_a_bare_message_is_kept():
    e = BudgetInfeasibleError(budget=5, unchunked_peak=9, best_peak=7, min_budget=8)
    again = BudgetInfeasibleError(**e.fields())
    assert str(again) == str(e) and again.fields() == e.fields()
    # what TVM's FFI rebuilds from the text: the message, no fields
    bare = BudgetInfeasibleError(str(e))
    assert str(bare) == str(e) and bare.best_peak is None
    with pytest.raises(BudgetInfeasibleError, match="cannot fit the budget of 5 B"):
        raise e
