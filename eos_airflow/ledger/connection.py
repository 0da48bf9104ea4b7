"""Ledger tier: opening ledger connections: server-side liveness, and connect errors that say what
to do.

Every connection to a ledger database goes through here: :class:`eos_airflow.Ledger` with a
DSN, the Airflow hook (operators, decorators, sensors in poke mode), the watcher behind
``LedgerTrigger`` and the CLI.

**Liveness.** An attempt owns its key through its session (a session advisory lock, and row
locks while its transaction is open): the key frees when PostgreSQL ends the session. A
worker that crashes closes its socket and the server notices at once; a worker whose network
vanishes (a partition, a host that lost power, a VM frozen by its hypervisor) sends nothing
more — not even a TCP reset — and the server notices only through its own TCP timers. With
the server's defaults (``tcp_keepalives_idle`` from the kernel: 7200 s) that is about two
hours, and libpq's client-side ``keepalives`` do not change it: they make the *client* notice
a dead *server*. So after connecting, each session sets its own server-side timers from one
number, ``liveness_timeout`` (seconds; :data:`DEFAULT_LIVENESS_TIMEOUT`, or the environment
variable ``EOS_LIVENESS_TIMEOUT``; 0 leaves the server's settings alone):

- ``tcp_keepalives_idle`` = T/3, ``tcp_keepalives_interval`` = T/6, ``tcp_keepalives_count``
  = 4: an idle session (also one idle in a transaction) probes the silent client and gives
  up after T;
- ``tcp_user_timeout`` = T: data the server sent that stays unacknowledged for T ends the
  session (keepalives do not run while data is in flight);
- ``client_connection_check_interval`` = T/6: a session running a statement checks the
  socket that often, so a statement does not outlive its client.

The server therefore ends the session of a silent client within :func:`liveness_bound` (T
plus one check interval) of its last sign of life; its transaction rolls back and its locks
free, and a waiting claimant takes the key over. The settings are applied with
``set_config`` after connecting, not as startup ``options`` (PgBouncer refuses unknown
startup parameters). libpq's own keepalives get the same numbers (unless the connection
string sets them), so the client, too, notices a server that vanished.

**Connect errors** (:func:`connect_error`): a server that is down, starting, shutting down,
full, or unreachable may be back for the next try: :class:`DatabaseUnavailableError`
(retryable). A wrong password, an unknown role or database, a refused ``pg_hba.conf`` entry
or a malformed connection string will fail every try: :class:`ConfigurationError`
(permanent), whose message says what to fix.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.conninfo

from eos_airflow.errors import ConfigurationError, DatabaseUnavailableError, EosError

#: Seconds within which the server ends the session of a client that went silent. A minute
#: is far above any pause of a healthy worker (GC, a busy network: probes are answered by the
#: worker's kernel, not by its Python code) and far below the kernel's two hours.
DEFAULT_LIVENESS_TIMEOUT = 60.0
#: Environment variable overriding :data:`DEFAULT_LIVENESS_TIMEOUT` (seconds; 0 = off).
LIVENESS_ENV = "EOS_LIVENESS_TIMEOUT"
#: Shortest non-zero timeout: keepalive timers count in whole seconds, and the idle time,
#: the interval and the check interval are each at least one second.
MIN_LIVENESS_TIMEOUT = 5.0
#: Probes sent before an idle connection is given up: idle + count × interval = T.
KEEPALIVES_COUNT = 4
#: libpq parameters that carry client-side keepalives; a connection string that sets one
#: keeps its own values.
_LIBPQ_KEEPALIVES = ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count")


def liveness_timeout(value: float | None = None) -> float:
    """The liveness timeout in seconds: ``value``, else ``EOS_LIVENESS_TIMEOUT``, else the
    default; 0 means off. Raises :class:`ConfigurationError` for a value that is not one."""
    source = "liveness_timeout"
    if value is None:
        raw = os.environ.get(LIVENESS_ENV, "").strip()
        if not raw:
            return DEFAULT_LIVENESS_TIMEOUT
        source = LIVENESS_ENV
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(
                f"{LIVENESS_ENV}={raw!r} is not a number of seconds; set it to e.g. 60, "
                "or 0 to leave the server's TCP timeouts alone"
            ) from None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or value < 0
        or math.isinf(value)
    ):
        raise ConfigurationError(
            f"{source} must be a number of seconds >= 0 (0 = off), got {value!r}"
        )
    if 0 < value < MIN_LIVENESS_TIMEOUT:
        raise ConfigurationError(
            f"{source}={value:g} is too short: use at least {MIN_LIVENESS_TIMEOUT:g} seconds "
            "(the server's keepalive timers count in whole seconds), or 0 for off"
        )
    return float(value)


@dataclass(frozen=True)
class Liveness:
    """The TCP timers derived from one liveness timeout ``timeout`` (seconds, 0 = off)."""

    timeout: float

    @classmethod
    def of(cls, value: float | None = None) -> Liveness:
        return cls(liveness_timeout(value))

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    @property
    def keepalives_idle(self) -> int:
        return max(1, int(self.timeout // 3))

    @property
    def keepalives_interval(self) -> int:
        return max(1, int(self.timeout // 6))

    @property
    def check_interval_ms(self) -> int:
        return max(1000, int(self.timeout * 1000) // 6)

    @property
    def bound(self) -> float:
        """Seconds after a client's last sign of life by which the server has ended its
        session: T, plus one check interval for a session in the middle of a statement."""
        return self.timeout + self.check_interval_ms / 1000 if self.enabled else math.inf

    def server_settings(self, server_version: int) -> dict[str, str]:
        """The session settings to apply (``set_config``), by name."""
        if not self.enabled:
            return {}
        settings = {
            "tcp_keepalives_idle": str(self.keepalives_idle),
            "tcp_keepalives_interval": str(self.keepalives_interval),
            "tcp_keepalives_count": str(KEEPALIVES_COUNT),
            "tcp_user_timeout": str(int(self.timeout * 1000)),
        }
        if server_version >= 140000:
            settings["client_connection_check_interval"] = str(self.check_interval_ms)
        return settings

    def libpq_params(self, conninfo: str = "") -> dict[str, Any]:
        """Client-side keepalive parameters for libpq, unless ``conninfo`` sets its own."""
        if not self.enabled:
            return {}
        given = psycopg.conninfo.conninfo_to_dict(conninfo) if conninfo else {}
        if any(name in given for name in _LIBPQ_KEEPALIVES):
            return {}
        return {
            "keepalives": 1,
            "keepalives_idle": self.keepalives_idle,
            "keepalives_interval": self.keepalives_interval,
            "keepalives_count": KEEPALIVES_COUNT,
        }


#: The server settings liveness sets, in the order of the docs.
SERVER_SETTINGS = (
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
    "client_connection_check_interval",
)


def check_session(conn: psycopg.Connection[Any], liveness: Liveness) -> tuple[bool, str]:
    """Does ``conn``'s session carry ``liveness``'s settings? (ok, what it found): read
    back from ``pg_settings`` (``eos-airflow doctor``)."""
    found = dict(
        conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", [list(SERVER_SETTINGS)]
        ).fetchall()
    )
    shown = ", ".join(f"{name}={found.get(name, '-')}" for name in SERVER_SETTINGS)
    if not liveness.enabled:
        return False, (
            f"{LIVENESS_ENV}=0: the session keeps the server's TCP timeouts ({shown}; the "
            "kernel's defaults wait two hours before the first probe): a worker whose network "
            "vanishes keeps its keys that long. Unset it (60 s) or set a number of seconds"
        )
    wanted = liveness.server_settings(conn.info.server_version)
    if (conn.info.host or "").startswith("/"):  # Unix socket: the tcp_* settings read 0
        wanted = {k: v for k, v in wanted.items() if not k.startswith("tcp_")}
    differ = [name for name, value in wanted.items() if found.get(name) != value]
    if differ:
        return False, (
            f"the session does not carry the liveness settings it set ({shown}; wanted "
            f"{', '.join(f'{n}={wanted[n]}' for n in differ)}): a pooler in transaction "
            "mode runs sessions on other server connections; a worker whose network "
            "vanishes may keep its keys until the server's own TCP timeouts"
        )
    return True, (
        f"a worker that goes silent loses its session, and its keys, within "
        f"{liveness.bound:g} s ({shown})"
    )


def liveness_bound(value: float | None = None) -> float:
    """Seconds within which the server ends the session of a client that went silent."""
    return Liveness.of(value).bound


def _set_config(settings: Mapping[str, str]) -> tuple[str, list[str]]:
    """One statement applying ``settings`` to the session (names and values as parameters)."""
    calls = ", ".join("set_config(%s, %s, false)" for _ in settings)
    params = [part for item in settings.items() for part in item]
    return f"SELECT {calls}", params


def prepare(
    conn: psycopg.Connection[Any],
    liveness: Liveness,
    *,
    where: str = "the ledger database",
    settings: Mapping[str, str] | None = None,
) -> psycopg.Connection[Any]:
    """Make ``conn`` (just opened) an autocommit ledger connection with the liveness timers
    and ``settings`` applied to its session; closes it and raises a classified error (see
    :func:`connect_error`) if that fails."""
    wanted: dict[str, str] = {}
    try:
        conn.autocommit = True
        wanted = {**liveness.server_settings(conn.info.server_version), **(settings or {})}
        if wanted:
            conn.execute(*_set_config(wanted))
        if liveness.enabled:
            _client_keepalives(conn, liveness)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, psycopg.OperationalError):
            raise connect_error(exc, where) from exc
        if isinstance(exc, psycopg.Error):  # e.g. a pooler or service that forbids them
            raise ConfigurationError(
                f"{where} refused the session settings {', '.join(wanted)} "
                f"({' '.join(str(exc).split())}); allow them, or set {LIVENESS_ENV}=0 to "
                "connect without server-side liveness (a vanished worker then keeps its "
                "keys until the server's own TCP timeouts end its session)"
            ) from exc
        raise
    return conn


async def aprepare(
    conn: psycopg.AsyncConnection[Any],
    liveness: Liveness,
    settings: Mapping[str, str] | None = None,
) -> psycopg.AsyncConnection[Any]:
    """:func:`prepare` for an async connection (the trigger's watcher)."""
    try:
        await conn.set_autocommit(True)
        wanted = {**liveness.server_settings(conn.info.server_version), **(settings or {})}
        if wanted:
            await conn.execute(*_set_config(wanted))
    except BaseException:
        await conn.close()
        raise
    return conn


def _client_keepalives(conn: psycopg.Connection[Any], liveness: Liveness) -> None:
    """Client-side keepalives on a connection opened by someone else (the Airflow hook does
    not pass libpq's ``keepalives*``), unless its parameters set them: socket options on the
    connection's own TCP socket."""
    if any(name in conn.info.get_parameters() for name in _LIBPQ_KEEPALIVES):
        return
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", liveness.keepalives_idle),
            ("TCP_KEEPINTVL", liveness.keepalives_interval),
            ("TCP_KEEPCNT", KEEPALIVES_COUNT),
        ):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    finally:
        sock.close()  # closes the duplicate only


