"""benchmarks.adamw_choice: the three AdamW schedules make the same update, and each is timed."""
from benchmarks.adamw_choice import VARIANTS, run


def test_adamw_variants_agree_and_are_timed():
    rep = run(rounds=3)
    assert set(rep["median_ms"]) == set(VARIANTS)
    assert all(v > 0 for v in rep["median_ms"].values())
    assert rep["over_fused_median"]["fused"] == 1.0
    assert rep["max_weight_change_fused"] > 1e-5  # the steps moved the weights (every parameter had a gradient)
    assert all(d <= 1e-6 for d in rep["max_weight_diff_vs_fused"].values())  # the same update, to rounding
