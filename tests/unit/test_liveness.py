"""Liveness rules: when a missing heartbeat means a dead owner, when a delivery knows it lapsed,
which leases a claim may take, and the fence on a delivery's writes (SQLite, the embedded
default; the same statements run on PostgreSQL in tests/integration/test_crash_safety.py)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import Batch, Chunk, Document, Job, Result, make_sessionmaker
from docqueue.workers import keys
from docqueue.workers.batch import leases, liveness
from docqueue.workers.batch.liveness import Heartbeat, trusted
from docqueue.workers.settings import Settings


def test_a_missing_heartbeat_means_dead_only_once_the_heartbeats_are_a_ttl_old() -> None:
    # Given a heartbeat TTL of 10 s
    # When Redis has no record of when the heartbeats began (it lost its data), or one 4 s old
    # Then nobody can be called dead; from 10 s on, a missing heartbeat is a dead owner
    assert not trusted(None, 1000.0, 10.0)
    assert not trusted(b"996.0", 1000.0, 10.0)
    assert trusted(b"990.0", 1000.0, 10.0)
    assert not trusted(b"garbage", 1000.0, 10.0)


def test_settings_refuse_a_heartbeat_ttl_under_two_refreshes() -> None:
    # Given a refresh every 6 s and a TTL of 10 s: one lost refresh would kill a live owner
    # When the settings are read, Then they are refused with both names
    with pytest.raises(ValidationError, match=r"DOCQ_HEARTBEAT_TTL_S .* twice DOCQ_HEARTBEAT_S"):
        Settings(heartbeat_s=6, heartbeat_ttl_s=10)
    assert Settings().heartbeat_ttl_s >= 2 * Settings().heartbeat_s


class _Pipe:
    """The few pipeline commands the heartbeat sends, acknowledged as Redis would."""

    def __init__(self, sent: list[tuple[Any, ...]]) -> None:
        self.sent, self.calls = sent, 0

    def __getattr__(self, name: str) -> Any:
        def command(*args: Any, **kwargs: Any) -> None:
            self.sent.append((name, *args))
            self.calls += 1
        return command

    async def execute(self) -> list[Any]:
        return [True] * self.calls


class _Redis:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def pipeline(self, transaction: bool = True) -> _Pipe:
        return _Pipe(self.sent)


def test_a_delivery_lapses_once_its_last_refresh_is_a_ttl_old_and_stays_lapsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(liveness, "monotonic_s", lambda: clock[0])

    async def scenario() -> tuple[bool, bool, bool, int]:
        # Given a registered delivery whose heartbeat was refreshed at t=100
        beat = Heartbeat(_Redis(), every_s=2, ttl_s=10)
        await beat.register("p:1", 7)
        fresh = beat.lapsed("p:1")
        # When its process is frozen for 30 s, then refreshes again
        clock[0] += 30
        frozen = beat.lapsed("p:1")
        sent_before = len(beat.redis.sent)
        await beat.beat()
        refreshed_keys = [c for c in beat.redis.sent[sent_before:] if "p:1" in str(c)]
        await beat.close()
        return fresh, frozen, beat.lapsed("p:1"), len(refreshed_keys)

    fresh, frozen, after, refreshed = asyncio.run(scenario())
    # Then it was alive, lapsed after the freeze, stays lapsed, and its key is not refreshed
    # (others may hold its chunks already: it must stay dead to them)
    assert (fresh, frozen, after, refreshed) == (False, True, True, 0)


# -- the store ------------------------------------------------------------------------------------


@pytest.fixture
def batch(sqlite_url: str) -> Any:
    """A running job with one batch of four chunks; yields (sessions, BatchInfo)."""
    sessions = make_sessionmaker(sqlite_url)
    with sessions.begin() as s:
        s.add(Job(id=1, status="running", pipeline="summarize", pipeline_version="v1",
                  endpoint="x", model="m", mode="chat"))
        s.flush()
        s.add(Document(id=1, job_id=1, external_id="d"))
        s.add(Batch(id=1, job_id=1, seq=1, status="queued"))
        s.flush()
        s.add_all([Chunk(id=c, job_id=1, document_id=1, batch_seq=1, seq=c, text=f"t{c}",
                         char_start=0, char_end=2, token_count=1) for c in range(1, 5)])
    with sessions.begin() as s:
        info = leases.start_delivery(s, 1)
    yield sessions, info
    sessions.kw["bind"].dispose()


def _claim(sessions: sessionmaker[Session], info: Any, owner: str, **kw: Any) -> list[int]:
    with sessions.begin() as s:
        return [w.chunk_id for w in leases.claim(s, info, owner, 60, **kw).items]


def _row(chunk_id: int, tokens: int = 10) -> leases.ResultRow:
    return leases.blank_result(chunk_id, 1, 1, 1) | {"status": "ok", "output": f"by {chunk_id}",
                                                     "tokens_in": tokens, "tokens_out": 5}


def test_a_claim_takes_a_dead_owners_leases_and_expired_ones_only_when_told(batch: Any) -> None:
    sessions, info = batch
    # Given chunks 1-2 leased by a delivery that is now dead, 3-4 by a live one whose lease
    # expired (a long call)
    assert _claim(sessions, info, "dead:1") == [1, 2, 3, 4]
    with sessions.begin() as s:
        leases.release(s, [3, 4], "dead:1")
    assert _claim(sessions, info, "live:1") == [3, 4]
    with sessions.begin() as s:
        s.query(Chunk).filter(Chunk.id.in_([3, 4])).update(
            {"lease_expires_at": datetime.now(UTC) - timedelta(seconds=5)})
    # When a new delivery claims with liveness readable
    took = _claim(sessions, info, "new:1", dead={"dead:1"}, expiry_counts=False)
    # Then it takes the dead owner's chunks and leaves the live one's, expired or not
    assert took == [1, 2]
    with sessions() as s:
        claim = leases.claim(s, info, "other:1", 60, expiry_counts=False)
    assert claim.holders == {"new:1", "live:1"} and claim.held_elsewhere == 4
    # and only with liveness unknown does expiry free a lease
    assert _claim(sessions, info, "blind:1", expiry_counts=True) == [3, 4]


def test_a_delivery_writes_only_the_rows_of_chunks_it_still_holds(batch: Any) -> None:
    sessions, info = batch
    # Given chunks 1-4 leased by a delivery that was then frozen, and chunks 1-2 taken over and
    # recorded by another
    _claim(sessions, info, "frozen:1")
    assert _claim(sessions, info, "rescuer:1", dead={"frozen:1"}, expiry_counts=False) == [
        1, 2, 3, 4]
    with sessions.begin() as s:
        leases.release(s, [3, 4], "rescuer:1")
        assert leases.record(s, "v1", [_row(1), _row(2)], owner="rescuer:1") == []
    # When the frozen delivery resumes and writes its rows for 1-4
    with sessions.begin() as s:
        dropped = leases.record(s, "v1", [_row(c, tokens=99) for c in range(1, 5)],
                                owner="frozen:1")
    # Then all four are refused (1-2 are another's results, 3-4 are nobody's lease now) and
    # the stored rows are the rescuer's
    assert sorted(r["chunk_id"] for r in dropped) == [1, 2, 3, 4]
    with sessions() as s:
        stored = s.execute(select(Result.chunk_id, Result.tokens_in)).all()
    assert sorted(stored) == [(1, 10), (2, 10)]
    # and a closer (no owner) still writes
    with sessions.begin() as s:
        assert leases.record(s, "v1", [_row(3)]) == []


# -- the rescuer's registries (real Redis) --------------------------------------------------------


def _registered(redis_url: str, client: Any) -> None:
    """A frozen worker w0's delivery of batch 7 (message m-0:0), its reservation of that
    message, and a live worker w1's reservation of another message of batch 7."""
    async def register() -> None:
        aclient = aioredis.Redis.from_url(redis_url)
        await Heartbeat(aclient, every_s=2, ttl_s=10).register("p:1", 7, "m-0:0")
        await aclient.aclose()

    asyncio.run(register())
    liveness.reserve(client, "m-0:0", 7, "w0@h")
    liveness.reserve(client, "m-1:0", 7, "w1@h")
    client.set(keys.worker_alive("w1@h"), 1)
    client.set(keys.LIVENESS_SINCE, repr(time.time() - 60))  # heartbeats began long ago


