"""Every Redis key docqueue writes, in one place (Celery's and kombu's own keys are theirs).

Redis holds transport and coordination only; losing any of these loses no result (the store is
the system of record), only time: the reconciler rebuilds what matters.
"""

from __future__ import annotations

PREFIX = "docq"


def job_published(job_id: int) -> str:
    """Set once a job's chord is out; its absence after a Redis loss tells the reconciler."""
    return f"{PREFIX}:job:{job_id}:published"


def job_producer(job_id: int) -> str:
    """The producer's heartbeat: present (with a short TTL) while a `submit` or `docq resume`
    is still recording the job's documents; `docq resume` will not record them a second time
    beside it."""
    return f"{PREFIX}:job:{job_id}:producer"


def job_stop(job_id: int) -> str:
    """Set by `docq cancel` (or a spent budget, or a refused API key): the job's batches make
    no further call."""
    return f"{PREFIX}:job:{job_id}:stop"


def job_spend(job_id: int) -> tuple[str, str]:
    """The job's running spend: tokens and cost, primed from the store."""
    return f"{PREFIX}:job:{job_id}:tokens", f"{PREFIX}:job:{job_id}:cost"


def delivery_alive(owner: str) -> str:
    """A delivery's heartbeat: present (with a short TTL) while its process is alive."""
    return f"{PREFIX}:delivery:{owner}:alive"


def worker_alive(hostname: str) -> str:
    """A worker's main process's heartbeat: it vouches for the messages it has received."""
    return f"{PREFIX}:worker:{hostname}:alive"


def rescue_lock(owner: str) -> str:
    """Held by the rescuer sending a dead delivery's batch again, until it has sent it."""
    return f"{PREFIX}:rescue:{owner}"


def batch_deaths(batch_id: int) -> str:
    """List: how the processes died that were delivering this batch, newest first."""
    return f"{PREFIX}:batch:{batch_id}:deaths"


RESERVED = f"{PREFIX}:reserved"  # hash: "task_id:retries" -> "batch_id hostname", not ended
DELIVERIES = f"{PREFIX}:deliveries"  # hash: lease owner -> "batch id, message tag", live ones
LIVENESS_SINCE = f"{PREFIX}:liveness:since"  # when the heartbeats began (after a Redis loss)
ABANDONED_BATCHES = f"{PREFIX}:batches:abandoned"  # set: batches a worker gave up on
RECONCILE_LOCK = f"{PREFIX}:reconcile:lock"  # one reconciler at a time
WORKER_SLOTS = f"{PREFIX}:workers:slots"  # hash: worker hostname -> batches it runs at once
WORKERS_RSS = f"{PREFIX}:workers:rss"  # hash: each worker process's memory report


def schedule_lock(name: str) -> str:
    """Held by the beat that runs a schedule's window (two beats: one run)."""
    return f"{PREFIX}:schedule:{name}:lock"


def limiter_scope(endpoint_hash: str, model: str, key_fingerprint: str) -> str:
    """The limiter's scope for one endpoint, model and key; its keys hang off it (lua/)."""
    return f"{PREFIX}:lim:{endpoint_hash}:{model}:{key_fingerprint}"


def lane_lock(job_id: int) -> str:
    """Held while one process advances a batch-lane job (workers/jobs/lane.py)."""
    return f"{PREFIX}:lane:{job_id}:lock"


def job_refusal(job_id: int) -> str:
    """What the endpoint said when it refused the job's API key (a 401 or 403): the job's stop
    flag says `refused`, and its unsent chunks fail with these words (batch/guard.py)."""
    return f"{PREFIX}:job:{job_id}:refusal"


def job_trouble(job_id: int) -> str:
    """What is wrong with the job's calls just now (batch/trouble.py): a JSON string with a
    short TTL, refreshed while its calls fail for one cause, deleted by the next call that
    succeeds."""
    return f"{PREFIX}:job:{job_id}:trouble"
