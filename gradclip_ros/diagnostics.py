"""Rolling latency percentiles and event rates for node diagnostics, free of ROS.

Both classes are thread-safe: a worker thread adds samples while a timer thread reads them.
Times are seconds from ``time.monotonic()`` unless a caller passes its own ``now``.
"""

import collections
import math
import threading
import time
from typing import Dict, Optional, Sequence

import numpy as np


class RollingPercentiles:
    """Percentiles over the newest samples, bounded by count and optionally by age.

    ``capacity`` caps the number of samples kept. With ``max_age_s``, samples older than that
    many seconds are left out, so a value that stopped arriving does not show stale figures.
    """

    def __init__(self, capacity: int = 1024, max_age_s: Optional[float] = None):
        if capacity < 1:
            raise ValueError(f'capacity must be >= 1, got {capacity}')
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f'max_age_s must be > 0 or None, got {max_age_s}')
        self.capacity = int(capacity)
        self.max_age_s = max_age_s
        self._samples = collections.deque(maxlen=self.capacity)
        self._lock = threading.Lock()

    def add(self, value: float, now: Optional[float] = None) -> None:
        """Store one sample taken at ``now`` (default: ``time.monotonic()``)."""
        stamp = time.monotonic() if now is None else now
        with self._lock:
            self._samples.append((stamp, float(value)))

    def values(self, now: Optional[float] = None) -> np.ndarray:
        """Return the samples in the window, oldest first, as float64 [N]."""
        with self._lock:
            samples = list(self._samples)
        if self.max_age_s is not None:
            oldest = (time.monotonic() if now is None else now) - self.max_age_s
            samples = [sample for sample in samples if sample[0] >= oldest]
        return np.array([value for _, value in samples], dtype=np.float64)

    def percentiles(self, quantiles: Sequence[float] = (50, 95, 99),
                    now: Optional[float] = None) -> Dict[float, float]:
        """Return {quantile: value} (quantiles in percent); NaN values when the window is empty.

        Uses numpy's default linear interpolation between the closest ranks.
        """
        values = self.values(now)
        if values.size == 0:
            return {quantile: math.nan for quantile in quantiles}
        results = np.percentile(values, list(quantiles))
        return {quantile: float(result) for quantile, result in zip(quantiles, results)}

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)


class RateMeter:
    """Events per second over a sliding window, plus the total count since creation.

    ``start`` is the creation time on the same clock as the ``now`` arguments (default:
    ``time.monotonic()``).
    """

    def __init__(self, window_s: float = 5.0, start: Optional[float] = None):
        if window_s <= 0:
            raise ValueError(f'window_s must be > 0 seconds, got {window_s}')
        self.window_s = float(window_s)
        self.total = 0
        self._created = time.monotonic() if start is None else start
        self._events = collections.deque()
        self._lock = threading.Lock()

    def tick(self, count: int = 1, now: Optional[float] = None) -> None:
        """Record ``count`` events at ``now`` (default: ``time.monotonic()``)."""
        stamp = time.monotonic() if now is None else now
        with self._lock:
            self.total += count
            self._events.append((stamp, count))
            self._expire(stamp)

    def rate(self, now: Optional[float] = None) -> float:
        """Return events per second over the last ``window_s`` seconds.

        Before a full window has passed since creation, the rate is taken over the time since
        creation, so a meter read right after start does not under-report by the missing part.
        """
        stamp = time.monotonic() if now is None else now
        with self._lock:
            self._expire(stamp)
            count = sum(events for _, events in self._events)
        span = min(self.window_s, stamp - self._created)
        if span <= 0:
            return 0.0
        return count / span

    def _expire(self, now: float) -> None:
        oldest = now - self.window_s
        while self._events and self._events[0][0] < oldest:
            self._events.popleft()
