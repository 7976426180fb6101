"""docqueue's Celery layer: the app, the tasks and the public `submit()` API.

`celery -A docqueue.tasks worker|beat|flower` finds the app in `docqueue.tasks.celery`.
"""

from docqueue.tasks.api import JobHandle, submit
from docqueue.tasks.celery import app

__all__ = ["JobHandle", "app", "submit"]
