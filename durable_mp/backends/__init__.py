"""Where branches run: the local process pool (default, ``durable_mp.dispatch``) or Dask."""
