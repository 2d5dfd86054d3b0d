"""The retry and polling helpers for every loop grpoctl waits in.

    retry_call(fn, retry_on=is_transient, policy=Backoff(attempts=6))   # bounded attempts, backoff
    poll_until(check, timeout_s=600, poll_s=5, on_timeout=...)          # until a state holds, or a deadline
    poll_until(check, poll_s=5)                                         # until a state holds (no deadline)
    Backoff(first_s=0.25, max_s=interval, jitter=False).delay(k)        # a growing wait (a loop of its own)

`sleep`, `rand` and `clock` are injectable so tests count attempts and waits on a fake clock instead of
waiting.
Only the caller knows what is worth retrying (a 503 on a read is; a 400 never is; a create is not
idempotent), so `retry_on` is a required predicate.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """`attempts` calls at most; before call k+1 wait a uniform draw in [0, min(max_s, first_s * factor**k)]
    ("full jitter": many clients hitting one busy API spread out instead of retrying in step), or exactly
    that bound with `jitter=False` (one client retrying its own connection has nobody to spread out from)."""

    attempts: int = 6
    first_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0
    jitter: bool = True

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """The wait before retry number `retry` (0 for the first retry)."""
        try:
            grown = self.first_s * self.factor**retry
        except OverflowError:  # a watcher's thousandth wait: 2.0**1100 is past any float, and past max_s
            grown = math.inf
        bound = min(self.max_s, grown)
        return rand() * bound if self.jitter else bound


def retry_call(
    fn: Callable[[], T],
    *,
    retry_on: Callable[[BaseException], bool],
    policy: Backoff = Backoff(),
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """`fn()`, called again after an exception `retry_on` accepts, up to `policy.attempts` calls in all.
    The last exception propagates unchanged; `on_retry(attempt, err, delay_s)` hears of each retry."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - `retry_on` decides; everything else re-raises
            attempt += 1
            if attempt >= policy.attempts or not retry_on(err):
                raise
            wait = policy.delay(attempt - 1, rand)
            if on_retry is not None:
                on_retry(attempt, err, wait)
            sleep(wait)


def poll_until(
    check: Callable[[], T | None],
    *,
    poll_s: float,
    timeout_s: float = math.inf,
    on_timeout: Callable[[], BaseException] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call `check()` every `poll_s` until it returns something other than None, and return that. When a
    check comes back None after `timeout_s`, raise `on_timeout()` (a TimeoutError without one); with no
    `timeout_s` it polls until the check answers. The first check is made at once and each check runs to
    its end (a check may raise: that ends the poll); Ctrl-C lands between polls."""
    deadline = clock() + timeout_s
    while True:
        result = check()
        if result is not None:
            return result
        if clock() > deadline:
            if on_timeout is None:
                raise TimeoutError(f"no answer within {timeout_s:g} s")
            raise on_timeout()
        sleep(poll_s)
