"""Best-effort Redis read model: latest KPI values and per-member status.

The worker must never wait on Redis, and the read model must catch up after an outage.
So writing is split in two:

* ``ReadModel.publish_kpis`` / ``ReadModel.update_members`` only put the new state into
  in-memory pending maps (no I/O). KPI records are coalesced by Redis key and member
  updates by member id -- the latest wins -- so pending memory is bounded by the number of
  distinct KPI series and members, not by the event rate or the length of an outage.
* ``await ReadModel.flush()`` (called from a timer) writes everything pending in atomic
  Lua script runs (one per chunk of members, see ``_WRITE_SCRIPT``). On a Redis error it
  logs a WARNING (no member ids; once a minute during a long outage), counts the error,
  puts the unwritten state back and returns ``False``; the next successful flush writes it
  all. ``ReadModel.update_member_snapshots`` defers making a member's status to the flush,
  so a member changed by many batches between two flushes costs one status, not one each.
  Short socket timeouts and no client-side retries keep a failing flush short.

Key layout (project contract), ``prefix`` defaults to ``"stream-kpis:"``:

* ``{prefix}kpi:{kpi}:{window or "-"}[:{label}={value}...]`` -- hash ``value``,
  ``numerator``, ``denominator``, ``as_of``; labels in sorted label-name order.
* ``{prefix}member:{member_id}`` -- hash ``last_touch`` (RFC 3339), ``status``,
  ``points_balance``, ``tier``, ``next_expiry_points``, ``next_expiry_at``.
* ``{prefix}at_risk`` -- sorted set member_id -> last_touch in epoch seconds.

A null field is stored as an absent hash field (each hash is rewritten whole with
DEL + HSET inside the atomic script run, so a reader never sees a half-updated hash). Numbers are
stored as their decimal text (ints without a fraction, floats round-trip exact).

The sync helpers ``read_kpi`` / ``read_member`` / ``at_risk_members`` read that layout back
with a plain ``redis.Redis`` client, for tests and the command line.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
import redis.asyncio
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..core.timebase import format_rfc3339

__all__ = [
    "DEFAULT_MAX_PENDING_MEMBERS",
    "DEFAULT_PREFIX",
    "DEFAULT_SOCKET_TIMEOUT",
    "MEMBER_FIELDS",
    "MEMBER_STATUSES",
    "ReadModel",
    "at_risk_key",
    "at_risk_members",
    "kpi_key",
    "member_key",
    "read_kpi",
    "read_member",
]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "stream-kpis:"
# Distinct members whose update may wait for Redis. A pending member with all fields costs
# about 600 bytes (measured with tracemalloc), so the default caps the backlog of a long
# outage at roughly 150 MB.
DEFAULT_MAX_PENDING_MEMBERS = 250_000
# Seconds for connect and for each reply. Loopback / same-zone Redis answers in
# milliseconds; past this the read model is treated as down and retried next flush.
DEFAULT_SOCKET_TIMEOUT = 0.5
# Members per script run (an atomic write): a catch-up after a long outage is written in several
# transactions, handing the event loop back in between.
DEFAULT_MEMBERS_PER_PIPELINE = 10_000
# Seconds between two WARNINGs of one outage (the first failure always warns).
WARNING_INTERVAL = 60.0

MEMBER_FIELDS = ("last_touch", "status", "points_balance", "tier", "next_expiry_points",
                 "next_expiry_at", "p_alive", "expected_purchases", "expected_value")
MEMBER_STATUSES = frozenset({"active", "at_risk", "churned"})
_KPI_NUMBER_FIELDS = ("value", "numerator", "denominator")
_MEMBER_NUMBER_FIELDS = frozenset({"points_balance", "next_expiry_points", "p_alive",
                                   "expected_purchases", "expected_value"})

# What a failing Redis looks like from here. Anything else is a bug and propagates.
_REDIS_FAILURES = (redis.exceptions.RedisError, OSError)
# Failures whose message is safe to log: they name host/port, never a key (pipeline command
# errors such as WRONGTYPE are annotated with the command and its key, i.e. a member id).
_CONNECTION_FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        OSError)


# -- key layout ---------------------------------------------------------------------------

def kpi_key(prefix: str, kpi: str, window: str | None,
            labels: Mapping[str, str] | None = None) -> str:
    """Redis key of one KPI series, e.g. ``stream-kpis:kpi:new_members:7d:channel=web``."""
    key = f"{prefix}kpi:{kpi}:{window or '-'}"
    if labels:
        key += "".join(f":{name}={labels[name]}" for name in sorted(labels))
    return key


def member_key(prefix: str, member_id: str) -> str:
    """Redis key of a member's status hash."""
    return f"{prefix}member:{member_id}"


