"""``python -m workers.template``: the process ``rango --workers N`` forks its workers
from (see :mod:`rango.template`)."""

import sys

from rango.template import main

if __name__ == "__main__":
    sys.exit(main())
