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

from docqueue.models.tables import (
    FINAL_JOB_STATES,
    DocumentStatus,
    JobStatus,
    Lane,
    ResultStatus,
)
from docqueue.tasks.api import JobHandle, JobStalledError, submit
from docqueue.tasks.records import ChunkResult, DocumentResult, JobInfo, ProviderBatchInfo
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
    "WorkerError",
    "submit",
]