def at_risk_key(prefix: str) -> str:
    """Redis key of the at-risk sorted set (member_id -> last_touch epoch seconds)."""
    return f"{prefix}at_risk"


# -- pending state --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _MemberWrite:
    """A member's hash fields as [name, value, name, value, ...], ready to write;
    ``at_risk_score`` (the score's text) None means ZREM."""

    flat_fields: list[str]
    at_risk_score: str | None


#: A member update whose status is made at the flush: (snapshot, statuses_of), where
#: ``statuses_of([snapshot, ...])`` gives the statuses (a plain tuple: one is queued per member
#: and batch, so it must be cheap to make).
_Deferred = tuple


def _resolve(pending: Mapping[str, _MemberWrite | _Deferred]) -> list[tuple[str, _MemberWrite]]:
    """The pending member updates, deferred ones made into writes (one ``statuses_of`` call per
    function, over all its snapshots)."""
    members = list(pending.items())
    groups: dict[int, list[int]] = {}
    for i, (_, write) in enumerate(members):
        if write.__class__ is tuple:
            groups.setdefault(id(write[1]), []).append(i)
    for indexes in groups.values():
        statuses_of = members[indexes[0]][1][1]
        statuses = statuses_of([members[i][1][0] for i in indexes])
        for i, status in zip(indexes, statuses, strict=True):
            members[i] = (members[i][0], _member_write(status))
    return members


#: One flush chunk: ARGV[1] is JSON ``[[[key, [name, value, ...]], ...], [[member_id, score or
#: null], ...]]``; each hash is replaced whole (DEL + HSET), then each member is added to or
#: removed from the at-risk set KEYS[1]. A script runs atomically, like MULTI/EXEC. Hash keys are
#: not declared in KEYS: like the MULTI/EXEC it replaces, this needs one Redis, not a cluster.
_WRITE_SCRIPT = """
local data = cjson.decode(ARGV[1])
for _, entry in ipairs(data[1]) do
  redis.call('DEL', entry[1])
  if #entry[2] > 0 then
    redis.call('HSET', entry[1], unpack(entry[2]))
  end
end
for _, entry in ipairs(data[2]) do
  if entry[2] == cjson.null then
    redis.call('ZREM', KEYS[1], entry[1])
  else
    redis.call('ZADD', KEYS[1], entry[2], entry[1])
  end
end
return #data[1]
"""


