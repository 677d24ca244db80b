"""Retry and wait strategies: delay formulas, jitter, clamping, matching, presets."""

from __future__ import annotations

import math
import random
import re

import pytest

from durable_mp import jitter
from durable_mp.config import Duration, JitterStrategy
from durable_mp.exceptions import WaitForConditionError
from durable_mp.retries import (
    LinearRetryStrategyConfig,
    RetryDecision,
    RetryPresets,
    RetryStrategyConfig,
    WithRetryConfig,
    create_linear_retry_strategy,
    create_retry_strategy,
    with_retry,
)
from durable_mp.waits import (
    WaitForConditionConfig,
    WaitForConditionDecision,
    WaitStrategyConfig,
    create_wait_strategy,
)

pytestmark = pytest.mark.process_free  # no test here starts a process

NONE = JitterStrategy.NONE


def delays(strategy, attempts: int, error: Exception | None = None) -> list[int | None]:
    """Delay after each failed attempt 1..attempts; None where the strategy gives up."""
    error = error or RuntimeError("boom")
    out = []
    for n in range(1, attempts + 1):
        decision = strategy(error, n)
        out.append(decision.delay_seconds if decision.should_retry else None)
    return out


@pytest.fixture
def seeded_jitter():
    """Make the module-level jitter source deterministic for presets (no rng parameter)."""
    state = jitter.RANDOM.getstate()
    jitter.RANDOM.seed(1234)
    yield
    jitter.RANDOM.setstate(state)


def test_retry_decision():
    assert RetryDecision.retry(Duration(7)) == RetryDecision(True, Duration(7))
    assert RetryDecision.retry(Duration(7)).delay_seconds == 7
    assert RetryDecision.no_retry() == RetryDecision(False, Duration(0))


def test_config_defaults():
    cfg = RetryStrategyConfig()
    assert (cfg.max_attempts, cfg.initial_delay_seconds, cfg.max_delay_seconds, cfg.backoff_rate) == (3, 5, 300, 2.0)
    assert cfg.jitter_strategy is JitterStrategy.FULL and cfg.retryable_errors is None
    lin = LinearRetryStrategyConfig()
    assert (lin.max_attempts, lin.initial_delay_seconds, lin.increment_seconds, lin.max_delay_seconds) == (6, 1, 1, 300)


def test_exponential_without_jitter():
    assert delays(create_retry_strategy(RetryStrategyConfig(jitter_strategy=NONE)), 4) == [5, 10, None, None]
    cfg = RetryStrategyConfig(max_attempts=8, initial_delay=Duration(3), max_delay=Duration(20), backoff_rate=2,
                              jitter_strategy=NONE)
    assert delays(create_retry_strategy(cfg), 8) == [3, 6, 12, 20, 20, 20, 20, None]


def test_fractional_delays_round_up_and_clamp_to_one_second():
    cfg = RetryStrategyConfig(max_attempts=5, initial_delay=Duration(1), backoff_rate=1.5, jitter_strategy=NONE)
    assert delays(create_retry_strategy(cfg), 5) == [1, 2, 3, 4, None]  # 1, 1.5, 2.25, 3.375
    zero = RetryStrategyConfig(initial_delay=Duration(0), jitter_strategy=NONE)
    assert delays(create_retry_strategy(zero), 2) == [1, 1]


@pytest.mark.parametrize("strategy", [JitterStrategy.FULL, JitterStrategy.HALF])
def test_jitter_with_a_seeded_random_is_reproducible(strategy):
    cfg = RetryStrategyConfig(max_attempts=6, initial_delay=Duration(10), max_delay=Duration(1000),
                              jitter_strategy=strategy)
    got = delays(create_retry_strategy(cfg, rng=random.Random(7)), 5)
    expected_rng = random.Random(7)
    expected = []
    for n in range(1, 6):
        base = 10 * 2 ** (n - 1)
        r = expected_rng.random()
        jittered = r * base if strategy is JitterStrategy.FULL else base / 2 + r * base / 2
        expected.append(max(1, math.ceil(jittered)))
    assert got == expected
    assert got == delays(create_retry_strategy(cfg, rng=random.Random(7)), 5)


def test_jitter_bounds():
    rng = random.Random(0)
    full = [JitterStrategy.FULL.apply_jitter(10, rng) for _ in range(500)]
    half = [JitterStrategy.HALF.apply_jitter(10, rng) for _ in range(500)]
    assert all(0 <= d <= 10 for d in full) and min(full) < 2 and max(full) > 8
    assert all(5 <= d <= 10 for d in half)
    assert JitterStrategy.NONE.apply_jitter(10, rng) == 10
    assert all(JitterStrategy.FULL.finalize_delay(0.2, rng) == 1 for _ in range(20))


def test_matching_rules():
    only_timeouts = create_retry_strategy(RetryStrategyConfig(retryable_errors=["timeout", re.compile(r"^HTTP 5\d\d")],
                                                             jitter_strategy=NONE))
    assert only_timeouts(RuntimeError("read timeout after 3s"), 1).should_retry
    assert only_timeouts(RuntimeError("HTTP 503 busy"), 1).should_retry
    assert not only_timeouts(RuntimeError("got HTTP 503"), 1).should_retry  # re.search with ^
    assert not only_timeouts(ValueError("bad input"), 1).should_retry

    by_type = create_retry_strategy(RetryStrategyConfig(retryable_error_types=[ConnectionError]))
    assert by_type(ConnectionResetError("x"), 1).should_retry
    assert not by_type(ValueError("timeout"), 1).should_retry  # message filter is not defaulted to match-all

    either = create_retry_strategy(RetryStrategyConfig(retryable_errors=["flaky"], retryable_error_types=[KeyError]))
    assert either(KeyError("k"), 1).should_retry and either(ValueError("flaky"), 1).should_retry

    nothing = create_retry_strategy(RetryStrategyConfig(retryable_errors=[]))
    assert not nothing(RuntimeError("anything"), 1).should_retry
    assert create_retry_strategy()(RuntimeError(""), 1).should_retry  # no filters: everything matches


