"""Which deliveries are alive: one heartbeat per lease owner, kept in Redis by its process.

A delivery (one run of one batch, the owner of its chunk leases) registers before it claims
anything: its heartbeat key (`keys.delivery_alive`, TTL `heartbeat_ttl_s`) and an entry in the
registry of deliveries (`keys.DELIVERIES`: owner -> "batch id, message"; the message is its task
message's reservation tag, below). Its process's event loop
refreshes the keys of all its deliveries every `heartbeat_s`, and a delivery that ends deletes
both. So, for any lease owner:

- heartbeat key present: the owner's process is alive and its loop runs; its leases stand,
  whatever their expiry says;
- key gone while the record is trusted: the owner is dead (killed, frozen, cut off): its leases
  are free at once, and the registry still names its batch, so a rescuer sends it again;
- record not trusted (`keys.LIVENESS_SINCE` missing or younger than one TTL, as after Redis lost
  its data): nobody can tell, and the store's lease expiry decides, as before heartbeats.

A process that was frozen or cut off from Redis for a TTL knows it, without asking anyone:
`lapsed(owner)` turns true (and stays so) once the last refresh that reached Redis is older than
the TTL less a margin. A lapsed delivery starts no further call and hands its batch on; what it
still writes is fenced in the store by the lease owner (`leases.record`).

A message a worker has received but not started yet (its pool process still starting, or
between two batches) has no delivery: the worker's main process records it in
`keys.RESERVED` with its hostname and keeps a heartbeat of its own (`keys.worker_alive`); the
task removes the entry when it ends, so no moment from receipt to end goes unvouched. A
reservation whose worker's heartbeat is gone is rescued like a dead delivery; one whose worker
lives but no longer has the message (its broker connection was lost, or it is a new worker under
a dead one's name) is sent again by that worker as its consumer starts (`stale_reservations`).
A killed or frozen worker's batch is found dead twice, as a delivery and as a reservation, up to
a heartbeat apart (the two heartbeats are refreshed by different loops): the entries name the
same message, and the first rescue forgets both.

Liveness is the event loop's, not a thread's: a loop that cannot run a heartbeat cannot run its
calls either, and a process that cannot reach Redis cannot take part in the limiter; both look
dead after a TTL, which costs at most the calls they had in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from docqueue.workers import keys
from docqueue.workers.clock import monotonic_s, wall_s

logger = logging.getLogger(__name__)

# A refresh counts from just before it is sent; this covers its trip to Redis and clock rates.
LAPSE_MARGIN_S = 1.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One registered delivery: the lease owner, and the batch it works on."""

    owner: str
    batch_id: int
    message: str = ""  # the reservation tag of its task message; "" when unknown


def trusted(since: bytes | str | None, now_s: float, ttl_s: float) -> bool:
    """Whether a missing heartbeat means a dead owner: the heartbeats began a full TTL ago.

    `since` is the value of `keys.LIVENESS_SINCE` (set by the first heartbeat after Redis came
    up empty); right after a Redis loss every live owner has had no chance to beat yet.
    """
    if since is None:
        return False
    try:
        return now_s - float(since) >= ttl_s
    except ValueError:
        return False


@dataclass
class _Beat:
    batch_id: int
    last_ok: float  # monotonic time just before the last refresh that Redis acknowledged
    lapsed: bool = False


