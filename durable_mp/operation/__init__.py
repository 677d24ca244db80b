"""The durable operations behind ``DurableContext``: step, callback, wait_for_condition, replay."""
