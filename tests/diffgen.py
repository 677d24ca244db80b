"""Random durable handlers from a seed, as source text that runs on either SDK.

``generate(seed)`` builds one handler: steps (with and without retries, failing on
their first attempts or always), waits, child contexts, ``parallel`` and ``map`` with
random completion configs and ``max_concurrency``, nested up to depth 3.  The text
imports its SDK from the module named ``SDK``; ``build(source, sdk)`` executes it with
``SDK`` bound to the reference (``aws_durable_execution_sdk_python``) or to durable_mp,
so exactly the same code runs on both.

Every outcome is fixed by the seed: failures depend on the attempt number, never on a
clock or a random draw at run time, and a batch whose completion could be decided
before all its items end (anything but ``all_completed``) runs with
``max_concurrency=1`` (except a ``RACING_SHARE`` of them, marked ``racing``), so which
items start does not depend on thread timing.  A
handler returns a JSON-able tree of what it saw; a ``BatchResult`` becomes a summary
dict (``summary()`` in the text) with its status, completion reason, counts and items.
"""

from __future__ import annotations

import json
import logging
import random
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

REFERENCE = "aws_durable_execution_sdk_python"
DURABLE_MP = "durable_mp"
MAX_DEPTH = 3
STEP_FUNCTION = "body"  # the __name__ of every generated step function (``flaky``'s body)
RACING_SHARE = 0.2  # of the batches that may complete early: run several items at once anyway

PRELUDE = '''\
import importlib
_sdk = importlib.import_module(SDK)
_cfg = importlib.import_module(SDK + ".config")
_ret = importlib.import_module(SDK + ".retries")
durable_execution = _sdk.durable_execution
CompletionConfig, ParallelConfig, MapConfig = _cfg.CompletionConfig, _cfg.ParallelConfig, _cfg.MapConfig
StepConfig, Duration, StepSemantics = _cfg.StepConfig, _cfg.Duration, _cfg.StepSemantics
NestingType = _cfg.NestingType
RetryDecision = _ret.RetryDecision
complete_batch, continue_batch, CompletionOutcome = _cfg.complete_batch, _cfg.continue_batch, _cfg.CompletionOutcome


def stop_at(failures, successes, outcome):
    """A should_complete predicate: complete as ``outcome`` at that many failures or successes."""
    def predicate(status):
        if status.failure_count >= failures or status.success_count >= successes:
            return complete_batch(CompletionOutcome[outcome])
        return continue_batch()
    return predicate


def retry_upto(n):
    """Up to n attempts, 1 s apart."""
    def strategy(error, attempts):
        return RetryDecision(should_retry=attempts < n, delay=Duration.from_seconds(1))
    return strategy


def flaky(tag, fail_until):
    """A step body failing on attempts 1..fail_until, then returning tag."""
    def body(step_ctx):
        if step_ctx.attempt <= fail_until:
            raise ValueError(f"{tag} failed attempt {step_ctx.attempt}")
        return f"{tag}@{step_ctx.attempt}"
    return body


def summary(br, n, racing=False):
    """A BatchResult of n inputs as plain data (``__batch__`` marks it for the comparison;
    ``racing``: which items end before its completion depends on thread timing)."""
    return {"__batch__": True, "inputs": n, "racing": racing, "status": br.status.value, "reason": br.completion_reason.value,
            "counts": [br.success_count, br.failure_count, br.started_count, br.total_count],
            "items": [[it.index, it.status.value, it.result,
                       None if it.error is None else [it.error.type, it.error.message]] for it in br.all]}


def caught(exc):
    return {"__error__": type(exc).__name__, "message": str(exc)}
'''


RUN_TIMEOUT = 120  # seconds one handler may take on either runner


@dataclass
class Outcome:
    """What a test runner reported: invocation status, the handler's result, the error."""

    status: str
    result: Any
    error: list[str | None] | None  # [type, message]
    operations: list[tuple]  # ``flat_operations``

    @classmethod
    def of(cls, result: Any) -> Outcome:
        error = None if result.error is None else [result.error.type, result.error.message]
        return cls(result.status.value, None if result.result is None else json.loads(result.result), error,
                   flat_operations(result.operations))

    def as_text(self) -> str:
        return json.dumps({"status": self.status, "error": self.error, "result": self.result})


