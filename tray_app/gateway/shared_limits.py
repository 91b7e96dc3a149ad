"""The limits on Redis, shared by every replica of a team's gateway.

Each update is one Lua script, so two replicas never read the same count and both act on it:
the token buckets (requests per minute per principal, failed authentications and pairing
attempts per address group) and concurrency as expiring leases (a sorted set per principal,
member = lease id, score = when it expires). A replica renews the leases it holds every third
of ``state.lease_seconds``; one that crashes stops renewing, and its callers' places free
themselves. Every script reads Redis's own clock (TIME), so the replicas' clocks do not matter.
Each upstream's generation slots (``queue.generations_in_flight``) are leases of the same kind,
so two replicas in front of one LM Studio run no more at once than one would: a generation that
has its turn in its replica's fair queue then waits for a slot here (a slot this replica gives
back wakes its waiters at once; others' are noticed by asking again every ``SLOT_POLL_SECONDS``).
Budgets' reservations are leases of the same kind, held in the principal's own set
(:mod:`tray_app.gateway.shared_budgets` runs its scripts through :meth:`SharedLimits.evaluate`).

While Redis cannot be reached the policy (``state.when_redis_is_down``) decides: closed refuses
the request (503 ``shared_limits_unavailable``), open lets it through without these limits and
logs a warning once per outage. A rate, concurrency or guessing limit is never counted in this
process alone (N replicas would let N times it through); a budget is, under the open policy
(each replica holds it against what it knows, and its counters start again from the database
once Redis is back). An outage is noticed by a failed call (a script Redis refuses is not
one: only that request fails); from then on no
request waits on Redis, and a probe in the background finds it back, so limits return by
themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from tray_app.config.parsers import WhenRedisIsDown
from tray_app.config.settings import Config
from tray_app.gateway import api_errors as errors
from tray_app.gateway.limits import Bucket, bucket_rates
from tray_app.tasks import spawn, wait_for_event

log = logging.getLogger("lmgate.gateway.shared_limits")

T = TypeVar("T")

PREFIX = "lmgate:"
# A hung Redis must not hang requests: every connect and every answer within this.
TIMEOUT_SECONDS = 1.0
# Connections per replica; a request waits at most TIMEOUT_SECONDS for a free one.
MAX_CONNECTIONS = 32
# How often, during an outage, a probe asks whether Redis is back.
PROBE_SECONDS = 0.5
# What a client is told to wait in closed mode: about how soon a probe can find Redis back.
RETRY_AFTER_SECONDS = 1.0
# How long a refused place is asked for once more: a release on its way from another replica
# reaches Redis within a round trip or two.
RELEASE_GRACE_SECONDS = 0.05
# How often a generation waiting for a slot another replica holds asks whether one is free.
SLOT_POLL_SECONDS = 0.05

# KEYS[1] the bucket (a hash: tokens, at); ARGV capacity, tokens per second.
# Returns false when a token was spent, else the seconds until one is there (as a string:
# Redis would truncate a Lua number to an integer).
TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
elseif now > at then
  tokens = math.min(capacity, tokens + (now - at) * rate)
end
if tokens < 1 then
  return tostring((1 - tokens) / rate)
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
-- Once full again the bucket is the same as none: it expires then.
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return false
"""

# KEYS[1] the principal's leases (a sorted set: lease id -> expiry in ms); ARGV lease id, cap,
# lease ms. Expired leases (a crashed replica's) are dropped first. 1 admitted, 0 at the cap.
ACQUIRE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lease_ms = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease_ms, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease_ms)
return 1
"""

# KEYS[1] the principal's leases; ARGV lease ms, then the lease ids this replica holds there.
# XX: a lease that already expired (or was released meanwhile) is not brought back, which
# could put the principal over the cap; the request it belonged to just runs on uncounted.
RENEW = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease_ms)
return 0
"""

# The same for budgets' reservations, which are put back if they lapsed (Redis restarted, or
# this replica was cut off past lease_seconds): one missing would let the other replicas admit
# past the budget, while one put back for a request still running can only refuse.
RENEW_RESERVATIONS = RENEW.replace("'XX', ", "")
# Keys whose leases RENEW_RESERVATIONS renews (tray_app.gateway.shared_budgets's).
RESERVATIONS_PREFIX = PREFIX + "budget:"


