"""When the supervisor restarts a crashed stage process, and when it gives up on one.

Pure: the caller passes the clock's reading and a random draw; nothing here sleeps,
reads the time or starts a process. A process may crash ``budget`` times within a
sliding window of ``window_s`` seconds; one crash more and it is failed (left stopped,
the other stages keep running). Within the budget, the first crash in the window is
restarted at once, each further one after a wait that doubles, up to a cap, scaled by
a random factor so that processes that crashed together do not restart together.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kllm.core.errors import ConfigError


@dataclass(frozen=True)
class RestartPolicy:
    budget: int = 5
    """Crashes a process may have within ``window_s``; the next one fails it."""
    window_s: float = 300.0
    backoff_s: float = 1.0
    """The wait before the second restart in the window; doubled for each crash after."""
    backoff_max_s: float = 60.0
    jitter: float = 0.25
    """Each wait is scaled by a factor drawn from [1 - jitter, 1 + jitter]."""

    def __post_init__(self) -> None:
        if self.budget < 0 or self.window_s <= 0:
            raise ConfigError(
                f"restart budget wants budget >= 0 and window > 0 s, got {self.budget} "
                f"in {self.window_s} s"
            )
        if not 0 <= self.backoff_s <= self.backoff_max_s or not 0 <= self.jitter < 1:
            raise ConfigError(
                f"restart backoff wants 0 <= backoff ({self.backoff_s}) <= max "
                f"({self.backoff_max_s}) and 0 <= jitter ({self.jitter}) < 1"
            )

    def delay_s(self, crashes: int, draw: float) -> float:
        """The wait before restarting after the ``crashes``-th crash in the window
        (``draw`` in [0, 1)). The first restarts at once: a process that served for a
        while and crashed once is replaced without delay."""
        if crashes <= 1:
            return 0.0
        base = min(self.backoff_max_s, self.backoff_s * 2.0 ** (crashes - 2))
        factor = 1.0 - self.jitter + 2.0 * self.jitter * draw
        return min(self.backoff_max_s, base * factor)


@dataclass(frozen=True)
class Verdict:
    """What to do about one crash."""

    crashes: int
    """Crashes within the window, this one included."""
    failed: bool
    """Over the budget: do not restart."""
    delay_s: float
    """When not failed: how long to wait before restarting."""


class CrashBudget:
    """One process's crashes within the sliding window, and what each one means."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._at: deque[float] = deque()

    def crashed(self, now: float, draw: float) -> Verdict:
        """Record a crash at ``now`` (a monotonic clock's seconds)."""
        self._at.append(now)
        crashes = self.in_window(now)
        if crashes > self.policy.budget:
            return Verdict(crashes, failed=True, delay_s=0.0)
        return Verdict(crashes, failed=False, delay_s=self.policy.delay_s(crashes, draw))

    def in_window(self, now: float) -> int:
        """Crashes within the window that ends at ``now``."""
        while self._at and self._at[0] <= now - self.policy.window_s:
            self._at.popleft()
        return len(self._at)

    def reset(self) -> None:
        """Forget every crash (an operator revived the process)."""
        self._at.clear()
