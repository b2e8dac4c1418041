"""A warning that says itself at most once every few seconds (per process,
per place): a cache or a proxy that is down must not flood the log."""

from __future__ import annotations

import threading
import time


class Every:
    """``due()`` is true at most once every `seconds`."""

    __slots__ = ("seconds", "_last", "_lock")

    def __init__(self, seconds: float = 10.0):
        self.seconds = seconds
        self._last: float | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self.seconds:
                return False
            self._last = now
            return True

    def reset(self) -> None:
        """The next ``due()`` is true (tests)."""
        with self._lock:
            self._last = None
