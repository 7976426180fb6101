"""`docq` commands for operating docqueue: schedules, beat, Flower, live progress."""

from tasks.cli import cli  # noqa: F401
