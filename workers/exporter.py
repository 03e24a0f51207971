"""``python -m workers.exporter``: the metrics exporter (see :mod:`rango.exporter`)."""

import sys

from rango.exporter import main

if __name__ == "__main__":
    sys.exit(main())
