"""docqueue: run a language model over a large corpus of documents, queued, rate-limited and
resumable.

The one import name of the distribution. The repository keeps three folders at its top and
installs them under this package:

    docqueue.models    the results store's tables, sessions and migrations   (models/)
    docqueue.workers   the work itself, with no Celery import                 (workers/)
    docqueue.tasks     the Celery layer, the `docq` command, the Python API   (tasks/)

What a user needs is here, and only here is it promised to stay put:

    from docqueue import JobStatus, WorkerError, submit

    try:
        job = submit("docs/", "summarize")
    except WorkerError as exc:       # every error of docqueue's, its message written for you
        raise SystemExit(str(exc))
    final = job.wait()               # a JobInfo: final["status"], final["cost"], ...
    if final["status"] != JobStatus.SUCCEEDED:
        print(final["reason"])
    for doc in job.results():        # DocumentResult records, in submission order
        print(doc["id"], doc["status"], doc["output"])

The records are TypedDicts (tasks/records.py says why): plain dicts at run time, typed keys for
mypy, and exactly what `docq status --json` and `docq results` print.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from docqueue.models.tables import (
        FINAL_JOB_STATES,
        DocumentStatus,
        JobStatus,
        Lane,
        ResultStatus,
    )
    from docqueue.tasks.api import JobHandle, JobStalledError, submit
    from docqueue.tasks.records import (
        ChunkResult,
        DocumentResult,
        JobInfo,
        ProviderBatchInfo,
        Trouble,
    )
    from docqueue.workers.errors import (
        InputError,
        JobNotFoundError,
        JobNotPublishedError,
        NothingToSubmitError,
        PipelineError,
        ServiceUnavailableError,
        WorkerError,
    )
    from docqueue.workers.jobs.submission import SubmitReport

# Each public name's home. A name is imported on first use, so that importing one module of
# docqueue.workers (the provider simulator, a worker's child process) does not also load
# Celery, langchain and the store's drivers for the face's sake.
_HOMES = {
    "docqueue.models.tables": ("FINAL_JOB_STATES", "DocumentStatus", "JobStatus", "Lane",
                               "ResultStatus"),
    "docqueue.tasks.api": ("JobHandle", "JobStalledError", "submit"),
    "docqueue.tasks.records": ("ChunkResult", "DocumentResult", "JobInfo", "ProviderBatchInfo",
                               "Trouble"),
    "docqueue.workers.errors": ("InputError", "JobNotFoundError", "JobNotPublishedError",
                                "NothingToSubmitError", "PipelineError",
                                "ServiceUnavailableError", "WorkerError"),
    "docqueue.workers.jobs.submission": ("SubmitReport",),
}
_HOME_OF = {name: home for home, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    home = _HOME_OF.get(name)
    if home is None:
        raise AttributeError(f"module 'docqueue' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME_OF])


__all__ = [
    "FINAL_JOB_STATES",
    "ChunkResult",
    "DocumentResult",
    "DocumentStatus",
    "InputError",
    "JobHandle",
    "JobInfo",
    "JobNotFoundError",
    "JobNotPublishedError",
    "JobStalledError",
    "JobStatus",
    "Lane",
    "NothingToSubmitError",
    "PipelineError",
    "ProviderBatchInfo",
    "ResultStatus",
    "ServiceUnavailableError",
    "SubmitReport",
    "Trouble",
    "WorkerError",
    "submit",
]
