"""docqueue's provider simulator: an OpenAI-compatible server with rate limits and faults.

Run it with `docq simulate ...` or `python -m workers.simulator ...`; `main(argv)` is the entry
point both use. Tests and benchmarks start it with `SimulatorProcess` (workers.simulator.process).
"""

from __future__ import annotations

from docqueue.workers.testing.simulator.cli import main
from docqueue.workers.testing.simulator.config import SimulatorConfig

__all__ = ["SimulatorConfig", "main"]