@pytest.mark.parametrize("found_first", ["delivery", "reservation"])
def test_a_message_found_dead_as_delivery_and_reservation_is_rescued_once(
    redis_url: str, redis_client: Any, found_first: str
) -> None:
    # Given w0's delivery and its reservation of one message, and w1's of another message
    _registered(redis_url, redis_client)
    # When one of w0's two heartbeats expires first and a rescuer sends what it finds dead
    if found_first == "delivery":
        redis_client.delete(keys.delivery_alive("p:1"))
        redis_client.set(keys.worker_alive("w0@h"), 1)
        first = liveness.dead_deliveries(redis_client, 10)
    else:
        first = liveness.dead_reservations(redis_client, 10)
        redis_client.set(keys.delivery_alive("p:1"), 1)
    assert [(d.batch_id, d.message) for d in first] == [(7, "m-0:0")]
    liveness.rescued(redis_client, first)
    # and then the other heartbeat expires too
    redis_client.delete(keys.delivery_alive("p:1"), keys.worker_alive("w0@h"))
    # Then nothing of w0's message is left to rescue, and w1's reservation stands
    assert liveness.dead_deliveries(redis_client, 10) == []
    assert liveness.dead_reservations(redis_client, 10) == []
    assert redis_client.hkeys(keys.RESERVED) == [b"m-1:0"]


def test_the_batches_run_at_once_are_counted_over_the_workers_up_only(redis_client: Any) -> None:
    # Given two workers up, each saying how many batches it runs at once
    liveness.beat_worker(redis_client, "w0@h", 10, 4)
    liveness.beat_worker(redis_client, "w1@h", 10, 11)
    assert liveness.batch_slots(redis_client) == 15
    # When one of them has stopped (its heartbeat gone) and the producer counts
    redis_client.delete(keys.worker_alive("w1@h"))
    # Then only the worker up counts, and the other is forgotten
    assert liveness.batch_slots(redis_client) == 4
    assert redis_client.hkeys(keys.WORKER_SLOTS) == [b"w0@h"]
    # and with nobody up, nothing is
    redis_client.delete(keys.worker_alive("w0@h"))
    assert liveness.batch_slots(redis_client) == 0
