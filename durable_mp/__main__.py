"""``python -m durable_mp``: the command line (see ``durable_mp.cli.main``)."""

import sys

from durable_mp.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
