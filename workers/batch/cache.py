"""The response cache: a model answer keyed by everything that shapes it, in the SQL store.

A hit is recorded as a result with zero tokens, zero cost and `cached = true`: submitting an
unchanged corpus again makes no model call at all.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from docqueue.models import CachedResponse, plan_for_now, table_of, upsert_statement
from docqueue.workers.pipelines import Prompt


class CachePolicy(enum.StrEnum):
    """What a job does with the response cache (`--cache`)."""

    USE = "use"  # answer from it where it can, store new answers
    REFRESH = "refresh"  # call again, replace what is stored
    OFF = "off"  # neither read nor write it


POLICIES = tuple(CachePolicy)


def cache_key(
    endpoint: str, model: str, version: str, prompt: Prompt, max_tokens: int, temperature: float
) -> str:
    """A hash of the endpoint, model, pipeline version, rendered prompt and generation options."""
    material = {
        "endpoint": endpoint.rstrip("/"),
        "model": model,
        "version": version,
        "messages": prompt.messages,
        "text": prompt.text,
        "response_format": prompt.response_format,
        "stop": prompt.stop,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "params": prompt.params,
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def lookup(session: Session, keys: Iterable[str]) -> dict[str, tuple[Any, str | None]]:
    """The cached (output, finish_reason) of each key that has one."""
    wanted = list(set(keys))
    if not wanted:
        return {}
    plan_for_now(session)
    rows = session.execute(
        select(CachedResponse.key, CachedResponse.output, CachedResponse.finish_reason)
        .where(CachedResponse.key.in_(wanted))
    )
    return {key: (output, finish) for key, output, finish in rows}


def store(session: Session, entries: Sequence[dict[str, Any]], *, refresh: bool) -> None:
    """Remember successful answers; `refresh` overwrites what was there."""
    if entries:
        session.execute(_store_statement(session.get_bind().dialect.name, refresh), list(entries))


@functools.cache
def _store_statement(dialect: str, refresh: bool) -> Any:
    """`store`'s upsert, built once (it runs with every batch's flush, as `leases.record`)."""
    return upsert_statement(
        dialect,
        table_of(CachedResponse),
        keys=("key",),
        update=("output", "finish_reason", "tokens_in", "tokens_out", "model") if refresh else None,
    )
