"""Reference-compatible package path (``aws_durable_execution_sdk_python.concurrency``)."""
