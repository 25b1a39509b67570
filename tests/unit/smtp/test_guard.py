"""Counting one client's failures (gateway/smtp/guard.py), on a clock the test moves."""

from __future__ import annotations

from gateway.smtp.guard import FailureLimit


def test_failed_srs_reverses_are_limited_per_client_and_network() -> None:
    from gateway.smtp.guard import FailureLimit

    now = [1000.0]
    guard = FailureLimit(limit=5, window=3600, clock=lambda: now[0], max_clients=100)
    for _ in range(5):
        assert not guard.blocked("192.0.2.7")
        guard.failed("192.0.2.7")
    assert guard.blocked("192.0.2.7")
    assert not guard.blocked("192.0.2.8")  # the network has room for 20
    for n in range(15):
        guard.failed(f"192.0.2.{100 + n}")
    assert guard.blocked("192.0.2.8")  # 20 in the /24
    assert not guard.blocked("198.51.100.1")
    now[0] += 3600
    assert not guard.blocked("192.0.2.7") and not guard.blocked("192.0.2.8")
    for n in range(200):  # bounded memory: the oldest keys go
        guard.failed(f"203.0.113.{n % 250}")
    assert len(guard._seen) <= 100


def test_the_window_starts_at_the_first_failure_and_does_not_slide() -> None:
    """A client failing once an hour minus a second is still counted in windows: the
    count starts again only when its window has passed, not with each failure."""
    now = [0.0]
    guard = FailureLimit(limit=3, window=100, clock=lambda: now[0])
    guard.failed("192.0.2.7")
    now[0] = 99.0
    guard.failed("192.0.2.7")
    guard.failed("192.0.2.7")
    assert guard.blocked("192.0.2.7")  # three within the window that began at 0
    now[0] = 100.0
    assert not guard.blocked("192.0.2.7")  # that window is over
    guard.failed("192.0.2.7")
    assert not guard.blocked("192.0.2.7")  # one in the new window


def test_an_ipv6_client_is_counted_in_its_64() -> None:
    now = [0.0]
    guard = FailureLimit(limit=1, window=100, clock=lambda: now[0])
    for n in range(FailureLimit.NETWORK_FACTOR):
        guard.failed(f"2001:db8:1:2::{n + 1}")
    assert guard.blocked("2001:db8:1:2::ffff")  # never failed itself: its network did
    assert not guard.blocked("2001:db8:1:3::1")


def test_the_keys_kept_are_bounded_and_the_newest_stay() -> None:
    now = [0.0]
    guard = FailureLimit(limit=1, window=100, clock=lambda: now[0], max_clients=4)
    for n in range(10):
        guard.failed(f"192.0.{n}.1")  # each a key for the address and one for its /24
    assert len(guard._seen) == 4
    assert guard.blocked("192.0.9.1") and not guard.blocked("192.0.0.1")
