"""The sweep's recommendation rule, a pure function of the runs' summaries.

    recommended = the largest value v (numeric order) with reward_final(v) >= reward_final(baseline) - tolerance

where the baseline is the on-policy value 0 for `controller.max_staleness` and otherwise the first value
listed; values that are not all numbers have no "largest", so the fastest (samples/s) within tolerance
is recommended instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from areal_py.telemetry.run_summary import RunSummary


def number(v: str) -> float | None:
    """The value as a number, or None (then the grid has no numeric order)."""
    try:
        return float(v)
    except ValueError:
        return None


@dataclass(frozen=True)
class Recommendation:
    key: str
    value: str
    rule: str  # "largest" (numeric values) or "fastest" (others)
    baseline: str
    baseline_reward: float
    tolerance: float
    within: list[str]   # in value order (numeric if the values are numbers)
    outside: list[str]
    fastest_within: str

    def text(self, summaries: dict[str, RunSummary]) -> str:
        """The recommendation and every number it rests on."""
        k, s, b = self.key, summaries, summaries[self.baseline]
        r, f = s[self.value], s[self.fastest_within]

        def lst(vs: list[str]) -> str:
            return ", ".join(f"{v} ({s[v].reward_final:.3f})" for v in vs) or "none"
        why = "the largest value" if self.rule == "largest" else "the fastest value"
        noise = max(x.reward_final_sem for x in s.values())
        lines = [
            (f"baseline {k}={self.baseline}: final reward {self.baseline_reward:.3f} (mean of its last {b.window} "
            f"steps), {b.samples_per_s:.1f} samples/s"),
            (f"final reward within {self.tolerance:g} of it (>= {self.baseline_reward - self.tolerance:.3f}): "
            f"{lst(self.within)}; outside: {lst(self.outside)}"),
            (f"recommended: {k}={self.value}, {why} within tolerance: final reward {r.reward_final:.3f} "
            f"({r.reward_final - self.baseline_reward:+.3f} vs baseline), {r.samples_per_s:.1f} samples/s "
            f"({r.samples_per_s / b.samples_per_s:.2f}x the baseline)"),
            (f"highest throughput within tolerance: {k}={self.fastest_within} ({f.samples_per_s:.1f} samples/s, "
            f"{f.trained_tokens_per_s:.0f} trained tokens/s)"),
        ]
        skipped = [v for v in self.outside if self.rule == "largest" and (number(v) or 0.0) < (number(self.value) or 0.0)]
        if skipped:
            lines.append(f"note: {', '.join(skipped)} {'is' if len(skipped) == 1 else 'are'} smaller than "
                         f"{self.value} yet outside tolerance: reward is not monotone in {k} here, likely noise")
        if noise > 0 and self.tolerance < 2 * noise:
            lines.append(f"caution: a final reward's standard error is up to {noise:.3f}, so differences under "
                         f"{2 * noise:.3f} are noise; run more steps (no --quick) before trusting the choice")
        return "\n".join(lines)


def baseline_of(key: str, values: list[str]) -> str:
    """On-policy (0) for the staleness bound, else the first value listed."""
    if key == "controller.max_staleness":
        zero = [v for v in values if number(v) == 0]
        if zero:
            return zero[0]
    return values[0]


def recommend(key: str, summaries: dict[str, RunSummary], tolerance: float,
              values: list[str] | None = None) -> Recommendation | None:
    """The largest value (numeric order; the fastest if values are not all numbers) whose final reward is at least
    the baseline's minus `tolerance`. `values` is the grid as listed (default: the summaries' order); None if the
    baseline run has no summary (it failed)."""
    values = values or list(summaries)
    if not values:
        return None
    baseline = baseline_of(key, values)
    if baseline not in summaries:
        return None
    base = summaries[baseline].reward_final
    done = [v for v in values if v in summaries]
    nums = [number(v) for v in done]
    numeric = all(n is not None for n in nums)
    if numeric:
        done = [v for _, v in sorted(zip(nums, done))]
    within = [v for v in done if summaries[v].reward_final >= base - tolerance - 1e-12]
    outside = [v for v in done if v not in within]
    fastest = max(within, key=lambda v: summaries[v].samples_per_s)
    return Recommendation(key, within[-1] if numeric else fastest, "largest" if numeric else "fastest", baseline,
                          base, tolerance, within, outside, fastest)


