"""``python -m workers.worker``: one Rango worker process (see :mod:`rango.worker`)."""

import sys

from rango.worker import main

if __name__ == "__main__":
    sys.exit(main())