def flat_operations(operations: list, depth: int = 0) -> list[tuple]:
    """Every operation as (depth, type, sub type, name, status, attempt), sorted: the tree
    without ids, timestamps or payloads (the SDKs' own encodings)."""
    out: list[tuple] = []
    for op in operations:
        sub_type = getattr(op.sub_type, "value", op.sub_type)
        out.append((depth, op.operation_type.value, str(sub_type), op.name, op.status.value,
                    getattr(op, "attempt", None)))
        out.extend(flat_operations(getattr(op, "child_operations", None) or [], depth + 1))
    return sorted(out, key=str) if depth == 0 else out


def run_reference(seed: int, source: str) -> Outcome:
    """The handler on the reference's local runner (``skip_time=True``)."""
    from aws_durable_execution_sdk_python_testing import DurableFunctionTestRunner

    handler = build(source, REFERENCE, f"diff_ref_{seed}")
    with DurableFunctionTestRunner(handler=handler, skip_time=True) as runner:
        return Outcome.of(runner.run(input="{}", execution_timeout=RUN_TIMEOUT))


def run_references(sources: dict[int, str], threads: int) -> dict[int, Outcome]:
    """Every handler on the reference, ``threads`` at a time, logs silenced.

    Run in a process of its own: the reference's threads then do not compete with
    durable_mp's driver for one GIL, and its many threads sleep out in-batch delays.
    """
    logging.disable(logging.CRITICAL)
    with ThreadPoolExecutor(threads) as pool:
        futures = {seed: pool.submit(run_reference, seed, source) for seed, source in sources.items()}
        return {seed: future.result() for seed, future in futures.items()}