def connect(
    conninfo: str,
    *,
    application_name: str,
    liveness_timeout: float | None = None,
    where: str = "the ledger database",
    settings: Mapping[str, str] | None = None,
) -> psycopg.Connection[Any]:
    """Open an autocommit ledger connection to ``conninfo`` with the liveness timers set;
    a failure raises what :func:`connect_error` says (``where`` names the database)."""
    liveness = Liveness.of(liveness_timeout)
    try:
        params = liveness.libpq_params(conninfo)
        conn = psycopg.connect(
            conninfo, autocommit=True, application_name=application_name, **params
        )
    except psycopg.Error as exc:
        raise connect_error(exc, where) from exc
    return prepare(conn, liveness, where=where, settings=settings)


async def aconnect(
    conninfo: str,
    *,
    application_name: str,
    liveness_timeout: float | None = None,
    settings: Mapping[str, str] | None = None,
) -> psycopg.AsyncConnection[Any]:
    """:func:`connect` for asyncio; errors are psycopg's (the watcher reconnects itself)."""
    liveness = Liveness.of(liveness_timeout)
    conn = await psycopg.AsyncConnection.connect(
        conninfo,
        autocommit=True,
        application_name=application_name,
        **liveness.libpq_params(conninfo),
    )
    return await aprepare(conn, liveness, settings)


