"""Ledger tier: waiting until effects are committed: the engine under ``LedgerSensor`` and
``LedgerTrigger``.

A wait names keys (all must be committed) and/or a key prefix (at least ``min_count``
committed keys under it). :func:`check` answers once, synchronously (the sensor's poke).
:class:`Watcher` waits asynchronously, for many waits of one process on one connection:

1. **listen**: ``LISTEN`` on the schema's channel (one connection per event loop, database
   and schema, shared by every wait);
2. **register**: insert a ``waiters`` row per key or prefix, so that ``commit()`` notifies
   (it sends nothing when nobody waits: NOTIFY serialises committing transactions);
3. **check**: read the keys' states, locking the rows (``FOR SHARE``) so that a commit in
   flight either finishes before the check or sees the waiter row and notifies;
4. **wake**: each notification (payload: the key) re-reads that key; a slow **poll** of all
   keys covers anything missed, and after a dropped connection the watcher reconnects and
   checks everything again, so a commit during the outage is not lost.

No Airflow here; the trigger is a thin adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from eos_airflow.errors import ConfigurationError, LedgerSchemaError
from eos_airflow.ledger import connection
from eos_airflow.ledger.keys import check_key
from eos_airflow.ledger.store import AsyncLedgerStore, key_states

log = logging.getLogger(__name__)

#: Default seconds between full polls: the fallback for a missed notification only, so it can
#: be slow; a wait is normally woken by NOTIFY within milliseconds.
DEFAULT_POLL_INTERVAL = 30.0
#: Seconds a waiter row stays valid without a refresh (refreshed at every poll). A watcher
#: that died without cleaning up makes commits notify needlessly for at most this long.
WAITER_TTL = 600.0
#: Reconnect backoff after a dropped connection: first delay and cap, in seconds.
RECONNECT_MIN, RECONNECT_MAX = 0.2, 30.0
#: lock_timeout of the watcher's session: the locked check waits for a commit in flight,
#: which takes milliseconds; anything longer is retried at the next poll instead.
LOCK_TIMEOUT_MS = 5000
#: application_name of the watcher's connection (pg_stat_activity).
APPLICATION_NAME = "eos-airflow-watch"

_SCHEMA_ERRORS = (pgerrors.UndefinedTable, pgerrors.InvalidSchemaName, pgerrors.UndefinedFunction)


@dataclass(frozen=True)
class WaitSpec:
    """What to wait for: every key in ``keys`` committed, and at least ``min_count`` committed
    keys starting with ``prefix`` (if given)."""

    keys: tuple[str, ...] = ()
    prefix: str | None = None
    min_count: int = 1
    fail_on_failed: bool = True

    def __post_init__(self) -> None:
        if not self.keys and not self.prefix:
            raise ConfigurationError("wait for at least one key or a key prefix")
        for key in self.keys:
            check_key(key)
        if self.prefix is not None:
            check_key(self.prefix)
        if self.min_count < 1:
            raise ConfigurationError(f"min_count must be >= 1, got {self.min_count}")

    def waiter_rows(self) -> list[tuple[str, bool]]:
        """(key, is_prefix) rows that make ``commit()`` notify for this wait."""
        rows = [(key, False) for key in self.keys]
        if self.prefix:
            rows.append((self.prefix, True))
        return rows

    def concerns(self, key: str) -> bool:
        return key in self.keys or (self.prefix is not None and key.startswith(self.prefix))


@dataclass
class Verdict:
    """The answer to a wait: ``status`` is ``waiting``, ``committed``, ``failed``,
    ``timeout`` or ``error``; ``results`` maps each committed key to its stored result."""

    status: str
    results: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    message: str = ""

    @property
    def done(self) -> bool:
        return self.status != "waiting"

    def to_payload(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "results": self.results,
            "missing": self.missing,
            "failed": self.failed,
            "message": self.message,
        }


def evaluate(spec: WaitSpec, states: dict[str, tuple[str, Any]]) -> Verdict:
    """Decide a wait from the known ``{key: (state, result)}`` of its keys."""
    results = {k: r for k, (s, r) in states.items() if s == "committed" and spec.concerns(k)}
    failed = sorted(k for k, (s, _) in states.items() if s == "failed" and spec.concerns(k))
    missing = [k for k in spec.keys if k not in results]
    if spec.prefix is not None:
        under = sum(1 for k in results if k.startswith(spec.prefix))
        if under < spec.min_count:
            missing.append(f"{spec.prefix}* ({under} of {spec.min_count} committed)")
    if failed and spec.fail_on_failed:
        return Verdict(
            "failed",
            results,
            missing,
            failed,
            (
                f"effect {', '.join(map(repr, failed))} failed (its last attempt rolled back); "
                "fix and re-run the producing task, or pass fail_on_failed=False to keep waiting "
                "for a retry"
            ),
        )
    if missing:
        return Verdict(
            "waiting", results, missing, failed, f"waiting for {', '.join(map(repr, missing))}"
        )
    return Verdict("committed", results, [], failed, f"{len(results)} effect(s) committed")


def _fetch(
    conn: psycopg.Connection[Any], schema: str, spec: WaitSpec
) -> dict[str, tuple[str, Any]]:
    return key_states(conn, schema, list(spec.keys), spec.prefix)


def check(conn: psycopg.Connection[Any], schema: str, spec: WaitSpec) -> Verdict:
    """Decide ``spec`` now, from one read of the ledger (no locks, no waiter rows)."""
    try:
        return evaluate(spec, _fetch(conn, schema, spec))
    except _SCHEMA_ERRORS as exc:
        raise _schema_error(schema, conn.info.dbname, exc) from exc


def _schema_error(schema: str, dbname: str, exc: psycopg.Error) -> LedgerSchemaError:
    return LedgerSchemaError(
        f'the ledger schema "{schema}" is missing or outdated in database "{dbname}" '
        f"({exc.diag.message_primary}); create or upgrade it with `eos-airflow db migrate` "
        "(same --dsn or --conn-id)"
    )


class _Wait:
    def __init__(self, spec: WaitSpec) -> None:
        self.spec = spec
        self.states: dict[str, tuple[str, Any]] = {}
        self.verdict: Verdict | None = None
        self.done = asyncio.Event()
        self.fresh = True  # registered rows not yet checked under lock

    def decide(self, verdict: Verdict) -> None:
        if verdict.done and self.verdict is None:
            self.verdict = verdict
            self.done.set()


class Watcher:
    """All waits of one event loop on one database and ledger schema: one connection that
    LISTENs, one poll query per interval (per distinct prefix), whatever the number of waits.

    Get the shared one with :func:`shared_watcher`; ``await watcher.wait(spec)``.
    """

    def __init__(
        self, conninfo: str, schema: str = "eos", *, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.poll_interval = poll_interval
        self._token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._sessions = itertools.count(1)
        #: Names this watcher's waiter rows; a new one per connection, so that rows of a
        #: session that is closing never touch those of the next.
        self.listener = self._token
        self._retired = False
        self.connections_opened = 0
        #: The session's connection while one is open (for inspection; the watcher's own).
        self.connection: psycopg.AsyncConnection[Any] | None = None
        self._waits: set[_Wait] = set()
        self._registered: set[tuple[str, bool]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_exit: list[Any] = []

    def __repr__(self) -> str:
        return (
            f"<Watcher schema={self.schema!r} waits={len(self._waits)} listener={self.listener!r}>"
        )

    async def wait(
        self, spec: WaitSpec, *, timeout: float | None = None, poll_interval: float | None = None
    ) -> Verdict:
        """Wait until ``spec`` is decided or ``timeout`` seconds pass (status ``timeout``)."""
        if poll_interval is not None:
            self.poll_interval = min(self.poll_interval, poll_interval)
        wait = _Wait(spec)
        self._waits.add(wait)
        self._wake.set()
        if self._task is None or self._task.done() or self._retired:
            self._retired = False
            self._task = asyncio.get_running_loop().create_task(self._serve())
        try:
            await asyncio.wait_for(wait.done.wait(), timeout)
        except asyncio.TimeoutError:
            verdict = evaluate(spec, wait.states)
            return Verdict(
                "timeout",
                verdict.results,
                verdict.missing,
                verdict.failed,
                f"timed out {verdict.message}",
            )
        finally:
            self._waits.discard(wait)
            self._wake.set()
        assert wait.verdict is not None
        return wait.verdict

    # --- the one task serving every wait ---------------------------------------------------

    async def _serve(self) -> None:
        delay = RECONNECT_MIN
        try:
            while self._waits:
                try:
                    await self._session()
                    return
                except psycopg.OperationalError as exc:
                    log.warning(
                        "ledger watcher %s lost its connection (%s); reconnecting in "
                        "%.1f s and re-checking every wait",
                        self.listener,
                        str(exc).strip(),
                        delay,
                    )
                except _SCHEMA_ERRORS as exc:
                    error = _schema_error(self.schema, "?", exc)
                    for wait in list(self._waits):
                        wait.decide(Verdict("error", message=str(error)))
                except ConfigurationError as exc:  # e.g. EOS_LIVENESS_TIMEOUT is not a number
                    for wait in list(self._waits):
                        wait.decide(Verdict("error", message=str(exc)))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
        finally:
            self._retire()

    def _retire(self) -> None:
        """Called, without awaiting anything first, once no wait is left: a wait arriving
        later starts a new session (and :func:`shared_watcher` hands out a new watcher)."""
        if not self._retired:
            self._retired = True
            for callback in self._on_exit:
                callback(self)

    async def _session(self) -> None:
        # lock_timeout by set_config after connecting, as the liveness settings: a startup
        # `options` parameter is refused by PgBouncer.
        conn = await connection.aconnect(
            self.conninfo,
            application_name=APPLICATION_NAME,
            settings={"lock_timeout": f"{LOCK_TIMEOUT_MS}ms"},
        )
        self.connections_opened += 1
        self.connection = conn
        self.listener = listener = f"{self._token}:{next(self._sessions)}"
        try:
            await AsyncLedgerStore(conn, self.schema).listen()
            # Rows may have expired while disconnected: register everything again and check
            # every wait under lock (commits during the outage sent no notification to us).
            self._registered.clear()
            for wait in self._waits:
                wait.fresh = True
            loop = asyncio.get_running_loop()
            next_poll = loop.time() + self.poll_interval
            while True:
                self._wake.clear()
                await self._sync_rows(conn)
                if not self._waits:
                    self._retire()
                    return
                fresh = [w for w in self._waits if w.fresh]
                if fresh:
                    await self._check(conn, fresh, locked=True)
                if loop.time() >= next_poll:
                    await self._refresh(conn)
                    await self._check(conn, list(self._waits), locked=False)
                    next_poll = loop.time() + self.poll_interval
                keys = await self._notified(conn, max(0.0, next_poll - loop.time()))
                if keys:
                    await self._on_commits(conn, keys)
        finally:
            with contextlib.suppress(psycopg.Error):
                if not conn.closed:
                    await AsyncLedgerStore(conn, self.schema).drop_listener(listener)
            self.connection = None
            await conn.close()

    async def _sync_rows(self, conn: psycopg.AsyncConnection[Any]) -> None:
        wanted = {row for wait in self._waits for row in wait.spec.waiter_rows()}
        new, gone = wanted - self._registered, self._registered - wanted
        store = AsyncLedgerStore(conn, self.schema)
        if new:
            keys, is_prefix = zip(*new, strict=True)
            await store.register_waiters(self.listener, keys, is_prefix, self._ttl())
        if gone:
            keys, is_prefix = zip(*gone, strict=True)
            await store.unregister_waiters(self.listener, keys, is_prefix)
        self._registered = wanted

    def _ttl(self) -> float:
        return max(WAITER_TTL, 4 * self.poll_interval)

    async def _refresh(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await AsyncLedgerStore(conn, self.schema).refresh_waiters(self.listener, self._ttl())

    async def _check(
        self, conn: psycopg.AsyncConnection[Any], waits: Sequence[_Wait], *, locked: bool
    ) -> None:
        """Re-read every key and prefix of ``waits`` (one query, plus one per prefix)."""
        keys = sorted({k for w in waits for k in w.spec.keys})
        prefixes = sorted({w.spec.prefix for w in waits if w.spec.prefix is not None})
        store = AsyncLedgerStore(conn, self.schema)
        states: dict[str, tuple[str, Any]] = {}
        if keys:
            states.update(await store.key_states(keys, locked=locked))
        for prefix in prefixes:
            states.update(await store.prefix_states(prefix, locked=locked))
        for wait in waits:
            wait.states = {k: v for k, v in states.items() if wait.spec.concerns(k)}
            wait.fresh = False
            wait.decide(evaluate(wait.spec, wait.states))

    async def _notified(self, conn: psycopg.AsyncConnection[Any], timeout: float) -> set[str]:
        """Keys notified within ``timeout`` seconds; returns early when a wait comes or goes."""
        keys: set[str] = set()

        async def collect() -> None:
            async for notify in conn.notifies(timeout=timeout, stop_after=1):
                keys.add(notify.payload)

        listening = asyncio.ensure_future(collect())
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({listening, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if not listening.done():
                listening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listening
        if not listening.cancelled():
            listening.result()  # a dropped connection raises here
        return keys

    async def _on_commits(self, conn: psycopg.AsyncConnection[Any], keys: set[str]) -> None:
        waits = [w for w in self._waits if any(w.spec.concerns(k) for k in keys)]
        if not waits:
            return
        rows = await AsyncLedgerStore(conn, self.schema).key_states(sorted(keys))
        for wait in waits:
            wait.states.update((k, v) for k, v in rows.items() if wait.spec.concerns(k))
            wait.decide(evaluate(wait.spec, wait.states))


_shared: dict[tuple[asyncio.AbstractEventLoop, str, str], Watcher] = {}
_ids = itertools.count()


def shared_watcher(
    conninfo: str, schema: str = "eos", *, poll_interval: float = DEFAULT_POLL_INTERVAL
) -> Watcher:
    """The watcher of this event loop for ``conninfo`` and ``schema`` (created on first use,
    forgotten when its last wait ends)."""
    loop = asyncio.get_running_loop()
    ident = (loop, conninfo, schema)
    watcher = _shared.get(ident)
    if watcher is None or (watcher._task is not None and watcher._task.done()):
        watcher = Watcher(conninfo, schema, poll_interval=poll_interval)
        watcher._on_exit.append(lambda w: _shared.get(ident) is w and _shared.pop(ident))
        _shared[ident] = watcher
    return watcher


__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "Verdict",
    "WaitSpec",
    "Watcher",
    "check",
    "evaluate",
    "shared_watcher",
]