def test_linear_strategy():
    cfg = LinearRetryStrategyConfig(max_attempts=5, initial_delay=Duration(2), increment=Duration(3),
                                    max_delay=Duration(9), jitter_strategy=NONE)
    assert delays(create_linear_retry_strategy(cfg), 5) == [2, 5, 8, 9, None]
    assert delays(create_linear_retry_strategy(
        LinearRetryStrategyConfig(jitter_strategy=JitterStrategy.FULL), rng=random.Random(3)), 6)[-1] is None


def test_presets_without_jitter():
    assert delays(RetryPresets.none(), 1) == [None]
    assert delays(RetryPresets.critical(), 10) == [1, 2, 3, 4, 6, 8, 12, 18, 26, None]
    assert delays(RetryPresets.linear(), 6) == [1, 2, 3, 4, 5, None]
    assert delays(RetryPresets.fixed(), 5) == [5, 5, 5, 5, None]
    assert delays(RetryPresets.fixed(Duration(2)), 5) == [2, 2, 2, 2, None]


def test_presets_with_jitter(seeded_jitter):
    default = delays(RetryPresets.default(), 6)
    assert default[-1] is None and len([d for d in default if d]) == 5
    for n, d in enumerate(default[:5], start=1):
        assert 1 <= d <= min(5 * 2 ** (n - 1), 60)
    transient = delays(RetryPresets.transient(), 3)
    assert transient[2] is None and 3 <= transient[0] <= 5 and 5 <= transient[1] <= 10
    resource = delays(RetryPresets.resource_availability(), 5)
    assert resource[4] is None and all(1 <= d <= 5 * 2 ** i for i, d in enumerate(resource[:4]))


def test_presets_are_deterministic_with_a_reseeded_module_random(seeded_jitter):
    first = delays(RetryPresets.default(), 5)
    jitter.RANDOM.seed(1234)
    assert delays(RetryPresets.default(), 5) == first


# --- with_retry -------------------------------------------------------------------------


class FakeContext:
    def __init__(self):
        self.waits: list[tuple[int, str | None]] = []
        self.children: list[str | None] = []

    def wait(self, duration, name=None):
        self.waits.append((duration.to_seconds(), name))

    def run_in_child_context(self, func, name=None, config=None):
        self.children.append(name)
        return func(self)


def test_with_retry_reruns_the_block_with_named_backoff_waits():
    ctx = FakeContext()
    attempts = []

    def block(c, attempt):
        attempts.append(attempt)
        if attempt < 3:
            raise RuntimeError("flaky")
        return "done"

    config = WithRetryConfig(retry_strategy=RetryPresets.fixed(Duration(2)))
    assert with_retry(ctx, block, config, name="sync") == "done"
    assert attempts == [1, 2, 3]
    assert ctx.waits == [(2, "sync-backoff-1"), (2, "sync-backoff-2")]
    assert ctx.children == ["sync"]


def test_with_retry_gives_up_with_the_last_error_and_can_skip_the_child():
    ctx = FakeContext()
    config = WithRetryConfig(retry_strategy=RetryPresets.none(), wrap_with_run_in_child_context=False)
    with pytest.raises(KeyError):
        with_retry(ctx, lambda c, a: {}["missing"], config)
    assert ctx.children == [] and ctx.waits == []


# --- wait strategies --------------------------------------------------------------------


def test_wait_decisions():
    assert WaitForConditionDecision.continue_waiting(Duration(3)).delay_seconds == 3
    assert WaitForConditionDecision.stop_polling() == WaitForConditionDecision(False, Duration(0))


def test_wait_strategy_backoff_and_stop():
    cfg = WaitStrategyConfig(should_continue_polling=lambda s: s < 100, max_attempts=5, jitter_strategy=NONE)
    assert (cfg.initial_delay_seconds, cfg.max_delay_seconds, cfg.backoff_rate) == (5, 300, 1.5)
    strategy = create_wait_strategy(cfg)
    assert [strategy(0, n).delay_seconds for n in (1, 2, 3)] == [5, 8, 12]  # 5, 7.5, 11.25
    assert strategy(100, 1) == WaitForConditionDecision.stop_polling()
    assert strategy(100, 5) == WaitForConditionDecision.stop_polling()  # met on the last attempt wins
    with pytest.raises(WaitForConditionError, match="exhausted 5 attempts"):
        strategy(0, 5)


def test_wait_strategy_jitter_is_injectable():
    cfg = WaitStrategyConfig(should_continue_polling=lambda s: True, initial_delay=Duration(100))
    a = [create_wait_strategy(cfg, rng=random.Random(5))(None, n).delay_seconds for n in (1, 2)]
    b = [create_wait_strategy(cfg, rng=random.Random(5))(None, n).delay_seconds for n in (1, 2)]
    assert a == b and all(1 <= d <= 150 for d in a)


def test_wait_for_condition_config():
    cfg = WaitForConditionConfig(wait_strategy=lambda s, n: WaitForConditionDecision.stop_polling(), initial_state=0)
    assert cfg.serdes is None and cfg.initial_state == 0
