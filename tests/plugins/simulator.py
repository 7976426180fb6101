"""The `simulator` fixture: start provider simulators over HTTP on loopback.

    def test_x(simulator):
        sim = simulator("--rpm", "60", "--seed", "1")
        llm = ChatOpenAI(base_url=sim.url, api_key="x", model="docq-sim", max_retries=0)

Every simulator a test started is stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from docqueue.workers.testing.simulator.process import SimulatorProcess

SimulatorFactory = Callable[..., SimulatorProcess]


@pytest.fixture
def simulator() -> Iterator[SimulatorFactory]:
    """A factory: `simulator(*cli_args)` returns a started SimulatorProcess."""
    started: list[SimulatorProcess] = []

    def start(*args: str) -> SimulatorProcess:
        # Its start is mostly imports: about a second on an idle machine, and 20 s measured with
        # parallel test workers and other runs on two cores (load average 12). A worker is given
        # 90 s (WorkerProcess.wait_ready); the simulator the same.
        sim = SimulatorProcess(*args, startup_timeout_s=90)
        started.append(sim)
        return sim.start()

    yield start
    for sim in started:
        sim.stop()
