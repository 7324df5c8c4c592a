"""The enforcer's global event budget: what keeps the ring from filling when a guest storms.

Per-rule rate limits (`limit N per second then ACTION`) bound what one rule costs; a storm that
spreads over many rules, or over events no rule limits, still fills the ring, and a full ring stops
every vCPU that traps until a slot frees (Xen's `vm_event_wait_slot`: the `ring_full` stall). The
budget is one token bucket over every event the enforcer answers (capacity `per_second`, refilled
at `per_second` tokens a second). Within it, events are decided in full. Past it they are answered
the cheap way and counted (`over`), as `over_budget` says:

* `then` (the default, chosen for security): each matching rule acts as if past its own rate
  limit: its `then` runs where it has one; a rule without one keeps its verdict (a deny stays a
  deny) and drops its actions (messages, pause, disarm). Every event still gets its record.
* `allow`: every event past the budget is answered allow (recorded as would-deny where the policy
  denies): availability over protection, for a guest that must never be slowed.

Per event: the decision engine takes a token for each request before deciding it
(`DecisionEngine.decide`; the native engine in C, `native/decide.c`, with the same arithmetic on
a copy of this bucket, copied back after each native call), and decides one that finds no whole
token past the budget. `Budget.take(n)` says how many of the next `n` events fit.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["Budget", "OVER_BUDGET_MODES"]

OVER_BUDGET_MODES = ("then", "allow")


class Budget:
    """A token bucket over every event (module docstring)."""

    def __init__(self, per_second: float, clock: Callable[[], float], *, over_budget: str = "then") -> None:
        if per_second <= 0:
            raise ValueError("a budget is a positive number of events per second")
        if over_budget not in OVER_BUDGET_MODES:
            raise ValueError(f"over_budget: one of {', '.join(OVER_BUDGET_MODES)}")
        self.per_second = float(per_second)
        self.over_budget = over_budget
        self.clock = clock
        self.tokens = self.per_second
        self.stamp = clock()
        self.over = 0                  # events answered past the budget

    def take(self, n: int) -> int:
        """How many of the next `n` events are within the budget (those tokens are spent)."""
        self._refill()
        fit = min(n, int(self.tokens))
        self.tokens -= fit
        self.over += n - fit
        return fit

    def describe(self) -> str:
        how = "answered by their rules' then (a rule without one kept its verdict)" if self.over_budget == "then" \
            else "answered allow (--over-budget allow)"
        return f"budget {self.per_second:g} events/s: {self.over} event(s) past it, {how}"

    def _refill(self) -> None:
        now = self.clock()
        if now > self.stamp:
            self.tokens = min(self.per_second, self.tokens + (now - self.stamp) * self.per_second)
            self.stamp = now
