"""`docq flower`: Flower on docqueue's app, behind basic auth, showing short summaries only.

Credentials come from settings (DOCQ_FLOWER_USER, DOCQ_FLOWER_PASSWORD) and are handed to
Flower's options inside this process: never on a command line that `ps` shows, and never
split on commas as FLOWER_BASIC_AUTH would be. Without them Flower refuses to start, unless
it is bound to loopback and the caller says `--insecure-local`.

Task arguments are ids with an `argsrepr` summary (`job=12 batch=3/40 chunks=25`), so there is
nothing secret to hide; `format_task` still cuts what the HTML pages show to a few hundred
characters and drops tracebacks, so a surprise (an exception quoting its input) stays out of
the browser. A batch's result, its story (tasks/batches.py), may run to 2 KB: counts, then
the reasons its chunks failed. A batch waiting to run again shows why in the same column: its
retry's words (tasks/batches.py, `Waiting`), the trouble line of the status views when its
calls met a shared cause (an endpoint unreachable, a refused key, a storm of 429s or 5xx).
Flower's `/metrics` and `/healthcheck` need no credentials (Flower's own rule).
"""

from __future__ import annotations

from typing import Any

from celery.events.state import Task

from docqueue.workers.errors import InputError
from docqueue.workers.settings import Settings, is_loopback

MAX_FIELD_CHARS = 200
MAX_RESULT_CHARS = 2048  # a batch's story (tasks/batches.py): counts, then failure reasons
# The tasks page shows the argsrepr summary and the small result; Flower hides them by default.
TASKS_COLUMNS = "name,uuid,state,args,result,received,runtime,worker"
DEFAULT_MAX_TASKS = 10_000  # Flower's 100,000 default costs hundreds of MB (mher/flower#1305)


class FlowerAuthError(InputError):
    """Flower would start without the credentials it needs; the message says what to set."""


def basic_auth(settings: Settings, address: str, insecure_local: bool) -> str | None:
    """`user:password` for Flower, or None when serving loopback unauthenticated on request.

    Raises:
        FlowerAuthError: no (or half the) credentials and no loopback `--insecure-local`.
    """
    user = settings.flower_user
    secret = settings.flower_password
    password = secret.get_secret_value() if secret is not None else None
    if user and password:
        if ":" in user:
            raise FlowerAuthError("DOCQ_FLOWER_USER cannot contain ':' (basic auth splits on it)")
        return f"{user}:{password}"
    if user or password:
        missing = "DOCQ_FLOWER_PASSWORD" if user else "DOCQ_FLOWER_USER"
        raise FlowerAuthError(f"{missing} is not set: Flower needs both a user and a password")
    if not insecure_local:
        raise FlowerAuthError(
            "Flower shows every task and can revoke them: set DOCQ_FLOWER_USER and "
            "DOCQ_FLOWER_PASSWORD, or, for this machine only, pass --insecure-local with a "
            "loopback --address"
        )
    if not is_loopback(address):
        raise FlowerAuthError(
            f"--insecure-local serves Flower without credentials, so it needs a loopback "
            f"--address (127.0.0.1, ::1 or localhost), not {address or 'every interface'!r}"
        )
    return None


def format_task(task: Task) -> Task:
    """What Flower's pages show of a task: short arguments and result, no traceback; a task
    waiting to run again shows why as its result."""
    if task.exception:
        first = str(task.exception).splitlines()[0] if str(task.exception) else ""
        task.exception = first[:MAX_RESULT_CHARS]
        if task.state == "RETRY" and not task.result and first not in ("None", ""):
            task.result = f"waiting: {first}"
    for name, limit in (("args", MAX_FIELD_CHARS), ("kwargs", MAX_FIELD_CHARS),
                        ("result", MAX_RESULT_CHARS), ("exception", MAX_FIELD_CHARS)):
        value = getattr(task, name, None)
        if isinstance(value, str) and len(value) > limit:
            setattr(task, name, value[:limit] + "…")
    if task.traceback:
        task.traceback = "(not shown here: see the worker's log)"
    return task


def run_flower(
    settings: Settings,
    *,
    address: str,
    port: int,
    insecure_local: bool = False,
    url_prefix: str | None = None,
    max_tasks: int = DEFAULT_MAX_TASKS,
    extra_args: list[str] | None = None,
) -> Any:
    """Run Flower in this process until it is stopped.

    Raises:
        FlowerAuthError: see `basic_auth`.
    """
    credentials = basic_auth(settings, address, insecure_local)
    from flower.options import options

    from docqueue.tasks.celery import app

    # Set before Flower parses its arguments: a value here is not on any command line.
    options.basic_auth = [credentials] if credentials else []
    options.format_task = format_task
    options.tasks_columns = TASKS_COLUMNS
    argv = ["flower", f"--address={address}", f"--port={port}", f"--max_tasks={max_tasks}"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix.strip('/')}")
    return app.start([*argv, *(extra_args or [])])
