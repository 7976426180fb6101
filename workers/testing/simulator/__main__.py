"""`python -m workers.simulator --port 8000 --rpm 60 ...`"""

from __future__ import annotations

import sys

from docqueue.workers.testing.simulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