class Heartbeat:
    """This process's deliveries, kept alive in Redis by a task on the process's event loop.

    `redis` is an asyncio client of its own (one connection suffices): a heartbeat must not
    queue behind the model calls for a connection of the shared pool.
    """

    def __init__(self, redis: Any, every_s: float, ttl_s: float) -> None:
        self.redis, self.every_s, self.ttl_s = redis, every_s, ttl_s
        self._beats: dict[str, _Beat] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def owners(self) -> list[str]:
        return list(self._beats)

    async def register(self, owner: str, batch_id: int, message: str = "") -> None:
        """Make `owner` alive before it claims a lease; raises if Redis cannot be reached.
        `message`: the reservation tag of the task message it runs, if any."""
        t0 = monotonic_s()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.delivery_alive(owner), os.getpid(), ex=_whole_s(self.ttl_s))
        pipe.hset(keys.DELIVERIES, owner, f"{batch_id} {message}".rstrip())
        pipe.set(keys.LIVENESS_SINCE, repr(wall_s()), nx=True)
        await pipe.execute()
        self._beats[owner] = _Beat(batch_id, t0)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat")

    async def unregister(self, owner: str) -> None:
        """The delivery ended: its leases are free at once, and nobody is to rescue it."""
        self._beats.pop(owner, None)
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(keys.delivery_alive(owner))
        pipe.hdel(keys.DELIVERIES, owner)
        try:
            await pipe.execute()
        except Exception as exc:
            logger.warning("delivery %s: could not end its heartbeat (%s); it expires in %gs",
                           owner, type(exc).__name__, self.ttl_s)

    def lapsed(self, owner: str) -> bool:
        """True once `owner` went a TTL without a refresh reaching Redis: others may have taken
        its leases. Sticky: a delivery that lapsed stays lapsed."""
        beat = self._beats.get(owner)
        if beat is None:
            return False
        if not beat.lapsed and monotonic_s() - beat.last_ok > self.ttl_s - LAPSE_MARGIN_S:
            beat.lapsed = True
            logger.warning("delivery %s (batch %s): no heartbeat reached Redis for %.0fs (this "
                           "process was frozen or cut off); it hands its batch on", owner,
                           beat.batch_id, monotonic_s() - beat.last_ok)
        return beat.lapsed

    async def beat(self) -> None:
        """Refresh every live delivery's key; a lapsed one is left to expire (it is dead to the
        others, and must stay so: they may hold its chunks already)."""
        live = [o for o in list(self._beats) if not self.lapsed(o)]
        t0 = monotonic_s()
        pipe = self.redis.pipeline(transaction=False)
        for owner in live:
            pipe.set(keys.delivery_alive(owner), os.getpid(), ex=_whole_s(self.ttl_s))
        pipe.set(keys.LIVENESS_SINCE, repr(wall_s()), nx=True)
        await pipe.execute()
        for owner in live:
            beat = self._beats.get(owner)
            if beat is not None and not beat.lapsed:
                beat.last_ok = t0

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            if not self._beats:
                continue
            try:
                await asyncio.wait_for(self.beat(), timeout=self.every_s * 2)
            except Exception as exc:
                if not self._failing:
                    logger.warning("heartbeat: cannot reach Redis (%s); deliveries lapse after "
                                   "%gs without it", type(exc).__name__, self.ttl_s)
                self._failing = True
            else:
                self._failing = False

    async def dead(self, owners: Collection[str]) -> set[str] | None:
        """Those of `owners` whose heartbeat is gone; None when the record cannot be trusted
        (Redis lost it lately, or cannot be read): then only lease expiry frees a lease."""
        wanted = list(owners)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(keys.LIVENESS_SINCE)
            for owner in wanted:
                pipe.exists(keys.delivery_alive(owner))
            since, *present = await pipe.execute()
        except Exception as exc:
            logger.warning("liveness unknown (%s): leases stand until they expire",
                           type(exc).__name__)
            return None
        if not trusted(since, wall_s(), self.ttl_s):
            return None
        return {o for o, alive in zip(wanted, present, strict=True) if not alive}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def _whole_s(seconds: float) -> int:
    return max(1, round(seconds))


# -- the rescuer's side, with a synchronous redis-py client (the callers in tasks/ own it) --------


