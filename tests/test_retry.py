"""orchestrator/retry.py on a fake clock: what is retried or polled, how often, and how long it waits."""

from __future__ import annotations

import pytest

from orchestrator.retry import Backoff, poll_until, retry_call


class FakeClock:
    """`sleep` moves `now` on instead of waiting; `slept` is every wait asked for."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def test_backoff_without_jitter_doubles_up_to_its_cap() -> None:
    policy = Backoff(attempts=6, first_s=0.5, max_s=3.0, jitter=False)
    assert [policy.delay(k, rand=lambda: 0.0) for k in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = Backoff(first_s=0.5, max_s=3.0)
    assert jittered.delay(3, rand=lambda: 0.25) == 0.75  # a draw in [0, bound]


def test_retry_call_without_jitter_waits_exactly_the_backoff() -> None:
    clock, calls = FakeClock(), []

    def refused() -> None:
        calls.append(clock.now)
        raise ConnectionRefusedError("nobody listens")

    with pytest.raises(ConnectionRefusedError):
        retry_call(refused, retry_on=lambda e: True, policy=Backoff(3, 0.5, jitter=False), sleep=clock.sleep)
    assert len(calls) == 3 and clock.slept == [0.5, 1.0]


def test_poll_until_returns_the_first_answer_and_sleeps_between_checks() -> None:
    clock, answers = FakeClock(), iter([None, None, "READY"])
    result = poll_until(
        lambda: next(answers),
        timeout_s=60,
        poll_s=5,
        on_timeout=AssertionError,
        sleep=clock.sleep,
        clock=clock.monotonic,
    )
    assert result == "READY" and clock.slept == [5, 5]


def test_poll_until_gives_up_after_the_deadline_with_the_callers_error() -> None:
    clock, checks = FakeClock(), []

    def never() -> None:
        checks.append(clock.now)

    late = TimeoutError("still CREATING after 12 s")
    with pytest.raises(TimeoutError, match="still CREATING after 12 s"):
        poll_until(
            never, timeout_s=12, poll_s=5, on_timeout=lambda: late, sleep=clock.sleep, clock=clock.monotonic
        )
    # checks at 0, 5, 10 and 15 s: the one past the deadline is the last; no sleep after it
    assert [t - 100.0 for t in checks] == [0, 5, 10, 15] and clock.slept == [5, 5, 5]


def test_poll_until_passes_a_checks_error_through_at_once() -> None:
    clock = FakeClock()

    def broken() -> None:
        raise PermissionError("403")

    with pytest.raises(PermissionError):
        poll_until(
            broken,
            timeout_s=60,
            poll_s=5,
            on_timeout=AssertionError,
            sleep=clock.sleep,
            clock=clock.monotonic,
        )
    assert clock.slept == []


def test_poll_until_takes_a_falsy_answer_that_is_not_none() -> None:
    assert poll_until(lambda: 0, timeout_s=0, poll_s=1, on_timeout=AssertionError, sleep=pytest.fail) == 0


def test_poll_until_without_a_deadline_polls_until_the_check_answers() -> None:
    clock, answers = FakeClock(), iter([None] * 1000 + ["SUCCEEDED"])
    result = poll_until(lambda: next(answers), poll_s=3600, sleep=clock.sleep, clock=clock.monotonic)
    assert result == "SUCCEEDED" and len(clock.slept) == 1000  # 1000 h of fake waiting: no deadline met


def test_backoff_stays_at_its_cap_however_many_waits_came_before() -> None:
    # a watcher polling for days: the growing bound would pass any float long before this
    assert Backoff(first_s=0.25, max_s=30.0, jitter=False).delay(5000) == 30.0