# --- connect errors ----------------------------------------------------------------------

#: (pattern in libpq's message, what to fix): failures that every further try would meet.
_PERMANENT: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), fix)
    for pattern, fix in (
        (
            r"password authentication failed|no password supplied|password is required"
            r"|authentication failed for user",
            "the server refused the credentials: fix the password (or the user name)",
        ),
        (
            r"role \S+ does not exist",
            "the user does not exist on the server: fix the user name, or create the role",
        ),
        (
            r"database \S+ does not exist",
            "the database does not exist on the server: fix its name, or create it (then run "
            "`eos-airflow db migrate`)",
        ),
        (
            r"no pg_hba\.conf entry|pg_hba\.conf rejects",
            "the server's pg_hba.conf admits no such connection: add an entry for this host, "
            "user and database, or connect as another user or with another sslmode",
        ),
        (
            r"is not permitted to log in",
            "the role may not log in: `ALTER ROLE ... LOGIN`, or connect as another user",
        ),
        (
            r"permission denied for database|does not have CONNECT privilege",
            "the role may not connect to that database: `GRANT CONNECT ON DATABASE ... TO "
            "role`, or connect as another user",
        ),
        (
            r"(Peer|Ident|GSSAPI|SSPI|LDAP|RADIUS|certificate) authentication failed",
            "the server's authentication method refused this user: fix the user name or the "
            "server's pg_hba.conf",
        ),
        (
            r"server does not support SSL|SSL was required|certificate verify failed"
            r"|root certificate file|channel binding (is )?required",
            "the connection's SSL settings do not fit the server: fix sslmode, sslrootcert or "
            "channel_binding",
        ),
        (
            r"invalid (integer|port number|connection option|sslmode|channel_binding)"
            r"|Servname not supported|missing \"=\" after|invalid percent-encoded token"
            r"|invalid URI|unterminated quoted string",
            "the connection parameters are malformed: fix them (a URI such as "
            "postgresql://USER@HOST:5432/DBNAME)",
        ),
    )
)

