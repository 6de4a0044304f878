"""A limit on failed admin-token attempts per remote address.

The admin token guards the whole REST API, and an operator may have chosen a short
one (``--admin-token`` needs only 16 characters), so guesses must not come at the
speed of the network.  Each address (IPv6: its /64, the rate limiter's
``client_key``) may fail ``limit`` times within any ``window`` seconds; while it has,
every ``/api/`` request from it is answered 429 with ``Retry-After`` (the seconds
until its oldest failure leaves the window) without looking at the token, so a
lock-out is no oracle for further guesses.  A request carrying the right token is
never counted; one carrying no ``Authorization`` header at all is answered 401 and
not counted either (it guesses nothing).

Memory is bounded: at most ``max_tracked`` addresses are remembered (least recently
failed first out); forgetting one forgets at most a partial lock-out.

Sans-IO: callers pass the current time; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

#: failed attempts an address may make within the window (``--admin-auth-failures``)
DEFAULT_LIMIT = 10
#: the window, in seconds
DEFAULT_WINDOW = 60.0
#: addresses remembered at once
MAX_TRACKED = 10_000


class AuthFailures:
    """Failed authentications per address in a sliding window."""

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        window: float = DEFAULT_WINDOW,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not window > 0:
            raise ValueError("window must be > 0 seconds")
        self.limit = limit
        self.window = window
        self.max_tracked = max(1, max_tracked)
        #: address -> times of its last ``limit`` failures, oldest first
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, key: str, now: float) -> int:
        """0 if ``key`` may try now, else the whole seconds (>= 1) until it may."""
        times = self._failures.get(key)
        if times is None:
            return 0
        while times and now - times[0] >= self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        if len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[0] + self.window - now))

    def failed(self, key: str, now: float) -> int:
        """Count one failure; returns :meth:`retry_after` as it stands after it."""
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=self.limit)
            while len(self._failures) > self.max_tracked:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        times.append(now)
        return self.retry_after(key, now)

    def __len__(self) -> int:
        return len(self._failures)
