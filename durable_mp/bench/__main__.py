"""``python -m durable_mp.bench [--quick] [--only a,b] [--repeats N] [--json FILE] [--markdown FILE]``."""

from __future__ import annotations

import sys

from durable_mp.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
