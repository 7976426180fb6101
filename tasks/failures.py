"""What a failed service call means to a person: one line naming the service, its setting and
the remedy.

The drivers (SQLAlchemy with psycopg or sqlite3, redis-py, kombu) raise their own exceptions,
with pool internals in the traceback and, for some, the whole URL in the message. `explain()`
maps one of them to docqueue's `ServiceUnavailableError` tree (workers/errors.py), naming the
URL with its password masked; `service_errors()` does it for a block of the public API, so a
caller of `submit()` or `job_status()` catches ours and never a driver's. Guarantees:

- every message names the setting behind the service (DOCQ_DATABASE_URL, DOCQ_BROKER_URL,
  DOCQ_REDIS_URL) and what to do, on one line; a Redis error names docqueue's Redis (the
  broker's when it is Redis), a RabbitMQ error the broker;
- no password of a configured URL and no API key appears in a message (`scrub`), whatever the
  driver put in its own text;
- an exception that is not a service's failure is left alone (`explain` returns None).

`outage()` tells a service that is out of reach for now (a refused or lost connection, a
timeout: worth waiting out) from one that refuses the credentials or lacks its tables (not):
a view that keeps polling says the first and goes on (workers/batch/trouble.py, `Outages`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import amqp.exceptions
import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc

from docqueue.models.db import MissingIdentityError
from docqueue.workers.errors import (
    BrokerUnavailableError,
    InputError,
    StoreNotMigratedError,
    StoreUnavailableError,
    WorkerError,
)
from docqueue.workers.settings import Settings, masked_url

MAX_DETAIL_CHARS = 200  # the driver's own words, cut: one line, not a page

# psycopg's and sqlite3's words for a schema that is not there (or older than the code).
_NOT_MIGRATED = ("does not exist", "no such table", "no such column", "undefinedtable",
                 "undefinedcolumn")
_CREDENTIALS = ("password authentication failed", "authentication failed", "role ",
                "no pg_hba.conf entry", "permission denied")


def explain(exc: BaseException, settings: Settings | None) -> WorkerError | None:
    """docqueue's error for `exc` (or for an exception it was raised from), else None."""
    for cause in _chain(exc):
        if isinstance(cause, WorkerError):
            return None  # already ours: its message was written for the user
        found = _store_error(cause, settings) or _broker_error(cause, settings)
        if found is not None:
            return found
    return None


@contextmanager
def service_errors(settings: Settings) -> Iterator[None]:
    """Raise docqueue's error for a driver's failure inside the block, chained to it."""
    try:
        yield
    except Exception as exc:
        found = explain(exc, settings)
        if found is None:
            raise
        raise found from exc


