"""Pair camera images with their label sets by header stamp, per camera, in bounded buffers.

ROS-free: the online-learning node feeds it messages with their stamps, and it returns each
image/labels pair once both halves have arrived. Arrival order does not matter. A message that
finds no partner waits in a bounded per-camera, per-kind buffer until it is paired, pushed
out by a newer one (counted as overflow) or expires after ``max_wait_s`` of arrival time
(counted as expired). Cameras never pair across each other.
"""

import collections
from dataclasses import dataclass
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional

KINDS = ('image', 'labels')


@dataclass
class Pair:
    """An image and the label set stamped within the tolerance of it, from one camera."""

    camera: str
    image_stamp_ns: int
    labels_stamp_ns: int
    image: Any
    labels: Any


@dataclass
class _Pending:
    stamp_ns: int
    arrival_ns: int
    payload: Any


class StampPairer:
    """Match images and labels of each camera whose stamps differ by at most a tolerance.

    ``tolerance_s`` is the largest stamp difference in seconds that still pairs; when several
    waiting messages are within it, the closest stamp wins. ``max_pending`` bounds each
    camera's buffer of each kind. ``max_wait_s`` is measured on ``clock_ns`` (monotonic by
    default), not on the header stamps, so replayed bags with old stamps still expire. Safe to
    call from several threads.
    """

    def __init__(self, tolerance_s: float = 0.01, max_pending: int = 10, max_wait_s: float = 2.0,
                 clock_ns: Callable[[], int] = time.monotonic_ns):
        if not tolerance_s >= 0.0:
            raise ValueError(f'tolerance_s must be >= 0 seconds, got {tolerance_s}')
        if int(max_pending) < 1:
            raise ValueError(f'max_pending must be >= 1, got {max_pending}')
        if not max_wait_s > 0.0:
            raise ValueError(f'max_wait_s must be > 0 seconds, got {max_wait_s}')
        self.tolerance_ns = int(round(tolerance_s * 1e9))
        self.max_pending = int(max_pending)
        self.max_wait_ns = int(round(max_wait_s * 1e9))
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        # camera -> kind -> waiting messages in arrival order.
        self._pending: Dict[str, Dict[str, Deque[_Pending]]] = {}
        self.counters = collections.Counter({
            'pairs': 0, 'expired_image': 0, 'expired_labels': 0,
            'overflow_image': 0, 'overflow_labels': 0})

    def add_image(self, camera: str, stamp_ns: int, image: Any) -> Optional[Pair]:
        """Offer an image; returns the pair when labels with a close stamp were waiting."""
        return self._add(camera, 'image', int(stamp_ns), image)

    def add_labels(self, camera: str, stamp_ns: int, labels: Any) -> Optional[Pair]:
        """Offer a label set; returns the pair when an image with a close stamp was waiting."""
        return self._add(camera, 'labels', int(stamp_ns), labels)

    def expire(self) -> int:
        """Drop every message that waited longer than ``max_wait_s``; returns how many."""
        with self._lock:
            return self._expire_locked(self._clock_ns())

    def pending(self) -> Dict[str, int]:
        """Return the number of waiting messages per kind, summed over cameras."""
        with self._lock:
            totals = dict.fromkeys(KINDS, 0)
            for buffers in self._pending.values():
                for kind in KINDS:
                    totals[kind] += len(buffers[kind])
            return totals

    def _add(self, camera: str, kind: str, stamp_ns: int, payload: Any) -> Optional[Pair]:
        other_kind = 'labels' if kind == 'image' else 'image'
        with self._lock:
            now_ns = self._clock_ns()
            self._expire_locked(now_ns)
            buffers = self._pending.setdefault(
                camera, {name: collections.deque() for name in KINDS})

            # Closest waiting partner within the tolerance, if any.
            best = None
            for candidate in buffers[other_kind]:
                distance = abs(candidate.stamp_ns - stamp_ns)
                if distance <= self.tolerance_ns and (
                        best is None or distance < abs(best.stamp_ns - stamp_ns)):
                    best = candidate
            if best is not None:
                buffers[other_kind].remove(best)
                self.counters['pairs'] += 1
                if kind == 'image':
                    return Pair(camera, stamp_ns, best.stamp_ns, payload, best.payload)
                return Pair(camera, best.stamp_ns, stamp_ns, best.payload, payload)

            waiting = buffers[kind]
            if len(waiting) >= self.max_pending:
                waiting.popleft()
                self.counters[f'overflow_{kind}'] += 1
            waiting.append(_Pending(stamp_ns, now_ns, payload))
            return None

    def _expire_locked(self, now_ns: int) -> int:
        expired = 0
        for buffers in self._pending.values():
            for kind in KINDS:
                waiting = buffers[kind]
                while waiting and now_ns - waiting[0].arrival_ns > self.max_wait_ns:
                    waiting.popleft()
                    self.counters[f'expired_{kind}'] += 1
                    expired += 1
        return expired
