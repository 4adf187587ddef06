"""What one forward costs a replica, as a line: a fixed part (kernel launches, copies, Python) plus a part per
padded token, fitted at warm-up from two timed forwards of very different sizes. Plain numbers, no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardCost:
    fixed_s: float
    per_token_s: float

    def seconds(self, padded_tokens: int) -> float:
        return self.fixed_s + self.per_token_s * padded_tokens

    @property
    def fixed_tokens(self) -> int:
        """The fixed part in tokens: what one more forward is worth when the planner weighs it against
        padding (its group_cost_tokens)."""
        return max(0, round(self.fixed_s / self.per_token_s))

    def tokens_within(self, seconds: float) -> int:
        """The most padded tokens one forward may hold and still end within `seconds` (at least 1)."""
        return max(1, int((seconds - self.fixed_s) / self.per_token_s + 1e-6))  # 1e-6: float noise, not a token

    def describe(self) -> str:
        return f"{self.fixed_s * 1e3:.2f} ms + {self.per_token_s * 1e6:.3f} us per padded token"


def fit_forward_cost(timings: list[tuple[int, float]]) -> ForwardCost | None:
    """The line through (padded tokens, seconds) timings of the smallest and the largest forward; None where
    they give no line with a positive slope (one size only, or the larger forward was not slower: noise)."""
    if len(timings) < 2:
        return None
    (small, t_small), (large, t_large) = min(timings), max(timings)
    if large <= small or t_large <= t_small:
        return None
    per_token = (t_large - t_small) / (large - small)
    return ForwardCost(fixed_s=max(0.0, t_small - per_token * small), per_token_s=per_token)


def capped_budget(budget: int, cost: ForwardCost | None, max_forward_ms: float | None,
                  floor: int) -> tuple[int, str | None]:
    """`budget` lowered so that one forward ends within `max_forward_ms` by the warm-up's line, never below
    `floor` (one input of the model's maximum length must still fit); the reason when it was lowered."""
    if cost is None or max_forward_ms is None:
        return budget, None
    cap = max(floor, cost.tokens_within(max_forward_ms / 1000.0))
    if cap >= budget:
        return budget, None
    return cap, (f"max_forward_ms {max_forward_ms:g}: a forward costs {cost.describe()} (warm-up), "
                 f"{cap} tokens end within it")