def dead_deliveries(client: Any, ttl_s: float) -> list[Delivery]:
    """Registered deliveries whose heartbeat is gone, if the record can be trusted."""
    registry: Mapping[bytes, bytes] = client.hgetall(keys.DELIVERIES)
    if not registry:
        return []
    owners = [o.decode() for o in registry]
    present = _heartbeats(client, [keys.delivery_alive(o) for o in owners], ttl_s)
    if present is None:
        return []
    dead = []
    for (owner, value), alive in zip(zip(owners, registry.values(), strict=True), present,
                                     strict=True):
        if alive:
            continue
        batch, _, message = value.decode().partition(" ")
        try:
            dead.append(Delivery(owner, int(batch), message))
        except ValueError:  # not ours to read: drop it, so it is not looked at every time
            client.hdel(keys.DELIVERIES, owner)
    return dead


RESCUE_LOCK_S = 30  # a rescuer that died before sending leaves the rescue to another after this


def take_rescue(client: Any, delivery: Delivery) -> bool:
    """Claim the rescue of a dead delivery or reservation: true for one caller at a time. The
    entry stays registered until `rescued`, so a rescuer killed before it sent the batch (the
    rescuers are worker processes) leaves it to another once the lock expires."""
    return bool(client.set(keys.rescue_lock(delivery.owner), os.getpid(), nx=True,
                           ex=RESCUE_LOCK_S))


def rescued(client: Any, deliveries: Collection[Delivery]) -> None:
    """The batches are sent again: forget the dead entries (either registry), and the other
    entry of each one's message (a dead delivery's reservation, a dead reservation's delivery),
    so that a message found dead twice is sent again once."""
    owners = [d.owner for d in deliveries]
    if not owners:
        return
    messages = {d.message for d in deliveries if d.message}
    twins = [owner.decode() for owner, value in client.hgetall(keys.DELIVERIES).items()
             if value.decode().partition(" ")[2] in messages] if messages else []
    pipe = client.pipeline(transaction=False)
    pipe.hdel(keys.DELIVERIES, *owners, *twins)
    pipe.hdel(keys.RESERVED, *owners, *messages)
    pipe.execute()


def beat_worker(client: Any, hostname: str, ttl_s: float, batches: int) -> None:
    """A worker's main process vouches for the messages it received and has not started, and
    says how many batches it runs at once (`batch_slots`)."""
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.worker_alive(hostname), os.getpid(), ex=_whole_s(ttl_s))
    pipe.set(keys.LIVENESS_SINCE, repr(wall_s()), nx=True)
    pipe.hset(keys.WORKER_SLOTS, hostname, batches)
    pipe.execute()


def batch_slots(client: Any) -> int:
    """How many batches the workers up now run at once, all together (0: none is up).

    A worker that stopped leaves its entry behind; it no longer counts once its heartbeat has
    gone, and is forgotten here."""
    slots: Mapping[bytes, bytes] = client.hgetall(keys.WORKER_SLOTS)
    if not slots:
        return 0
    hosts = list(slots)
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.exists(keys.worker_alive(host.decode()))
    present = pipe.execute()
    gone = [h for h, up in zip(hosts, present, strict=True) if not up]
    if gone:
        client.hdel(keys.WORKER_SLOTS, *gone)
    return sum(int(slots[h]) for h, up in zip(hosts, present, strict=True)
               if up and slots[h].isdigit())


def reserve(client: Any, tag: str, batch_id: int, hostname: str) -> None:
    """Record a received batch message until a delivery starts it (`unreserve`)."""
    client.hset(keys.RESERVED, tag, f"{batch_id} {hostname}")


def unreserve(client: Any, tag: str) -> None:
    client.hdel(keys.RESERVED, tag)