class SharedLimits:
    """The :class:`tray_app.gateway.limits.Limits` of a team's gateway, on Redis at ``url``.
    Made anywhere; the client is opened by :meth:`open` on the gateway's loop (the gateway
    does it while it serves) and closed by :meth:`close`."""

    def __init__(self, config: Config, url: str) -> None:
        self._url = url
        self._closed_when_down = config.state_when_redis_is_down is WhenRedisIsDown.CLOSED
        self._rates = {bucket: rate / 60.0 for bucket, rate in bucket_rates(config).items()}
        self._capacity = dict(bucket_rates(config))
        self._cap = config.limits_concurrent_requests
        self._slots = config.queue_generations_in_flight
        # An upstream's slots key -> set when this replica gives one of its slots back.
        self._slot_freed: dict[str, asyncio.Event] = {}
        self.lease_seconds = config.state_lease_seconds
        self._lease_ms = max(1, round(config.state_lease_seconds * 1000))
        # Lease ids are this replica's: another's renewals never touch them.
        self._replica = secrets.token_hex(8)
        self._serial = itertools.count(1)
        self._held: dict[str, set[str]] = {}  # Redis key -> lease ids this replica holds there
        self._scripts: dict[str, AsyncScript] = {}  # by source, registered once opened
        self._client: Redis | None = None
        self._down = True  # until open() reached Redis: nothing is known yet
        self._outage = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._releases: set[asyncio.Task[object]] = set()
        # Principal -> its releases on their way to Redis: a place this replica gave back a
        # moment ago is free, even if Redis has not heard yet.
        self._releasing: dict[str, set[asyncio.Task[object]]] = {}

    # ---- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        pool = BlockingConnectionPool.from_url(
            self._url,
            max_connections=MAX_CONNECTIONS,
            timeout=TIMEOUT_SECONDS,
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
            # One quick retry on a broken connection: after Redis restarts, each pooled
            # connection fails once before it reconnects, and that is no outage. A timeout
            # is not retried: it already took its second.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        client = self._client = Redis.from_pool(pool)  # closed with the client
        self._take = client.register_script(TAKE)
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)
        self._renew_reservations = client.register_script(RENEW_RESERVATIONS)
        self._scripts = {source: client.register_script(source) for source in self._scripts}
        if await self._ping():
            self._back()
        else:
            self._lost("at the start")
        self._closing = False
        self._task = spawn(self._keep_up(), name="shared-limits")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._closing = True
            # Cancelled again until it ends: a cancellation that lands as a Redis call times
            # out can come back as that timeout (Python 3.11), which the loop lives through.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=PROBE_SECONDS)
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=TIMEOUT_SECONDS)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def available(self) -> bool:
        """Whether Redis answers (as the last call or probe found)."""
        return not self._down

    @property
    def fails_open(self) -> bool:
        return not self._closed_when_down

    # ---- the Limits protocol --------------------------------------------------------------

    async def take(self, bucket: Bucket, key: str) -> float | None:
        rate = self._rates[bucket]
        wait = await self._call(
            lambda: self._take(
                keys=[f"{PREFIX}{bucket.value}:{key}"], args=[self._capacity[bucket], rate]
            ),
            allowed=None,
        )
        return None if wait is None else float(wait)

    async def acquire(self, principal: str) -> str | None:
        return await self._shielded(self._take_place(principal), self._leases_key(principal))

    async def _shielded(self, taking: Coroutine[Any, Any, str | None], key: str) -> str | None:
        """The lease ``taking`` gets. Shielded: a caller that hangs up while Redis answers
        would leave a lease there that nobody renews or gives back (and its caller, or the
        upstream, a place short for lease_seconds)."""
        asking = spawn(taking, name="shared-limits-lease")
        try:
            return await asyncio.shield(asking)
        except asyncio.CancelledError:
            asking.add_done_callback(functools.partial(self._give_back_unwanted, key))
            raise

    def _give_back_unwanted(self, key: str, asking: asyncio.Future[str | None]) -> None:
        if not asking.cancelled() and asking.exception() is None and (lease := asking.result()):
            self._give_back(key, lease)
            self._tell_slot_freed(key)

    async def _take_place(self, principal: str) -> str | None:
        lease = f"{self._replica}:{next(self._serial)}"
        # Taken before asking: a release may reach Redis just after the refusal did.
        releasing = set(self._releasing.get(principal, ()))
        admitted = await self._try_acquire(principal, lease)
        if not admitted and releasing:
            # The caller's next request here (its generation that waited for the turn the
            # last one gave back) is not refused for a place already given back.
            await asyncio.wait(releasing)
            admitted = await self._try_acquire(principal, lease)
        elif not admitted:
            # Another replica gives its places back in the background, a moment after its
            # answer went out: a client that sends its next request at once, to this replica,
            # is not refused for the place its last one is still giving back.
            await asyncio.sleep(RELEASE_GRACE_SECONDS)
            admitted = await self._try_acquire(principal, lease)
        if admitted == "":
            return ""  # let through without Redis (open policy): no lease to give back
        if not admitted:
            return None
        self.hold(self._leases_key(principal), lease)
        return lease

    def release(self, principal: str, lease: str) -> None:
        task = self._give_back(self._leases_key(principal), lease)
        if task is None:
            return
        releasing = self._releasing.setdefault(principal, set())
        releasing.add(task)

        def done(task: asyncio.Task[object]) -> None:
            releasing.discard(task)
            if not releasing and self._releasing.get(principal) is releasing:
                del self._releasing[principal]

        task.add_done_callback(done)

    def _give_back(self, key: str, lease: str) -> asyncio.Task[object] | None:
        if not self.let_go(key, lease):
            return None  # taken while Redis was down, or already given back
        # Off the request's path: a release that fails leaves a lease that is no longer
        # renewed, so it expires by itself.
        return self.in_background(lambda: self._remove(key, lease), "shared-limits-release")

    # ---- generation slots -----------------------------------------------------------------

    async def take_slot(
        self, upstream: str, deadline: float, notify: Callable[[str], None] | None
    ) -> str | None:
        """One of ``upstream``'s generation slots, counted on every replica, once one is free
        before ``deadline`` (the loop's clock); None when none was. "" while Redis is down
        under the open policy (nothing to give back)."""
        key = self._slots_key(upstream)
        loop = asyncio.get_running_loop()
        freed = self._slot_freed.setdefault(key, asyncio.Event())
        told = False
        while True:
            freed.clear()  # before asking: a slot given back meanwhile wakes the wait below
            # Only each ask is shielded, not the wait: a caller that hangs up stops asking.
            slot = await self._shielded(self._try_slot(key), key)
            if slot is not None:
                return slot
            left = deadline - loop.time()
            if left <= 0:
                return None
            if notify is not None and not told:
                notify("waiting, LM Studio is busy with answers from other replicas")
                told = True
            await wait_for_event(freed, min(SLOT_POLL_SECONDS, left))

    def give_back_slot(self, upstream: str, slot: str) -> None:
        key = self._slots_key(upstream)
        if self._give_back(key, slot) is not None:
            self._tell_slot_freed(key)

    def _tell_slot_freed(self, key: str) -> None:
        freed = self._slot_freed.get(key)
        if freed is not None:
            freed.set()

    async def _try_slot(self, key: str) -> str | None:
        """A slot's lease (held from now on), "" under the open policy while Redis is down,
        None when every slot is taken."""
        slot = f"{self._replica}:{next(self._serial)}"
        admitted = await self._call(
            functools.partial(self._acquire, keys=[key], args=[slot, self._slots, self._lease_ms]),
            allowed="",
        )
        if admitted == "":
            return ""
        if not admitted:
            return None
        self.hold(key, slot)
        return slot

    async def _try_acquire(self, principal: str, lease: str) -> object:
        return await self._call(
            lambda: self._acquire(
                keys=[self._leases_key(principal)], args=[lease, self._cap, self._lease_ms]
            ),
            allowed="",
        )

    # ---- for the shared budgets ----------------------------------------------------------

    @property
    def replica(self) -> str:
        """This replica's own part of every lease id it makes."""
        return self._replica

    @property
    def lease_ms(self) -> int:
        """How long a lease lives without being renewed."""
        return self._lease_ms

    async def evaluate(
        self, source: str, keys: Sequence[str], args: Sequence[str | int], *, allowed: T
    ) -> object:
        """The Lua script ``source``'s answer, under the failure policy (see :meth:`_call`)."""
        script = self._scripts.get(source)
        if script is None and self._client is not None:
            script = self._scripts[source] = self._client.register_script(source)
        if script is None:  # not opened: as unreachable
            return await self._call(_not_open, allowed=allowed)
        return await self._call(lambda: script(keys=list(keys), args=list(args)), allowed=allowed)

    def hold(self, key: str, lease: str) -> None:
        """Renew ``lease`` in the sorted set ``key`` until :meth:`let_go`."""
        self._held.setdefault(key, set()).add(lease)

    def let_go(self, key: str, lease: str) -> bool:
        """Stop renewing ``lease``; False when it was not held (a second call)."""
        held = self._held.get(key)
        if held is None or lease not in held:
            return False
        held.discard(lease)
        if not held:
            del self._held[key]
        return True

    def in_background(
        self, call: Callable[[], Coroutine[Any, Any, object]], name: str
    ) -> asyncio.Task[object]:
        """Run ``call`` off the request's path; :meth:`close` waits for it (a moment)."""
        task: asyncio.Task[object] = spawn(call(), name=name)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task

    # ---- Redis calls under the failure policy ---------------------------------------------

    async def _call(self, command: Callable[[], Awaitable[T]], *, allowed: T) -> T:
        """``command``'s answer; while Redis cannot be reached, ``allowed`` (open) or the
        503 (closed), without waiting on Redis again until a probe finds it back."""
        if not self._down:
            try:
                return await command()
            except ResponseError as exc:
                # Redis answered, refusing this one script (a key of the wrong type): not an
                # outage, so the other requests go on as they were.
                log.error("a shared limit's script failed in Redis: %s", exc)
                if self._closed_when_down:
                    raise errors.shared_limits_unavailable(RETRY_AFTER_SECONDS) from None
                return allowed
            except (RedisError, OSError) as exc:
                self._lost(f"({type(exc).__name__}: {exc})")
        if self._closed_when_down:
            raise errors.shared_limits_unavailable(RETRY_AFTER_SECONDS)
        return allowed

    def _lost(self, why: str) -> None:
        if self._down and self._outage.is_set():
            return  # the same outage: said once
        self._down = True
        self._outage.set()
        if self._closed_when_down:
            log.error(
                "Redis is unreachable %s: requests are refused until it is back "
                "(state.when_redis_is_down = closed)",
                why,
            )
        else:
            log.warning(
                "Redis is unreachable %s: requests pass WITHOUT rate, concurrency and "
                "guessing limits, and budgets count on each replica alone, until it is "
                "back (state.when_redis_is_down = open)",
                why,
            )

    def _back(self) -> None:
        if self._outage.is_set():
            log.warning("Redis answers again: the shared limits apply again")
        self._down = False
        self._outage.clear()

    async def _ping(self) -> bool:
        assert self._client is not None
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def _remove(self, key: str, lease: str) -> None:
        if self._down or self._client is None:
            return
        with contextlib.suppress(RedisError, OSError):
            await self._client.zrem(key, lease)

    @staticmethod
    def _leases_key(principal: str) -> str:
        return f"{PREFIX}leases:{principal}"

    @staticmethod
    def _slots_key(upstream: str) -> str:
        return f"{PREFIX}slots:{upstream}"

    # ---- in the background: renewals, and probes during an outage -------------------------

    async def _keep_up(self) -> None:
        while not self._closing:
            try:
                await self._keep_up_once()
            except Exception:
                # A surprise must not end renewals and probes for good: leases would expire
                # under running requests, and an outage would never be found over.
                log.exception("renewing shared leases failed; trying again")
                await asyncio.sleep(PROBE_SECONDS)

    async def _keep_up_once(self) -> None:
        renew_every = self.lease_seconds / 3
        while not self._closing:
            if self._down:
                await asyncio.sleep(PROBE_SECONDS)
                if await self._ping():
                    self._back()
                    # Leases held through the outage are renewed now, before they expire.
                    await self._renew_held()
                continue
            if await wait_for_event(self._outage, renew_every):
                continue  # a request found Redis gone: probe from now on
            await self._renew_held()

    async def _renew_held(self) -> None:
        """Every lease this replica holds, renewed in one pipeline."""
        assert self._client is not None
        held = {key: sorted(leases) for key, leases in self._held.items()}
        if not held:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, leases in held.items():
                    renew = (
                        self._renew_reservations
                        if key.startswith(RESERVATIONS_PREFIX)
                        else self._renew
                    )
                    await renew(
                        keys=[key],
                        args=[self._lease_ms, *leases],
                        client=pipe,
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._lost(f"renewing leases ({type(exc).__name__}: {exc})")


async def _not_open() -> object:
    raise RedisConnectionError("the shared limits are not open")