#: (pattern, why it is worth another try): recognised passing failures; anything not
#: recognised as permanent is treated as passing too — a few wasted retries cost less than
#: a task failed for good by a blip (a multi-database effect has nothing else to finish it).
_PASSING: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), why)
    for pattern, why in (
        (
            r"the database system is (starting up|shutting down|in recovery mode"
            r"|not yet accepting connections|not accepting connections)|in recovery mode",
            "the server is starting up, shutting down or recovering",
        ),
        (
            r"too many (clients|connections)|connection slots are reserved",
            "the server has no free connection slot (max_connections, or the role's or "
            "database's CONNECTION LIMIT); raise the limit if this keeps happening",
        ),
        (
            r"temporary failure in name resolution|try again",
            "the host name could not be resolved right now (DNS)",
        ),
        (
            r"connection refused|no such file or directory",
            "nothing accepts connections at that address: the server is down or restarting "
            "(or the host or port is wrong)",
        ),
        (
            r"timeout expired|timed out|no route to host|network is unreachable"
            r"|host is unreachable",
            "the server did not answer in time (network, or an overloaded server)",
        ),
        (
            r"terminating connection|server closed the connection|could not receive data"
            r"|connection reset|ssl syscall error|eof detected",
            "the server closed the connection while it was being set up",
        ),
        (
            r"name or service not known|nodename nor servname|failed to resolve host",
            "the host name did not resolve: check it if this keeps happening",
        ),
    )
)


def connect_error(exc: BaseException, where: str) -> EosError:
    """What a failed connection attempt means for the task: :class:`ConfigurationError`
    (every try would fail: says what to fix) or :class:`DatabaseUnavailableError` (retryable).

    ``exc`` is psycopg's error; ``where`` names the database as the user knows it ("the
    ledger database", "Airflow connection 'warehouse'"). The message is libpq's, which names
    host, port, user and database but never the password."""
    if isinstance(exc, EosError):
        return exc
    message = " ".join(str(exc).split())
    if isinstance(exc, psycopg.ProgrammingError):  # libpq could not parse the parameters
        return ConfigurationError(
            f"cannot connect to {where}: its parameters are not a valid PostgreSQL "
            f"connection string ({_no_quotes(message)}); fix them, e.g. as a URI such as "
            "postgresql://USER@HOST:5432/DBNAME"
        )
    for pattern, fix in _PERMANENT:
        if pattern.search(message):
            return ConfigurationError(
                f"cannot connect to {where} ({message}); {fix}. Retrying does not help"
            )
    why = next(
        (why for pattern, why in _PASSING if pattern.search(message)),
        "the server could not be reached",
    )
    return DatabaseUnavailableError(
        f"cannot connect to {where} ({message}); {why}. Another try may succeed (Airflow "
        "retries the task); if this keeps failing, check that the server runs and that the "
        "host and port are right"
    )


#: A quoted part of libpq's parse error: it quotes the offending text, which may be (part
#: of) a password (``invalid percent-encoded token: "s3cr%et"``).
_QUOTED = re.compile(r'"([^"]*)"')


def _no_quotes(message: str) -> str:
    return _QUOTED.sub(lambda m: m[0] if len(m[1]) < 2 else '"…"', message)


__all__ = [
    "DEFAULT_LIVENESS_TIMEOUT",
    "LIVENESS_ENV",
    "SERVER_SETTINGS",
    "Liveness",
    "aconnect",
    "aprepare",
    "check_session",
    "connect",
    "connect_error",
    "liveness_bound",
    "liveness_timeout",
    "prepare",
]
