"""docqueue: run a language model over a large corpus of documents, queued, rate-limited and
resumable.

The one import name of the distribution. The repository keeps three folders at its top and
installs them under this package:

    docqueue.models    the results store's tables, sessions and migrations   (models/)
    docqueue.workers   the work itself, with no Celery import                 (workers/)
    docqueue.tasks     the Celery layer, the `docq` command, the Python API   (tasks/)

What a user needs is here:

    from docqueue import submit
    job = submit("docs/", "summarize")
    job.wait()
"""

from docqueue.tasks.api import JobHandle, submit

__all__ = ["JobHandle", "submit"]