def stale_reservations(client: Any, hostname: str, keep: Collection[str] = ()) -> list[Delivery]:
    """`hostname`'s reservations but the tags in `keep` (owner: the tag).

    For a worker whose consumer (re)starts: the messages it had received and not started are
    gone from its memory (Celery drops them with a lost connection; a worker restarted under
    the same name never had them), yet its live heartbeat would vouch for them forever.
    """
    registry: Mapping[bytes, bytes] = client.hgetall(keys.RESERVED)
    stale = []
    for tag, value in registry.items():
        batch, _, host = value.decode().partition(" ")
        if host == hostname and tag.decode() not in keep and batch.isdigit():
            stale.append(Delivery(tag.decode(), int(batch), tag.decode()))
    return stale


def dead_reservations(client: Any, ttl_s: float) -> list[Delivery]:
    """Received, unstarted batch messages whose worker's heartbeat is gone (owner: the tag)."""
    registry: Mapping[bytes, bytes] = client.hgetall(keys.RESERVED)
    if not registry:
        return []
    entries = []
    for tag, value in registry.items():
        batch, _, host = value.decode().partition(" ")
        try:
            entries.append((tag.decode(), int(batch), host))
        except ValueError:
            client.hdel(keys.RESERVED, tag)
    hosts = sorted({host for _, _, host in entries})
    present = _heartbeats(client, [keys.worker_alive(h) for h in hosts], ttl_s)
    if present is None:
        return []
    alive = {h for h, up in zip(hosts, present, strict=True) if up}
    return [Delivery(tag, batch, tag) for tag, batch, host in entries if host not in alive]


def held_batches(client: Any, ttl_s: float) -> set[int] | None:
    """The batches some message is vouched for: named by a registered delivery or reservation,
    alive or not found dead yet (a dead one is the rescuer's). None while the registries cannot
    be trusted (Redis lost its data less than a TTL ago): an entry may be missing then."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.LIVENESS_SINCE)
    pipe.hvals(keys.DELIVERIES)
    pipe.hvals(keys.RESERVED)
    since, deliveries, reservations = pipe.execute()
    if not trusted(since, wall_s(), ttl_s):
        return None
    held = set()
    for value in (*deliveries, *reservations):
        batch = value.decode().partition(" ")[0]
        if batch.isdigit():
            held.add(int(batch))
    return held


DEATHS_KEPT, DEATHS_TTL_S = 20, 86_400


def record_death(client: Any, pid: int, cause: str) -> list[int]:
    """Note `cause` against every batch a delivery of process `pid` was working on; their ids.

    Called by the process's supervisor (`docq worker`) when it sees the process end badly, a
    moment after the death, while the dead deliveries are still registered. A lease owner is
    "<pid>:<delivery>" (tasks/batches.py).
    """
    registry: Mapping[bytes, bytes] = client.hgetall(keys.DELIVERIES)
    prefix = f"{pid}:".encode()
    batches = sorted({int(v.decode().partition(" ")[0]) for o, v in registry.items()
                      if o.startswith(prefix) and v.decode().partition(" ")[0].isdigit()})
    if batches:
        pipe = client.pipeline(transaction=False)
        for batch_id in batches:
            key = keys.batch_deaths(batch_id)
            pipe.lpush(key, cause)
            pipe.ltrim(key, 0, DEATHS_KEPT - 1)
            pipe.expire(key, DEATHS_TTL_S)
        pipe.execute()
    return batches


async def batch_deaths(redis: Any, batch_id: int) -> list[str]:
    """The causes of death recorded for the batch's deliveries, newest first."""
    return [c.decode() if isinstance(c, bytes) else str(c)
            for c in await redis.lrange(keys.batch_deaths(batch_id), 0, -1)]


def _heartbeats(client: Any, heartbeat_keys: list[str], ttl_s: float) -> list[int] | None:
    """Whether each heartbeat key exists, in one round trip; None while a missing heartbeat
    cannot be trusted to mean a dead owner (Redis lost its data less than a TTL ago)."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.LIVENESS_SINCE)
    for key in heartbeat_keys:
        pipe.exists(key)
    since, *present = pipe.execute()
    return present if trusted(since, wall_s(), ttl_s) else None
