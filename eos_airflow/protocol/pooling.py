"""Protocol tier: connection poolers in front of the ledger (docs/deploy.md, "Behind PgBouncer").

The owner of a key holds a session-level advisory lock from its claim until it commits or
releases (protocol/local.py): other runs take the key over only once that lock is free, which
happens when the owner's session ends — its process died, its connection closed. That needs
one server session per client connection for the client's whole life: PgBouncer's
``pool_mode = session``, or no pooler. A pooler that hands the server session back to its pool
between transactions (PgBouncer's ``transaction`` and ``statement`` modes) breaks it: the lock
stays on a pooled server session after its owner is gone (other runs wait for an owner that
does not exist), or the next client of that server session inherits it (and looks like the
owner).

No SQL can tell a pooler's mode from one client: a transaction-mode pool may well give the
same server session back transaction after transaction. So the check, before the first claim
on each connection (one round trip, cached), is:

- the server's ``pg_backend_pid()`` equals the process id the connection was given at login
  (``BackendKeyData``): no pooler in between; nothing more to check on this connection;
- otherwise a pooler answered the login (PgBouncer and its kind hand out keys of their own).
  Unless the deployment declares session pooling (``EOS_POOL_MODE=session``), the claim is
  refused with :class:`~eos_airflow.errors.PoolingError` (``EOS10``) — nothing is claimed;
- with the declaration, the first server pid is pinned and every later claim on the
  connection compares it (one round trip per claim): a change proves transaction pooling,
  and the claim is refused the same way.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import psycopg

from eos_airflow.errors import POOLED_SESSION, PoolingError

#: Environment variable that declares the pooler in front of the ledger pools sessions.
POOL_MODE_ENV = "EOS_POOL_MODE"
#: The code that starts every PoolingError message.
POOLING_CODE = POOLED_SESSION

#: Per connection seen: the server session's process id at first sight, and whether a pooler
#: answered the login (the id the connection was given then differs).
_seen: weakref.WeakKeyDictionary[psycopg.Connection[Any], tuple[int, bool]] = (
    weakref.WeakKeyDictionary()
)


def declared_session_pooling() -> bool:
    return os.environ.get(POOL_MODE_ENV, "").strip().lower() == "session"


def _server_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()", prepare=False).fetchone()
    assert row is not None  # SELECT without FROM gives one row
    return int(row[0])


def behind_pooler(conn: psycopg.Connection[Any]) -> bool:
    """Does ``conn`` reach PostgreSQL through a pooler? (One round trip per connection.)

    A pooled connection also stops psycopg's automatic server-side prepared statements
    (``prepare_threshold = None``): through transaction pooling they would be left on server
    sessions that other clients get, and be missing from the session the next statement
    gets (PgBouncer before 1.21 does not track them)."""
    seen = _seen.get(conn)
    if seen is None:
        pid = _server_pid(conn)
        seen = _seen[conn] = (pid, pid != conn.info.backend_pid)
        if seen[1]:
            conn.prepare_threshold = None
    return seen[1]


def check_session(conn: psycopg.Connection[Any]) -> None:
    """Refuse (PoolingError) a connection whose server session may change between
    transactions; see the module's docstring. Call it before a claim, on an idle connection."""
    first = conn not in _seen
    if not behind_pooler(conn):
        return
    pinned = _seen[conn][0]
    if not declared_session_pooling():
        raise PoolingError(
            f"{POOLING_CODE}: the ledger connection goes through a connection pooler (the "
            f"server session's process id {pinned} is not the id {conn.info.backend_pid} "
            "given at login). An attempt's ownership of a key is a session-level advisory "
            "lock, which needs the pooler to keep one server session per client for the "
            "client's whole life; in PgBouncer's transaction or statement mode the lock "
            "stays on a pooled server session after its owner is gone, or passes to another "
            "client. Use session mode (pool_mode = session) for the ledger database and set "
            f"{POOL_MODE_ENV}=session on the workers, or connect the ledger directly to "
            "PostgreSQL. Nothing was claimed"
        )
    if first:
        return
    server_pid = _server_pid(conn)
    if server_pid != pinned:
        raise PoolingError(
            f"{POOLING_CODE}: the ledger connection's server session changed between "
            f"transactions (process id {pinned}, then {server_pid}): the pooler in front of the "
            f"ledger pools transactions, not sessions, although {POOL_MODE_ENV}=session says it "
            "pools sessions. An attempt's ownership of a key (a session-level advisory lock) "
            "cannot work through it: use session mode (pool_mode = session) for the ledger "
            "database, or connect the ledger directly to PostgreSQL. Nothing was claimed"
        )


__all__ = [
    "POOL_MODE_ENV",
    "POOLING_CODE",
    "behind_pooler",
    "check_session",
    "declared_session_pooling",
]
