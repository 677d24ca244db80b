"""Where branches run: driver state, dispatcher, worker pool, worker protocol."""
