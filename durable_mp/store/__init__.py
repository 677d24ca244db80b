"""The checkpoint store (LMDB): the ``Store`` facade, its environment, group commit and records."""

from durable_mp.store.facade import *  # noqa: F401,F403
from durable_mp.store.facade import __all__  # noqa: F401
