"""docqueue's Celery layer: the app, the tasks and the public `submit()` API.

`celery -A tasks worker|beat|flower` finds the app in `tasks.celery`.
"""

from tasks.api import JobHandle, submit
from tasks.celery import app

__all__ = ["JobHandle", "app", "submit"]