class ReadModel:
    """Non-blocking writer of the Redis read model (see the module docstring).

    ``client_factory`` returns a ``redis.asyncio.Redis``; it is called on the first flush,
    so the object can be built before the event loop runs. ``on_error()`` is called once
    per failed flush (e.g. ``WorkerMetrics.count_redis_error``); ``on_drop(n)`` when ``n``
    member updates could not be kept (see ``update_members``). Use it from the event
    loop's thread only (the enqueue methods are plain dict updates, not locked).
    """

    def __init__(
        self,
        client_factory: Callable[[], redis.asyncio.Redis],
        prefix: str = DEFAULT_PREFIX,
        *,
        max_pending_members: int = DEFAULT_MAX_PENDING_MEMBERS,
        members_per_pipeline: int = DEFAULT_MEMBERS_PER_PIPELINE,
        on_error: Callable[[], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        if max_pending_members < 1 or members_per_pipeline < 1:
            raise ValueError("max_pending_members and members_per_pipeline must be >= 1")
        self.prefix = prefix
        self.max_pending_members = max_pending_members
        self.members_per_pipeline = members_per_pipeline
        self.errors = 0
        self.dropped_member_updates = 0
        self._client_factory = client_factory
        self._client: redis.asyncio.Redis | None = None
        self._on_error = on_error
        self._on_drop = on_drop
        self._pending_kpis: dict[str, dict[str, str]] = {}
        self._pending_members: dict[str, _MemberWrite] = {}
        self._inflight_members = 0  # taken by a running flush, still count toward the bound
        self._script: Any = None  # _WRITE_SCRIPT registered with the current client
        self._flushing = False
        self._warned_drop = False
        self._failures_in_row = 0
        self._last_warning_at = 0.0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        max_pending_members: int = DEFAULT_MAX_PENDING_MEMBERS,
        members_per_pipeline: int = DEFAULT_MEMBERS_PER_PIPELINE,
        on_error: Callable[[], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
        **redis_kwargs: Any,
    ) -> ReadModel:
        """A read model writing to ``url``.

        ``redis://[[user]:password@]host:port/db`` authenticates with AUTH;
        ``rediss://`` uses TLS (CA file via ``?ssl_ca_certs=/path`` or
        ``ssl_ca_certs=...`` here). ``redis_kwargs`` go to ``redis.asyncio.Redis.from_url``.
        """
        parse_url(url)  # fail now, with redis-py's message, rather than at the first flush
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            # redis-py retries 10 times with backoff by default, which turns an outage into
            # a long stall; the next flush is the retry.
            "retry": Retry(NoBackoff(), 0),
            **redis_kwargs,
        }

        def client_factory() -> redis.asyncio.Redis:
            return redis.asyncio.Redis.from_url(url, **options)

        return cls(client_factory, prefix, max_pending_members=max_pending_members,
                   members_per_pipeline=members_per_pipeline, on_error=on_error,
                   on_drop=on_drop)

    # -- enqueue (hot path, no I/O) -----------------------------------------------------

    @property
    def pending_kpis(self) -> int:
        """KPI series waiting to be written."""
        return len(self._pending_kpis)

    @property
    def pending_members(self) -> int:
        """Members whose latest status waits to be written."""
        return len(self._pending_members)

    def publish_kpis(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Queue KPI records (SPEC section 6 shape); the latest per series wins."""
        pending = self._pending_kpis
        for record in records:
            fields = {"as_of": record["as_of"]}
            _put_numbers(fields, record, _KPI_NUMBER_FIELDS)
            pending[kpi_key(self.prefix, record["kpi"], record.get("window"),
                            record.get("labels"))] = fields

    def update_members(self, statuses: Mapping[str, Mapping[str, Any]]) -> None:
        """Queue member statuses ``{member_id: {"last_touch", "status", ...}}``.

        ``last_touch`` and ``status`` are required; ``last_touch`` / ``next_expiry_at`` are
        RFC 3339 strings, aware datetimes or int epoch milliseconds; keys outside
        ``MEMBER_FIELDS`` are ignored. Raises ``ValueError`` for invalid input, here rather
        than in ``flush`` where it would block every later write.

        Bound: updates of members already pending always coalesce (no growth). A member
        not yet pending is only added while fewer than ``max_pending_members`` are
        pending; past that its update is dropped and counted in
        ``dropped_member_updates`` (and ``on_drop``) -- its Redis hash stays stale until
        its next update, so re-publish all statuses if that counter moved.
        """
        self._enqueue_members((member_id, _member_write(status))
                              for member_id, status in statuses.items())

    def update_member_snapshots(self, snapshots: Mapping[str, Any],
                                statuses_of: Callable[[list[Any]], list[Mapping[str, Any]]]
                                ) -> None:
        """Queue members whose statuses are made only when they are written.

        ``snapshots`` maps member ids to immutable values (the worker passes each member's
        committed state record) and ``statuses_of`` turns a list of them into their statuses
        (as ``update_members`` takes them) at the next flush, once per member however many
        commits changed it meanwhile. Same coalescing and bound as ``update_members``; a
        status ``statuses_of`` gets wrong fails that flush (a bug, not an outage)."""
        pending = self._pending_members
        if len(pending) + self._inflight_members + len(snapshots) <= self.max_pending_members:
            pending.update({member_id: (snapshot, statuses_of)  # within the bound: no checks
                            for member_id, snapshot in snapshots.items()})
            return
        self._enqueue_members((member_id, (snapshot, statuses_of))
                              for member_id, snapshot in snapshots.items())

    def _enqueue_members(self, writes: Iterable[tuple[str, _MemberWrite | _Deferred]]) -> None:
        pending = self._pending_members
        dropped = 0
        for member_id, write in writes:
            if (member_id not in pending
                    and len(pending) + self._inflight_members >= self.max_pending_members):
                dropped += 1
                continue
            pending[member_id] = write
        if dropped:
            self._count_drops(dropped)

    def _count_drops(self, dropped: int) -> None:
        self.dropped_member_updates += dropped
        if self._on_drop is not None:
            self._on_drop(dropped)
        if not self._warned_drop:  # once per outage: the count says the rest
            self._warned_drop = True
            log.warning("Redis read model backlog is full (max_pending_members=%d); "
                        "dropping updates of further members until Redis is back",
                        self.max_pending_members)

    # -- write ---------------------------------------------------------------------------

    async def flush(self) -> bool:
        """Write all state pending at the call; True on success (or nothing to write).

        Never raises on a Redis failure: logs a WARNING, counts it, keeps the unwritten
        state (newer updates queued meanwhile win) and returns False. A flush already
        running makes this call return False at once.
        """
        if self._flushing:
            return False
        if not self._pending_kpis and not self._pending_members:
            return True
        members = _resolve(self._pending_members)  # before anything changes: a bug raises here
        self._flushing = True
        kpis, self._pending_kpis = self._pending_kpis, {}
        self._pending_members = {}
        self._inflight_members = len(members)
        written = 0  # members written so far; KPIs go with the first transaction
        try:
            if self._client is None:
                self._client = self._client_factory()
            step = self.members_per_pipeline
            while True:
                chunk = members[written:written + step]
                await self._write(self._client, kpis, chunk)
                kpis = {}
                written += len(chunk)
                self._inflight_members = len(members) - written
                if written >= len(members):
                    break
        except BaseException as exc:
            self._restore(kpis, members[written:])
            if not isinstance(exc, _REDIS_FAILURES):
                raise  # cancellation or a bug: state is restored, let it propagate
            self._count_error(exc)
            return False
        finally:
            self._inflight_members = 0
            self._flushing = False
        if self._failures_in_row:
            log.info("Redis read model is back after %d failed flushes; pending state written",
                     self._failures_in_row)
            self._failures_in_row = 0
        self._warned_drop = False
        return True

    async def _write(self, client: redis.asyncio.Redis, kpis: Mapping[str, Mapping[str, str]],
                     members: list[tuple[str, _MemberWrite]]) -> None:
        """One atomic script run with the given KPI hashes and member updates.

        The updates travel as one JSON argument of :data:`_WRITE_SCRIPT` (decoded by Redis'
        cjson): as atomic as MULTI/EXEC, but a command and a reply per flush chunk instead of
        three per member, whose packing and reply parsing in redis-py were most of a flush."""
        if self._script is None or self._script.registered_client is not client:
            self._script = client.register_script(_WRITE_SCRIPT)
        prefix = self.prefix
        hashes = [(key, [x for item in fields.items() for x in item])
                  for key, fields in kpis.items()]
        hashes += [(f"{prefix}member:{member_id}", write.flat_fields) for member_id, write in members]
        at_risk = [(member_id, write.at_risk_score) for member_id, write in members]
        await self._script(keys=[at_risk_key(prefix)], args=[orjson.dumps([hashes, at_risk])])

    def _restore(self, kpis: dict[str, dict[str, str]],
                 members: list[tuple[str, _MemberWrite]]) -> None:
        """Put unwritten state back under whatever was queued during the flush."""
        kpis.update(self._pending_kpis)
        self._pending_kpis = kpis
        restored = dict(members)
        restored.update(self._pending_members)
        self._pending_members = restored

    def _count_error(self, exc: BaseException) -> None:
        self.errors += 1
        self._failures_in_row += 1
        if self._on_error is not None:
            self._on_error()
        now = time.monotonic()
        if self._failures_in_row > 1 and now - self._last_warning_at < WARNING_INTERVAL:
            return  # an outage warns once a minute, not once a flush; errors counts them all
        self._last_warning_at = now
        detail = (f"{type(exc).__name__}: {exc}" if isinstance(exc, _CONNECTION_FAILURES)
                  else type(exc).__name__)
        log.warning("Redis read model write failed (%s; %d failed flushes in a row); "
                    "keeping %d KPI series and %d member updates pending for the next flush",
                    detail, self._failures_in_row, len(self._pending_kpis),
                    len(self._pending_members))

    async def aclose(self) -> None:
        """Close the Redis connections (pending state is kept)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


# -- value encoding -------------------------------------------------------------------------

def _encode_number(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number or null, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return str(value) if isinstance(value, int) else repr(value)


def _decode_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _put_numbers(fields: dict[str, str], source: Mapping[str, Any],
                 names: Iterable[str]) -> None:
    """Copy the non-null numbers ``names`` of ``source`` into ``fields`` as text."""
    for name in names:
        value = source.get(name)
        if value is not None:
            fields[name] = _encode_number(name, value)


def _timestamp(name: str, value: Any) -> tuple[str, float]:
    """(RFC 3339 text, epoch seconds) of an RFC 3339 string, aware datetime or epoch ms."""
    if value.__class__ is str:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            raise ValueError(f"{name} {value!r} has no UTC offset; write it like "
                             "'2024-01-31T00:00:00Z'")
        return value, moment.timestamp()
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware, got {value!r}")
        seconds = value.timestamp()
        moment = datetime.fromtimestamp(seconds, UTC)
        spec = "milliseconds" if moment.microsecond else "seconds"
        return moment.isoformat(timespec=spec).replace("+00:00", "Z"), seconds
    if isinstance(value, int) and not isinstance(value, bool):
        return format_rfc3339(value), value / 1000
    raise ValueError(f"{name} must be RFC 3339 text, an aware datetime or epoch ms, "
                     f"got {value!r}")


_OPTIONAL_NUMBERS = ("points_balance", "next_expiry_points", "p_alive", "expected_purchases",
                     "expected_value")


def _member_write(status: Mapping[str, Any]) -> _MemberWrite:
    """A member status validated and encoded for its hash (called per changed member and
    commit: kept to the fields a status has)."""
    state = status["status"]
    if state not in MEMBER_STATUSES:
        raise ValueError(f"member status {state!r} is not one of {sorted(MEMBER_STATUSES)}")
    last_touch, last_touch_seconds = _timestamp("last_touch", status["last_touch"])
    flat = ["last_touch", last_touch, "status", state]
    get = status.get
    for name in _OPTIONAL_NUMBERS:
        value = get(name)
        if value is not None:
            flat += (name, str(value) if value.__class__ is int else _encode_number(name, value))
    tier = get("tier")
    if tier is not None:
        flat += ("tier", str(tier))
    expiry = get("next_expiry_at")
    if expiry is not None:
        flat += ("next_expiry_at", _timestamp("next_expiry_at", expiry)[0])
    return _MemberWrite(flat, repr(last_touch_seconds) if state == "at_risk" else None)


# -- sync readers (tests, CLI) ----------------------------------------------------------------

def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _read_hash(client: redis.Redis, key: str) -> dict[str, str]:
    return {_text(name): _text(value) for name, value in client.hgetall(key).items()}


def read_kpi(client: redis.Redis, prefix: str, kpi: str, window: str | None,
             labels: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The stored KPI record (SPEC section 6 shape, nulls restored), or None if absent."""
    fields = _read_hash(client, kpi_key(prefix, kpi, window, labels))
    if not fields:
        return None
    record: dict[str, Any] = {"kpi": kpi, "window": window, "as_of": fields.get("as_of")}
    for name in _KPI_NUMBER_FIELDS:
        text = fields.get(name)
        record[name] = None if text is None else _decode_number(text)
    if labels:
        record["labels"] = dict(labels)
    return record


def read_member(client: redis.Redis, prefix: str, member_id: str) -> dict[str, Any] | None:
    """A member's stored status with every ``MEMBER_FIELDS`` key (None when null)."""
    fields = _read_hash(client, member_key(prefix, member_id))
    if not fields:
        return None
    member: dict[str, Any] = {}
    for name in MEMBER_FIELDS:
        text = fields.get(name)
        member[name] = (_decode_number(text) if text is not None and name in
                        _MEMBER_NUMBER_FIELDS else text)
    return member


def at_risk_members(client: redis.Redis, prefix: str, limit: int) -> list[tuple[str, float]]:
    """Up to ``limit`` at-risk members as (member_id, last_touch epoch seconds), the
    longest-silent first."""
    if limit <= 0:
        return []
    entries = client.zrange(at_risk_key(prefix), 0, limit - 1, withscores=True)
    return [(_text(member_id), float(score)) for member_id, score in entries]
