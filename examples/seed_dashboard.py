"""The blog post's dashboard handler, unchanged but for the import.

Three "API calls" sleep 2 s, 3 s and 2 s; run in parallel they take about 3 s.

    python examples/seed_dashboard.py           # a new execution (id seed-<time>) every run
    python examples/seed_dashboard.py my-run    # run it twice: the second run returns the
                                                # checkpointed result at once, and says so
"""

import json
import sys
import time

from durable_mp import BatchResult, DurableContext, durable_execution


@durable_execution
def lambda_handler(event: dict, context: DurableContext) -> dict:
    """Call three APIs in parallel and merge their results."""

    def fetch_user(ctx: DurableContext) -> dict:
        def call_user_api(_):
            time.sleep(2)
            return {"user_id": "U001", "name": "Taro Yamada", "email": "taro@example.com"}
        return ctx.step(call_user_api, name="fetch_user")

    def fetch_orders(ctx: DurableContext) -> dict:
        def call_orders_api(_):
            time.sleep(3)
            return {"order_id": "O001", "items": ["item1", "item2"], "total": 5000}
        return ctx.step(call_orders_api, name="fetch_orders")

    def fetch_inventory(ctx: DurableContext) -> dict:
        def call_inventory_api(_):
            time.sleep(2)
            return {"product_id": "P001", "stock": 100, "warehouse": "Tokyo"}
        return ctx.step(call_inventory_api, name="fetch_inventory")

    result: BatchResult[dict] = context.parallel([
        fetch_user,
        fetch_orders,
        fetch_inventory,
    ])

    return {
        # the fields the blog post reached for, working here:
        "user": result.successful_results[0],
        "orders": result.successful_results[1],
        "inventory": result.all[2].result,
        "total_count": result.total_count,
        "success_count": result.success_count,
        "failure_count": result.failure_count,
        "status": result.status.value,
        "completion_reason": result.completion_reason.value,
    }


if __name__ == "__main__":
    run_id = sys.argv[1] if len(sys.argv) > 1 else f"seed-{int(time.time())}"
    started = time.perf_counter()
    out = lambda_handler.run({}, execution_id=run_id)
    print(json.dumps(out, ensure_ascii=False, indent=2))
    print(f"execution {run_id!r} took {time.perf_counter() - started:.2f} s", file=sys.stderr)