@dataclass
class Generated:
    seed: int
    source: str
    racing: bool  # some batch races, even one whose summary the handler drops


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.defs: list[str] = []
        self.counter = 0
        self.racing = False  # some batch races (see ``summary``)

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # -- bodies: a function (ctx) -> list, defined at module level ----------------------------
    def body(self, depth: int, *, may_raise: bool = True) -> str:
        """Define a body function and return its name."""
        name = self.fresh("body")
        rng = self.rng
        lines = [f"def {name}(ctx):", "    out = []"]
        for _ in range(rng.randint(1, 3)):
            lines.extend("    " + line for line in self.operation(depth))
        if may_raise and rng.random() < 0.15:
            lines.append(f"    raise RuntimeError({name!r} + ' raised')")
        lines.append("    return out")
        self.defs.append("\n".join(lines))
        return name

    def operation(self, depth: int) -> list[str]:
        rng = self.rng
        kinds = ["step", "step", "wait"]
        if depth < MAX_DEPTH:
            kinds += ["parallel", "map", "child"]
        kind = rng.choice(kinds)
        return getattr(self, kind)(depth)

    def step(self, depth: int) -> list[str]:
        rng = self.rng
        tag = self.fresh("s")
        attempts = rng.choice([1, 1, 2, 3])  # 1: no retry
        fail_until = rng.choice([0, 0, 0, 1, 2, attempts, 9])
        semantics = ", step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY" if rng.random() < 0.2 else ""
        config = f"StepConfig(retry_strategy=retry_upto({attempts}){semantics})"
        if depth == 0 and rng.random() < 0.2:
            # the default strategy (6 attempts, backoff): only outside a batch, where the reference's
            # skip_time skips its delays (inside one it sleeps them while siblings run)
            config, fail_until = f"StepConfig({semantics[2:]})", rng.choice([0, 1, 9])
        name = f", name={tag!r}" if rng.random() < 0.85 else ""  # unnamed: the SDKs name it differently
        call = f"ctx.step(flaky({tag!r}, {fail_until}){name}, config={config})"
        if rng.random() < 0.3:  # the handler looks at the error instead of failing
            return ["try:", f"    out.append({call})", "except Exception as exc:", "    out.append(caught(exc))"]
        return [f"out.append({call})"]

    def wait(self, depth: int) -> list[str]:
        return [f"ctx.wait(Duration.from_seconds({self.rng.randint(1, 3)}))"]

    def child(self, depth: int) -> list[str]:
        inner = self.body(depth + 1)
        call = f"ctx.run_in_child_context({inner}, name={self.fresh('c')!r})"
        if self.rng.random() < 0.5:
            return ["try:", f"    out.append({call})", "except Exception as exc:", "    out.append(caught(exc))"]
        return [f"out.append({call})"]

    def completion(self, n: int) -> tuple[str, bool]:
        """A CompletionConfig expression, and whether it may end the batch before every item ends."""
        rng = self.rng
        choice = rng.choice(["default", "all_successful", "all_completed", "all_completed", "first_successful",
                             "min", "count", "pct", "min_count", "min_pct", "custom"])
        if choice == "default":
            return "None", True
        if choice in ("all_successful", "all_completed", "first_successful"):
            return f"CompletionConfig.{choice}()", choice != "all_completed"
        if choice == "custom":
            failures, successes = rng.randint(1, n), rng.randint(1, n)
            return f"CompletionConfig(should_complete=stop_at({failures}, {successes}, "\
                   f"{rng.choice(['SUCCEEDED', 'FAILED'])!r}))", True
        parts = []
        if choice.startswith("min"):
            parts.append(f"min_successful={rng.randint(1, n)}")
        if choice.endswith("count"):
            parts.append(f"tolerated_failure_count={rng.randint(0, n)}")
        if choice.endswith("pct"):
            parts.append(f"tolerated_failure_percentage={rng.choice([0, 20, 34, 50, 67, 100])}")
        return f"CompletionConfig({', '.join(parts)})", True

    def batch_config(self, cls: str, n: int, tag: str) -> tuple[str, bool]:
        """The config expression, and whether the batch races (see ``summary``)."""
        rng = self.rng
        completion, early = self.completion(n)
        racing = early and n > 1 and rng.random() < RACING_SHARE
        self.racing |= racing
        concurrency = rng.choice([None, 2, 3]) if racing else 1 if early else rng.choice([None, 1, 2, 3])
        args = [f"max_concurrency={concurrency}"]
        if completion != "None":
            args.append(f"completion_config={completion}")
        if rng.random() < 0.15:  # virtual branches: no CONTEXT operation of their own
            args.append("nesting_type=NestingType.FLAT")
        if cls == "MapConfig" and rng.random() < 0.3:
            args.append(f"item_namer=lambda item, index: f'{tag}-item-{{index}}'")
        return f"{cls}({', '.join(args)})", racing

    def parallel(self, depth: int) -> list[str]:
        n = self.rng.randint(1, 4)
        branches = [self.body(depth + 1) for _ in range(n)]
        tag = self.fresh("p")
        config, racing = self.batch_config("ParallelConfig", n, tag)
        return [f"out.append(summary(ctx.parallel([{', '.join(branches)}], name={tag!r}, "
                f"config={config}), {n}, {racing}))"]

    def map(self, depth: int) -> list[str]:
        n = self.rng.randint(1, 4)
        bodies = [self.body(depth + 1) for _ in range(n)]
        table = self.fresh("items")
        self.defs.append(f"{table} = [{', '.join(bodies)}]")
        func = self.fresh("mapper")
        self.defs.append(f"def {func}(ctx, item, index, items):\n    return {table}[item](ctx)")
        tag = self.fresh("m")
        config, racing = self.batch_config("MapConfig", n, tag)
        return [f"out.append(summary(ctx.map(list(range({n})), {func}, name={tag!r}, "
                f"config={config}), {n}, {racing}))"]


def generate(seed: int) -> Generated:
    """The handler of ``seed``: module source defining ``handler``."""
    gen = _Gen(seed)
    root = gen.body(0, may_raise=True)
    handler = f"@durable_execution\ndef handler(event, ctx):\n    return {root}(ctx)\n"
    source = "\n\n".join([PRELUDE, *gen.defs, handler])
    return Generated(seed, source, gen.racing)


def build(source: str, sdk: str, module_name: str) -> Any:
    """Execute ``source`` as module ``module_name`` importing ``sdk``; return its ``handler``.

    A real (unregistered) module object: cloudpickle sends its functions by value to
    durable_mp's worker processes.
    """
    module = ModuleType(module_name)
    module.__dict__["SDK"] = sdk
    exec(compile(source, f"<diffgen {module_name}>", "exec"), module.__dict__)  # noqa: S102 - our own generated text
    return module.__dict__["handler"]


def numbered(source: str) -> str:
    """The source with line numbers, for a failure message."""
    return textwrap.indent("\n".join(f"{i + 1:4} {line}" for i, line in enumerate(source.splitlines())), "  ")
