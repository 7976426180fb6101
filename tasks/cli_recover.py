"""`docq` commands for recovery: resume a job whose messages or workers were lost."""

from tasks.cli import cli  # noqa: F401