def outage(exc: BaseException, settings: Settings | None) -> tuple[str, str] | None:
    """(the service, what is wrong, both short) when `exc` or one it came from says the results
    store or docqueue's Redis cannot be reached just now; None for any other failure."""
    for cause in _chain(exc):
        if isinstance(cause, redis.exceptions.AuthenticationError) or _is_redis_auth(cause):
            return None
        if isinstance(cause, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            url = settings.state_redis_url if settings is not None else None
            where = f" at {_address(url)}" if url else ""
            return f"docqueue's Redis{where}", _short(_detail(cause))
        if isinstance(cause, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
            detail = _detail(cause.orig if cause.orig is not None else cause)
            low = detail.lower()
            if any(m in low for m in (*_CREDENTIALS, *_NOT_MIGRATED, "unable to open")):
                return None
            where = f" at {_address(settings.database_url)}" if settings is not None else ""
            return f"the results store{where}", _short(detail)
    return None


def _address(url: str) -> str:
    """Where a service listens, as a person names it: host:port (a file's path for SQLite)."""
    parts = urlsplit(url)
    if parts.scheme.startswith("sqlite"):
        return parts.path.lstrip("/") or "memory"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.hostname}:{port}" if port is not None else parts.hostname or "?"


# A driver's words for the usual outages, and the few this module says instead.
_SHORT = (("connection refused", "connection refused"), ("timed out", "timed out"),
          ("timeout", "timed out"), ("name or service not known", "unknown host"),
          ("could not translate host name", "unknown host"),
          ("connection reset", "connection lost"), ("closed the connection", "connection lost"),
          ("server closed", "connection lost"), ("connection closed", "connection lost"))


SHORT_DETAIL_CHARS = 80  # the driver's words in a trouble line, which says more beside them


def _short(detail: str) -> str:
    low = detail.lower()
    said = next((said for found, said in _SHORT if found in low), detail)
    return said if len(said) <= SHORT_DETAIL_CHARS else said[:SHORT_DETAIL_CHARS - 1] + "…"


def _is_redis_auth(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and _is_auth(exc)


def scrub(text: str, settings: Settings | None) -> str:
    """`text` with every configured secret replaced by ***: URL passwords and the API key."""
    if settings is None:
        return text
    secrets = [
        _password(settings.database_url), _password(settings.broker_url or ""),
        _password(settings.redis_url or ""),
        settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
        settings.flower_password.get_secret_value() if settings.flower_password else None,
    ]
    for url in (settings.database_url, settings.broker_url, settings.redis_url):
        if url and (masked := masked_url(url)) != url:
            text = text.replace(url, masked)
    for secret in secrets:
        if secret and len(secret) >= 3:  # a one-letter "secret" would blank out every word
            text = text.replace(secret, "***")
    return text


def store_name(settings: Settings | None) -> str:
    if settings is None:
        return "the results store (DOCQ_DATABASE_URL)"
    return f"the results store {masked_url(settings.database_url)} (DOCQ_DATABASE_URL)"


def broker_name(settings: Settings | None) -> str:
    if settings is None:
        return "the broker (DOCQ_BROKER_URL)"
    if settings.broker_url is None:
        return f"the embedded Redis under {settings.home} (DOCQ_BROKER_URL is unset)"
    return f"the broker {masked_url(settings.broker_url)} (DOCQ_BROKER_URL)"


def redis_name(settings: Settings | None) -> str:
    """docqueue's own Redis, named by the setting it comes from."""
    if settings is None or settings.redis_url is None:
        return broker_name(settings)  # the broker's Redis, or the embedded one
    return f"docqueue's Redis {masked_url(settings.redis_url)} (DOCQ_REDIS_URL)"


def _redis_setting(settings: Settings | None) -> str:
    return "DOCQ_REDIS_URL" if settings is not None and settings.redis_url else "DOCQ_BROKER_URL"


def _store_error(exc: BaseException, settings: Settings | None) -> WorkerError | None:
    where = store_name(settings)
    if isinstance(exc, MissingIdentityError):
        return StoreNotMigratedError(
            f"{where} has docqueue's tables but not its identity row: run `docq db upgrade`")
    if isinstance(exc, sqlalchemy.exc.ArgumentError | sqlalchemy.exc.NoSuchModuleError):
        return InputError(f"DOCQ_DATABASE_URL is not a usable database URL ({_detail(exc)}); "
                          "use postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///PATH")
    if not isinstance(exc, sqlalchemy.exc.DBAPIError):
        return None
    detail = _detail(exc.orig if exc.orig is not None else exc)
    low = detail.lower()
    kind = type(exc.orig).__name__.lower() if exc.orig is not None else ""
    if isinstance(exc, sqlalchemy.exc.ProgrammingError | sqlalchemy.exc.OperationalError) and (
            any(m in low or m in kind for m in _NOT_MIGRATED)
            and "database" not in low and "role" not in low):
        return StoreNotMigratedError(
            f"{where} is not set up for this version of docqueue: {detail}; "
            "run `docq db upgrade` with the same DOCQ_DATABASE_URL")
    if not isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return None
    if any(m in low for m in _CREDENTIALS):
        return StoreUnavailableError(
            f"{where} refuses the credentials: {detail}; check the user and password in "
            "DOCQ_DATABASE_URL")
    if "database" in low and "does not exist" in low:
        return StoreUnavailableError(
            f"{where} names a database that does not exist: {detail}; create it "
            "(createdb) or fix the name in DOCQ_DATABASE_URL")
    if "unable to open database file" in low:
        return StoreUnavailableError(
            f"cannot open {where}: {detail}; the file's directory must exist and be writable")
    return StoreUnavailableError(
        f"cannot reach {where}: {detail}; start the database there or point "
        "DOCQ_DATABASE_URL at a running one")


def _broker_error(exc: BaseException, settings: Settings | None) -> WorkerError | None:
    if settings is not None and not settings.broker_is_redis and isinstance(
            exc, kombu.exceptions.OperationalError | amqp.exceptions.ConnectionError
            | amqp.exceptions.AccessRefused | ConnectionRefusedError):
        return _rabbitmq_error(exc, settings)
    where, setting = redis_name(settings), _redis_setting(settings)
    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.ResponseError) and (
            _is_auth(exc)):
        return BrokerUnavailableError(
            f"{where} refuses the credentials: {_detail(exc)}; check the password in "
            f"{setting} (redis://:PASSWORD@HOST:PORT/DB)")
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
                  | kombu.exceptions.OperationalError | ConnectionRefusedError):
        return BrokerUnavailableError(
            f"cannot reach {where}: {_detail(exc)}; start Redis there or point "
            f"{setting} at a running one")
    return None


def _rabbitmq_error(exc: BaseException, settings: Settings) -> WorkerError:
    # py-amqp's text starts with the failed method's ids, "(0, 0): ", which say nothing here.
    where, detail = broker_name(settings), re.sub(r"^\(\d+, \d+\): ", "", _detail(exc))
    if "ACCESS_REFUSED" in detail or "login" in detail.lower():
        return BrokerUnavailableError(
            f"{where} refuses the credentials: {detail}; check the user and password in "
            "DOCQ_BROKER_URL (amqp://USER:PASSWORD@HOST:PORT/VHOST)")
    if "vhost" in detail.lower():
        return BrokerUnavailableError(
            f"{where} has no such virtual host or refuses this user on it: {detail}; create it "
            "(rabbitmqctl add_vhost, set_permissions) or fix it in DOCQ_BROKER_URL")
    return BrokerUnavailableError(
        f"cannot reach {where}: {detail}; start RabbitMQ there or point DOCQ_BROKER_URL at a "
        "running one")


def _is_auth(exc: BaseException) -> bool:
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return True
    text = str(exc).upper()
    return any(word in text for word in ("NOAUTH", "WRONGPASS", "AUTH", "NOPERM"))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, nearest first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _detail(exc: BaseException) -> str:
    """The driver's message as a short phrase: first meaningful line, prefixes trimmed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    for prefix in ("connection failed: ", "FATAL:  ", "FATAL: "):
        text = text.removeprefix(prefix)
    text = text.replace("FATAL:  ", "").replace("Error 111 ", "").rstrip(".")
    if len(text) > MAX_DETAIL_CHARS:
        text = text[: MAX_DETAIL_CHARS - 1] + "…"
    return text


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
