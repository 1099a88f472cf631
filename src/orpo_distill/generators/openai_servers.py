"""The server side of the OpenAI-compatible generator: base URLs, the API key, retry backoff, and the
pool that spreads calls over several servers and rests a failing one."""

from __future__ import annotations

import math
import os
import random
import threading
import time
from typing import Callable

from ..errors import UserError


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in its seconds form; ``None`` when absent or a date."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def backoff_delay(
    attempt: int, base: float, cap: float, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Delay before retry number ``attempt`` (0-based): ``base * 2**attempt`` with jitter, capped.

    The jitter (a factor in [0.5, 1]) keeps many workers that failed together from retrying together.
    A server's ``Retry-After`` is a floor, but never beyond ``cap``: a server asking for an hour must
    not stall the run.
    """
    rng = rng or random
    delay = min(cap, base * (2.0 ** min(attempt, 60))) * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(cap, delay)


def normalize_base_urls(base_url: str | list[str] | None) -> list[str]:
    """The configured base URL(s) as a non-empty list without trailing slashes."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url or [])
    if not urls:
        raise UserError("generator.base_url: needs at least one URL such as http://localhost:8000/v1")
    for u in urls:
        if not isinstance(u, str) or not u.startswith(("http://", "https://")):
            raise UserError(f"generator.base_url: {u!r} is not an http:// or https:// URL")
    return [u.rstrip("/") for u in urls]


def read_api_key(env_name: str | None) -> str | None:
    """The key from the environment variable ``env_name`` (``None`` when no variable is named)."""
    if not env_name:
        return None
    key = (os.environ.get(env_name) or "").strip()  # a key read from a .env file often ends in a newline
    if not key:
        raise UserError(
            f"generator.api_key_env: the environment variable {env_name} is not set or empty; "
            f"export it with the API key, or remove api_key_env for a server without keys"
        )
    if not key.isascii() or not key.isprintable():
        # an HTTP header cannot carry it, and the library's error would quote it
        raise UserError(f"generator.api_key_env: the value of {env_name} has characters an HTTP header cannot carry")
    return key


class ServerPool:
    """Round-robin over base URLs; a failing server sits out a cool-down, then is tried again.

    The cool-down doubles with each consecutive failure of that server (``base``, ``2 base``, ...,
    capped at ``cap``) and is at least what its ``Retry-After`` asked for; a success clears it. When
    every server is cooling down, the one that comes back first is used rather than stalling.
    """

    def __init__(self, urls: list[str], base: float, cap: float, clock: Callable[[], float] = time.monotonic):
        self.urls = list(urls)
        self._base, self._cap, self._clock = base, cap, clock
        self._failures = {u: 0 for u in self.urls}
        self._until = {u: 0.0 for u in self.urls}
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            now = self._clock()
            n = len(self.urls)
            order = [self.urls[(self._next + i) % n] for i in range(n)]
            chosen = next((u for u in order if self._until[u] <= now), None)
            if chosen is None:
                chosen = min(order, key=lambda u: self._until[u])
            self._next = (self.urls.index(chosen) + 1) % n
            return chosen

    def mark_failed(self, url: str, at_least: float = 0.0) -> None:
        with self._lock:
            self._failures[url] += 1
            cool = min(self._cap, self._base * 2.0 ** min(self._failures[url] - 1, 60))
            self._until[url] = self._clock() + max(cool, min(at_least, self._cap))

    def mark_ok(self, url: str) -> None:
        with self._lock:
            self._failures[url] = 0
            self._until[url] = 0.0

    def any_available(self) -> bool:
        with self._lock:
            now = self._clock()
            return any(t <= now for t in self._until.values())
