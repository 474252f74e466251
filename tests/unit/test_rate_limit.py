"""The token bucket behind the per-key rate limit, on a clock the test moves."""

from __future__ import annotations

import pytest

from ledger.api.ratelimit import TokenBuckets
from ledger.settings import Settings, SettingsError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_key_gets_its_burst_then_its_rate_and_is_told_how_long_to_wait() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock)
    assert [buckets.take("k", 2, 3) for _ in range(3)] == [None, None, None]
    assert buckets.take("k", 2, 3) == 1       # empty: one token comes back in 0.5 s, said as 1 s
    clock.now = 0.5
    assert buckets.take("k", 2, 3) is None    # refilled at 2 per second
    assert buckets.take("k", 2, 3) == 1
    clock.now = 100
    assert [buckets.take("k", 2, 3) for _ in range(4)] == [None, None, None, 1]  # never more than the burst


def test_a_slow_rate_waits_whole_seconds_and_keys_are_independent() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock)
    assert buckets.take("slow", 1, 1) is None
    assert buckets.take("slow", 1, 1) == 1
    assert buckets.take("other", 1, 1) is None


def test_the_number_of_buckets_is_bounded() -> None:
    buckets = TokenBuckets(Clock(), buckets_max=10)
    for n in range(100):
        buckets.take(f"k{n}", 1, 1)
    assert len(buckets._buckets) == 10


@pytest.mark.parametrize("name, value", [("LEDGER_RATE_PER_KEY_PER_S", "0"), ("LEDGER_RATE_BURST", "-1"),
                                         ("LEDGER_RATE_BURST", "10000001")])
def test_rate_settings_are_bounded(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_rate_settings_default_generously_and_are_read_from_the_environment() -> None:
    assert (Settings().rate_per_key_per_s, Settings().rate_burst) == (250, 500)
    read = Settings.from_env({"LEDGER_RATE_PER_KEY_PER_S": "5", "LEDGER_RATE_BURST": "7"})
    assert (read.rate_per_key_per_s, read.rate_burst) == (5, 7)
