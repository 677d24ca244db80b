"""The blog post's error-isolation handler ("エラーの分離"), unchanged but for the import.

Branch 3 raises at once; branches 1 and 2 sleep 2 s and 3 s.  With the default
``ParallelConfig`` the failure ends the batch, but the running branches finish and
report (docs/architecture.md "Completion"), so the output is the blog's: two results, one error,
``FAILED`` / ``ALL_COMPLETED``.

    python examples/seed_error_isolation.py
"""

import json
import sys
import time

from durable_mp import BatchResult, DurableContext, durable_execution


@durable_execution
def lambda_handler(event: dict, context: DurableContext) -> dict:
    """Call three APIs in parallel; the inventory API fails."""

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
        raise Exception("エラー")
        return ctx.step(call_inventory_api, name="fetch_inventory")

    result: BatchResult[dict] = context.parallel([
        fetch_user,
        fetch_orders,
        fetch_inventory,
    ])

    return {
        "user": result.all[0].result,
        "orders": result.all[1].result,
        "inventory": str(result.all[2].error),
        "total_count": result.total_count,
        "success_count": result.success_count,
        "failure_count": result.failure_count,
        "status": result.status.value,
        "completion_reason": result.completion_reason.value,
    }


if __name__ == "__main__":
    run_id = sys.argv[1] if len(sys.argv) > 1 else f"seed-errors-{int(time.time())}"
    out = lambda_handler.run({}, execution_id=run_id)
    print(json.dumps(out, ensure_ascii=False, indent=2))
