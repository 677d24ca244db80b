"""Where branches run: the local process pool (default, ``durable_mp.engine.dispatcher``) or Dask."""
