"""``python -m durable_mp`` / ``durable-mp``."""

from durable_mp.cli.main import main

__all__ = ["main"]
