"""Protocol tier: the effect handle given to user code, and the small values around it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import psycopg

from eos_airflow.errors import ConfigurationError, ResultError
from eos_airflow.states import OnCommitted

if TYPE_CHECKING:
    from eos_airflow.protocol.checkpoints import Checkpoints
    from eos_airflow.protocol.offsets import Offsets

#: Default bound on a stored result. Results travel as XCom and live in the ledger row: large
#: outputs belong in a table, with a reference returned.
MAX_RESULT_BYTES = 1024 * 1024
ON_COMMITTED = tuple(OnCommitted)

#: ``\u0000`` in JSON text, unless its backslash is itself escaped (the text ``\\u0000``).
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


@dataclass(frozen=True)
class Origin:
    """Who runs an attempt. Tries of one origin fence each other by try number; attempts of
    different origins (another run, another script) wait for each other instead."""

    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    map_index: int | None = None
    #: Which code runs the attempt, recorded in its claim and commit events (not compared):
    #: e.g. Airflow's ``dag_version_id``, ``bundle_name``, ``bundle_version``.
    code: Mapping[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Previous:
    """The committed effect that an ``on_committed="replace"`` attempt supersedes."""

    result: Any
    version: int
    committed_at: datetime | None


@dataclass
class Effect:
    """The open effect: write through ``conn``; the ledger commits with your writes.

    ``conn`` is inside the effect's transaction: do not commit or roll it back yourself.
    """

    key: str
    attempt: int
    conn: psycopg.Connection[Any]
    previous: Previous | None = None
    origin: Origin = field(default_factory=Origin)
    schema: str = "eos"
    #: The protocol's handle for chunk commits (protocol/checkpoints.py); set by the protocol.
    session: Any = field(default=None, repr=False, compare=False)
    #: No earlier attempt wrote anything of the version this attempt writes (this attempt's
    #: claim created the key): eos.delta() need not look for an earlier attempt's write. Set
    #: by the protocol; False when unknown.
    first_of_version: bool = field(default=False, repr=False, compare=False)
    _offsets: Any = field(default=None, init=False, repr=False, compare=False)
    #: Sequence number of the last message this effect published (eos_airflow/relay).
    _outbox_seq: int | None = field(default=None, init=False, repr=False, compare=False)
    #: Lakehouse catalogs this effect opened, by their settings (protocol/iceberg.py).
    lakehouse_catalogs: dict[Any, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    #: Delta tables this effect wrote (protocol/delta.py): one write per table.
    delta_writes: dict[str, bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    #: What the effect's commit event records beside the protocol's fields (see :meth:`note`).
    commit_detail: dict[str, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def note(self, section: str, name: str, value: Any) -> None:
        """Record ``value`` under ``section`` → ``name`` in this effect's commit event (e.g.
        the Iceberg snapshot id or Delta version a table write produced), so the audit trail
        says what the version made. JSON values; the event's detail is bounded (8 kB)."""
        self.commit_detail.setdefault(section, {})[name] = value

    @property
    def offsets(self) -> Offsets:
        """Source positions committed with this effect's writes (protocol/offsets.py)."""
        if self._offsets is None:
            from eos_airflow.protocol.offsets import Offsets

            owner = getattr(self.session, "owner", None)
            self._offsets = Offsets(self.conn, key=self.key, schema=self.schema, owner=owner)
        return self._offsets

    @property
    def offsets_in_use(self) -> Offsets | None:
        """The offsets handle, if this effect used ``eos.offsets``: the protocol writes its
        staged positions just before each commit point."""
        return self._offsets

    def next_message_seq(self, last_committed: Callable[[], int]) -> int:
        """The sequence number of this effect's next outbox message; ``last_committed``
        reads the number reached by committed chunks of the version being written (asked
        once per effect)."""
        if self._outbox_seq is None:
            self._outbox_seq = last_committed()
        self._outbox_seq += 1
        return self._outbox_seq

    def checkpoints(
        self, source: Any, *, every: int | None = None, seconds: float | None = None, **options: Any
    ) -> Checkpoints:
        """Iterate ``source`` in chunks, each committed with a recovery point; a retry
        continues after the last committed chunk (protocol/checkpoints.py)."""
        from eos_airflow.protocol.checkpoints import Checkpoints

        return Checkpoints(self, source, every=every, seconds=seconds, **options)

    def publish(
        self,
        destination: str,
        payload: Any,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Queue a message (``"nats:SUBJECT"`` or ``"kafka:TOPIC"``, JSON payload) in the
        transactional outbox: it is written in this effect's transaction, so it exists once
        the effect commits, and a relay delivers it under a deterministic message id
        (eos_airflow/relay). Returns the message id."""
        from eos_airflow.protocol.outbox import publish

        return publish(self, destination, payload, key=key, headers=headers)

    def iceberg(
        self,
        identifier: str | tuple[str, ...],
        *,
        schema: Any = None,
        partition_spec: Any = None,
        warehouse: str | None = None,
        properties: Mapping[str, str] | None = None,
    ) -> Any:
        """The Iceberg table ``identifier`` (``"namespace.table"``) of the catalog ``"eos"``
        in the ledger's database, as a pyiceberg ``Table`` whose commits (append, overwrite,
        delete, schema changes) join this effect's transaction: they become visible when the
        effect commits, and not at all if it rolls back (protocol/iceberg.py).

        ``schema`` (a pyarrow or Iceberg schema) creates the namespace and the table when
        missing, with ``partition_spec``, its files under ``warehouse``; ``properties`` are
        the catalog's (FileIO settings such as ``s3.endpoint``). Needs the ``lakehouse``
        extra."""
        try:
            from eos_airflow.protocol.iceberg import open_table
        except ImportError as exc:
            raise ConfigurationError(
                f"eos.iceberg() needs pyiceberg ({exc}): pip install 'eos-airflow[lakehouse]'"
            ) from exc
        return open_table(
            self,
            identifier,
            schema=schema,
            partition_spec=partition_spec,
            warehouse=warehouse,
            properties=properties,
        )

    def delta(self, table_uri: str, *, storage_options: Mapping[str, str] | None = None) -> Any:
        """The Delta table at ``table_uri`` (``file://``, ``s3://``, ...), written once for
        this effect: ``eos.delta(uri).write(data, mode="append"|"overwrite", predicate=None,
        partition_by=None)``. The write carries Delta's transaction marker (app id = the
        effect key, version = the ledger version being written), so a retry after a crash
        between Delta's commit and the ledger's finds it and does not write again
        (protocol/delta.py). Make the write the function's last step. Needs the
        ``lakehouse`` extra."""
        try:
            import deltalake  # noqa: F401

            from eos_airflow.protocol.delta import DeltaTarget
        except ImportError as exc:
            raise ConfigurationError(
                f"eos.delta() needs deltalake ({exc}): pip install 'eos-airflow[lakehouse]'"
            ) from exc
        return DeltaTarget(self, table_uri, storage_options)

    #: Connections by target name of a multi-target effect (protocol/twophase.py).
    targets: Mapping[str, psycopg.Connection[Any]] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def conns(self) -> Mapping[str, psycopg.Connection[Any]]:
        """Connections by target name: every target of a multi-target effect
        (``targets={"a": ..., "b": ...}``), or one target named ``"default"``."""
        if self.targets is not None:
            return MappingProxyType(dict(self.targets))
        return MappingProxyType({"default": self.conn})

    def __repr__(self) -> str:
        return f"<Effect key={self.key!r} attempt={self.attempt}>"


def encode_result(result: Any, *, limit: int = MAX_RESULT_BYTES) -> str:
    """Encode the function's return value as the JSON stored in the ledger.

    Raises :class:`ResultError` (before anything commits) when it is not JSON or too large.
    """
    try:
        text = json.dumps(result, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ResultError(
            f"the result must be JSON (dict, list, str, int, float, bool or None), "
            f"got {type(result).__name__}: {exc}; return plain data, e.g. str() a datetime"
        ) from None
    if _JSON_NUL.search(text):  # json escapes NUL as \u0000, which jsonb refuses
        raise ResultError("the result contains a NUL character, which PostgreSQL cannot store")
    size = len(text.encode())
    if size > limit:
        raise ResultError(
            f"the result is {size:,} bytes of JSON, the limit is {limit:,}; store large "
            "outputs in a table and return a reference (or raise max_result_bytes)"
        )
    return text
