"""Tools for testing docqueue and what runs on it, never imported by the runtime.

`simulator/` is an OpenAI-compatible provider (chat and text completions, rate limits, faults,
the Batch API) served over HTTP: the integration tests and benchmarks run the real workers
against it, and `docq simulate` starts one. Nothing under `docqueue.workers` or `docqueue.tasks`
imports this package except that command (tests/unit/test_architecture.py checks it).
"""
