"""Data health: how many samples were seen and how many were bad, and when that is too many.

The rule is checked once at least 1 / max_bad_fraction samples were seen (so a single bad
sample early on never stops a run by itself); with max_bad_fraction = 0 any bad sample stops it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class DataHealth:
    max_bad_fraction: float
    seen: int = 0
    bad: int = 0

    def add(self, *, seen: float, bad: float) -> None:
        self.seen += int(seen)
        self.bad += int(bad)

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def exceeded(self) -> bool:
        if self.max_bad_fraction == 0:
            return self.bad > 0
        return self.seen >= math.ceil(1 / self.max_bad_fraction) and self.fraction > self.max_bad_fraction

    def state(self) -> dict[str, int]:
        return {"seen": self.seen, "bad": self.bad}
