"""``python -m durable_mp`` / ``durable-mp``: the command line (``main.main`` is the entry point)."""
