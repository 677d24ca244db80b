"""Config objects: reference defaults and validation, plus durable_mp's timeouts."""

from __future__ import annotations

import dataclasses
import math

import pytest

from durable_mp import retries
from durable_mp.config import (
    CallbackConfig,
    ChildConfig,
    CompletionConfig,
    CompletionDecision,
    CompletionOutcome,
    Duration,
    JitterStrategy,
    MapConfig,
    NestingType,
    ParallelConfig,
    StepConfig,
    StepSemantics,
    WaitForCallbackConfig,
    complete_batch,
    continue_batch,
    timeout_seconds,
)
from durable_mp.exceptions import ValidationError
from durable_mp.types import StepContext, WaitForCallbackContext, WaitForConditionCheckContext

pytestmark = pytest.mark.process_free  # no test here starts a process


def test_duration_is_whole_seconds():
    assert Duration().to_seconds() == 0
    assert Duration.from_seconds(1.9).to_seconds() == 1
    assert Duration.from_minutes(1.5).to_seconds() == 90
    assert Duration.from_hours(2).to_seconds() == 7200
    assert Duration.from_days(0.5).to_seconds() == 43200
    with pytest.raises(ValidationError, match="negative"):
        Duration(-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Duration(1).seconds = 2  # type: ignore[misc]


@pytest.mark.parametrize(("value", "expected"), [(None, None), (2, 2.0), (0.25, 0.25), (Duration(3), 3.0)])
def test_timeout_seconds_accepts(value, expected):
    assert timeout_seconds(value) == expected


@pytest.mark.parametrize("value", [0, -1, 0.0, math.nan, math.inf, Duration(0), "5", True, [1]])
def test_timeout_seconds_rejects(value):
    with pytest.raises(ValidationError, match="timeout"):
        timeout_seconds(value)


def test_step_config_defaults_and_timeout():
    cfg = StepConfig()
    assert cfg.retry_strategy is None and cfg.serdes is None and cfg.sub_type is None and cfg.timeout is None
    assert cfg.step_semantics is StepSemantics.AT_LEAST_ONCE_PER_RETRY
    assert StepConfig(timeout=0.5).timeout_seconds == 0.5
    assert StepConfig(timeout=Duration(4)).timeout_seconds == 4.0
    with pytest.raises(ValidationError, match="StepConfig.timeout"):
        StepConfig(timeout=-2)
    with pytest.raises(TypeError):
        StepConfig(None, StepSemantics.AT_MOST_ONCE_PER_RETRY, None, "Custom")  # sub_type is keyword-only


@pytest.mark.parametrize("bad", ["x" * 33, "has space", "dot.ted", "ünï"])
def test_sub_type_validation(bad):
    with pytest.raises(ValidationError, match="sub_type"):
        StepConfig(sub_type=bad)
    with pytest.raises(ValidationError, match="sub_type"):
        ChildConfig(sub_type=bad)
    with pytest.raises(ValidationError, match="sub_type"):
        CallbackConfig(sub_type=bad)


def test_sub_type_accepts_valid_and_default():
    for ok in (None, "", "My-Sub_type1", "x" * 32):
        StepConfig(sub_type=ok)
        ChildConfig(sub_type=ok)


def test_completion_config_factories():
    assert CompletionConfig.first_successful() == CompletionConfig(min_successful=1)
    assert CompletionConfig.all_completed() == CompletionConfig(tolerated_failure_percentage=100)
    expected = CompletionConfig(tolerated_failure_count=0, tolerated_failure_percentage=0)
    assert CompletionConfig.all_successful() == expected
    assert not CompletionConfig().has_thresholds


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_successful": 0}, "min_successful must be at least 1"),
        ({"tolerated_failure_count": -1}, "tolerated_failure_count must be non-negative"),
        ({"tolerated_failure_percentage": 100.5}, "between 0 and 100"),
        ({"tolerated_failure_percentage": -1}, "between 0 and 100"),
        ({"should_complete": "yes"}, "should_complete must be callable"),
        ({"should_complete": lambda s: continue_batch(), "min_successful": 1}, "cannot be combined"),
        ({"should_complete": lambda s: continue_batch(), "tolerated_failure_percentage": 0}, "cannot be combined"),
    ],
)
def test_completion_config_validation(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        CompletionConfig(**kwargs)


def test_completion_decisions():
    assert continue_batch() == CompletionDecision(False, None)
    assert complete_batch() == CompletionDecision(True, CompletionOutcome.SUCCEEDED)
    assert complete_batch(CompletionOutcome.FAILED).outcome is CompletionOutcome.FAILED
    with pytest.raises(ValidationError, match="outcome is required"):
        CompletionDecision(True)
    with pytest.raises(ValidationError, match="outcome must be None"):
        CompletionDecision(False, CompletionOutcome.FAILED)


def test_parallel_and_map_defaults_differ():
    p, m = ParallelConfig(), MapConfig()
    assert p.completion_config == CompletionConfig.all_successful()
    assert m.completion_config == CompletionConfig()  # fail-fast
    for cfg in (p, m):
        assert cfg.max_concurrency is None and cfg.serdes is None and cfg.item_serdes is None
        assert cfg.summary_generator is None and cfg.nesting_type is NestingType.NESTED
        assert cfg.branch_timeout is None and cfg.branch_timeout_seconds is None
    assert m.item_namer is None
    namer = lambda item, i: f"n{i}"  # noqa: E731
    assert MapConfig(2, CompletionConfig(), None, None, None, NestingType.FLAT, namer).item_namer is namer


@pytest.mark.parametrize("cls", [ParallelConfig, MapConfig])
def test_batch_config_validation(cls):
    assert cls(max_concurrency=1).max_concurrency == 1
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValidationError, match="max_concurrency"):
            cls(max_concurrency=bad)
    assert cls(branch_timeout=1.5).branch_timeout_seconds == 1.5
    with pytest.raises(ValidationError, match="branch_timeout"):
        cls(branch_timeout=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().max_concurrency = 3  # type: ignore[misc]


def test_callback_configs():
    cfg = CallbackConfig()
    assert (cfg.timeout_seconds, cfg.heartbeat_timeout_seconds, cfg.serdes) == (0, 0, None)
    strategy = retries.RetryPresets.none()
    wfc = WaitForCallbackConfig(Duration(10), Duration(2), None, strategy)
    assert (wfc.timeout_seconds, wfc.heartbeat_timeout_seconds, wfc.retry_strategy) == (10, 2, strategy)


def test_child_config_defaults():
    cfg = ChildConfig()
    assert (cfg.serdes, cfg.sub_type, cfg.summary_generator, cfg.is_virtual) == (None, None, None, False)


def test_jitter_strategy_is_one_enum_everywhere():
    assert JitterStrategy is retries.JitterStrategy
    assert [j.value for j in JitterStrategy] == ["NONE", "FULL", "HALF"]
    assert JitterStrategy.FULL == "FULL"


def test_operation_contexts():
    assert StepContext(logger=None).attempt == 1
    assert StepContext(None, 3).attempt == 3
    assert WaitForConditionCheckContext(None, 2).attempt == 2
    assert WaitForCallbackContext(None).logger is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        StepContext(None).attempt = 2  # type: ignore[misc]
