"""The reconciler's rules: which batches are sent again, and when a job is merged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from docqueue.workers.jobs.reconcile import BatchState, JobState, plan_job

T = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
VT = 3600.0


def ago(seconds: float) -> datetime:
    return T - timedelta(seconds=seconds)


def batch(
    bid: int, unfinished: int = 5, leased: int = 0, expired: int = 0, seen: float | None = None
) -> BatchState:
    return BatchState(bid, bid, unfinished, leased, expired, None if seen is None else ago(seen))


def job(*batches: BatchState, last_s: float | None = 10.0) -> JobState:
    return JobState(7, "running", list(batches), None if last_s is None else ago(last_s))


def plan(j: JobState, **kw: object) -> tuple[list[int], bool]:
    args: dict[str, object] = {"published": True, "lost_after_s": 2 * VT, "at": T, **kw}
    p = plan_job(j, **args)  # type: ignore[arg-type]
    return p.resend, p.merge


def test_with_the_marker_a_queued_batch_is_left_to_redis_however_old() -> None:
    # Given a job published a day ago whose batches were never delivered (a long queue)
    j = job(batch(1, seen=None), batch(2, seen=None), last_s=86_400)
    # When the reconciler looks at it with its marker present
    # Then nothing is sent again and nothing merged
    assert plan(j) == ([], False)


def test_without_the_marker_every_batch_nobody_works_on_is_sent_again() -> None:
    # Given a job whose marker is gone (Redis flushed): one batch under a live lease, one
    # never delivered, one whose delivery died, one already finished
    j = job(batch(1, leased=5, seen=3), batch(2), batch(3, expired=5, seen=30),
            batch(4, unfinished=0, seen=20))
    # When the reconciler plans it
    p = plan_job(j, published=False, lost_after_s=2 * VT, at=T)
    # Then the unfinished batches without a live lease are sent again, the leased one is left
    # to its delivery, and the job is not merged yet
    assert p.resend == [2, 3] and not p.merge and p.in_progress == 1


def test_with_the_marker_only_a_dead_delivery_unseen_for_too_long_counts_as_lost() -> None:
    # Given a batch whose delivery died holding its leases long ago, one that died recently,
    # and one released normally long ago (a retry waiting in the queue)
    j = job(batch(1, expired=5, seen=2 * VT + 60), batch(2, expired=5, seen=VT),
            batch(3, seen=3 * VT))
    # When the reconciler plans it with the marker present
    # Then only the first is sent again: Redis is still due to redeliver the second, and the
    # third's retry message may still be waiting in the queue
    assert plan(j) == ([1], False)


def test_a_batch_whose_task_gave_up_is_sent_again_unless_a_delivery_holds_it() -> None:
    # Given two batches whose tasks gave up (the store was down for minutes), one of them
    # since taken by a live delivery, and a third that was never delivered
    j = job(batch(1, seen=30), batch(2, leased=4, seen=1), batch(3))
    # When the reconciler plans the job with the marker present
    # Then only the free abandoned batch is sent again
    assert plan(j, abandoned={1, 2}) == ([1], False)


def test_a_job_whose_chunks_are_all_final_is_merged_after_a_grace_period() -> None:
    # Given a job whose open batches have no unfinished chunk (the callback was lost)
    finished_long_ago = job(batch(1, unfinished=0), last_s=600)
    finished_now = job(batch(1, unfinished=0), last_s=5)
    # When the reconciler plans them with a 60 s grace
    # Then the old one is merged, the fresh one left to its own chord callback
    assert plan(finished_long_ago, merge_grace_s=60) == ([], True)
    assert plan(finished_now, merge_grace_s=60) == ([], False)
    # and a forced resume merges at once
    assert plan(finished_now, merge_grace_s=60, force=True) == ([], True)


def test_a_job_with_no_batches_at_all_is_merged() -> None:
    # Given a running job whose every document was rejected (no chunks, no batches)
    # When the reconciler plans it
    # Then it is merged, which gives it its final status
    assert plan(job(last_s=None)) == ([], True)


def test_force_sends_everything_nobody_holds_even_with_the_marker() -> None:
    # Given a job with a queued batch and one under a live lease, marker present
    j = job(batch(1), batch(2, leased=3, seen=1))
    # When it is resumed by hand
    resend, merge = plan(j, force=True)
    # Then the free batch is sent again, the leased one is not
    assert (resend, merge) == ([1], False)


# -- the memory guard's arithmetic (tasks/maintenance.py) ----------------------------------------


def test_a_pool_process_born_above_half_the_limit_is_warned_about() -> None:
    from docqueue.tasks.maintenance import baseline_warning

    # Given a 1024 MB limit
    # When pool processes start at 300 MB and at 600 MB
    # Then only the second gets a warning, naming the setting and the size
    assert baseline_warning(300, 1024) is None
    warning = baseline_warning(600, 1024)
    assert warning is not None
    assert "600 MB" in warning and "DOCQ_WORKER_MAX_MEMORY_MB=1024" in warning
    # and a limit of 0 (off) never warns
    assert baseline_warning(5000, 0) is None


def test_the_memory_limit_reaches_celery_in_kib_and_zero_turns_it_off() -> None:
    from docqueue.tasks.runtime import max_memory_kib
    from docqueue.workers.settings import Settings

    class WithLimit(Settings):
        worker_max_memory_mb: float = 512

    class Off(Settings):
        worker_max_memory_mb: float = 0

    # Given settings with a 512 MB limit, with the limit off, and without the field
    # Then Celery gets 512 * 1024 KiB, None (no limit), and the 1024 MB default
    assert max_memory_kib(WithLimit()) == 512 * 1024
    assert max_memory_kib(Off()) is None
    assert max_memory_kib(Settings()) == 1024 * 1024


def test_the_workers_table_shows_each_process_against_the_limit() -> None:
    from docqueue.tasks.maintenance import format_worker_memory

    # Given a worker's main process and one pool process at 80% of a 100 MB limit
    rows = [
        {"hostname": "w0@host", "pid": 10, "role": "main", "rss_mb": 60.0, "limit_mb": 100.0},
        {"hostname": "w0@host", "pid": 11, "role": "pool", "rss_mb": 80.0, "limit_mb": 100.0},
    ]
    # When they are formatted
    lines = format_worker_memory(rows).splitlines()
    # Then there is a header and one line per process, the pool one with its share
    assert len(lines) == 3
    assert "w0@host" in lines[2] and "80.0" in lines[2] and "80%" in lines[2]
    assert format_worker_memory([]).startswith("no worker has reported")


# -- what the store says (SQLite, the embedded default) -------------------------------------------


def test_open_jobs_reads_unfinished_leased_and_expired_chunks_per_batch(sqlite_url: str) -> None:
    from docqueue.models import Batch, Chunk, Document, Job, Result, make_sessionmaker
    from docqueue.workers.jobs.reconcile import open_jobs

    # Given a running job of three batches of two chunks: batch 1 finished, batch 2 with one
    # chunk under a live lease and one under an expired one, batch 3 never touched; and a
    # job that already succeeded
    sessions = make_sessionmaker(sqlite_url)
    with sessions.begin() as s:
        common = {"pipeline": "summarize", "pipeline_version": "v1", "endpoint": "x",
                  "model": "m", "mode": "chat"}
        s.add_all([Job(id=1, status="running", submitted_at=ago(100), **common),
                   Job(id=2, status="succeeded", **common)])
        s.flush()  # no ORM relationships: insert parents first
        s.add(Document(id=1, job_id=1, external_id="d"))
        s.add_all([Batch(id=10 + seq, job_id=1, seq=seq, status="queued",
                         updated_at=ago(50 - seq)) for seq in (1, 2, 3)])
        s.flush()
        leases = {3: ("a", T + timedelta(days=9999)), 4: ("b", ago(5))}
        for cid in range(1, 7):
            owner, until = leases.get(cid, (None, None))
            s.add(Chunk(id=cid, job_id=1, document_id=1, batch_seq=(cid + 1) // 2, seq=cid,
                        text="t", char_start=0, char_end=1, token_count=1, lease_owner=owner,
                        lease_expires_at=until))
        s.flush()
        s.add_all([Result(chunk_id=c, document_id=1, job_id=1, pipeline_version="v1",
                          status=state) for c, state in ((1, "ok"), (2, "error"), (3, "retry"))])
    # When the reconciler reads the open jobs
    with sessions() as s:
        jobs = open_jobs(s)
    # Then only the running job is open, with its batches as they are
    assert [j.job_id for j in jobs] == [1]
    got = {b.seq: (b.unfinished, b.leased, b.expired) for b in jobs[0].batches}
    assert got == {1: (0, 0, 0), 2: (2, 1, 1), 3: (2, 0, 0)}
    assert jobs[0].last_activity == ago(47) and not jobs[0].all_final
    sessions.kw["bind"].dispose()


def test_with_the_queues_empty_a_batch_nobody_holds_lost_its_message() -> None:
    # Given, with the marker present and the broker's queues empty: a batch never delivered
    # (its message lost in a Redis crash), one a worker has received, one whose delivery is
    # registered, and one sent again a moment ago
    j = job(batch(1), batch(2), batch(3, seen=120), batch(4, seen=2), last_s=120)
    # When the reconciler plans it, two of them held, with a 10 s settle
    resend, _ = plan(j, queues_empty=True, held={2, 3}, settle_s=10)
    # Then only the batch nothing holds and nothing stirred lately is sent again
    assert resend == [1]


def test_a_batch_nobody_holds_is_left_alone_while_a_queue_has_messages_or_holders_are_unknown(
) -> None:
    # Given a batch never delivered in a job quiet for two minutes
    j = job(batch(1), last_s=120)
    # When a queue still holds messages (it may be one of them), or the registries are not
    # trusted yet (Redis restarted less than a heartbeat TTL ago)
    # Then nothing is sent again
    assert plan(j, queues_empty=False, held=set(), settle_s=10) == ([], False)
    assert plan(j, queues_empty=True, held=None, settle_s=10) == ([], False)


def test_a_never_sent_batch_of_a_job_that_stirred_just_now_is_not_an_orphan_yet() -> None:
    # Given a streaming job whose producer committed a batch a moment before sending it, and
    # whose other batch was delivered 2 s ago
    j = job(batch(1, seen=2), batch(2), last_s=2)
    # When the reconciler looks with the queues empty
    # Then the new batch is not sent: its own message is on its way
    assert plan(j, queues_empty=True, held={1}, settle_s=10) == ([], False)
