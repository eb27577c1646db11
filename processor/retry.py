"""Bounded exponential backoff for infrastructure failures: retry while the worker keeps polling, give up after
INFRASTRUCTURE_RETRY_TIMEOUT_S (then the worker exits with the failure's documented code)."""

from __future__ import annotations

import time
from typing import Callable


class Backoff:
    def __init__(self, *, give_up_after_s: float, first_s: float = 0.5, max_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.give_up_after_s = give_up_after_s
        self.first_s = first_s
        self.max_s = max_s
        self._clock = clock
        self.failing_since: float | None = None
        self.attempts = 0
        self.next_at = 0.0

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def failed(self) -> bool:
        """Record a failure; False once the failures have lasted longer than the budget (time to give up)."""
        now = self._clock()
        if self.failing_since is None:
            self.failing_since = now
        self.attempts += 1
        self.next_at = now + min(self.max_s, self.first_s * 2 ** (self.attempts - 1))
        return now - self.failing_since <= self.give_up_after_s

    def due(self) -> bool:
        return self._clock() >= self.next_at

    def succeeded(self) -> None:
        self.failing_since = None
        self.attempts = 0
        self.next_at = 0.0

    def failing_for(self) -> float:
        return 0.0 if self.failing_since is None else self._clock() - self.failing_since
