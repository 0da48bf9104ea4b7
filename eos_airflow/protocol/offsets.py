"""Protocol tier: source offsets committed with the outputs: ``eos.offsets`` (docs/guarantees.md,
"Offsets").

A consumer that reads a source (a Kafka partition, a table past a monotonic column, files in
order) must remember how far it got. Kept anywhere else, the position and the outputs can
disagree after a crash: outputs written but the position not advanced (duplicates on the
retry) or the reverse (a gap). Here the position lives in ``{schema}.offsets`` in the target
database and is written **in the effect's transaction**, like Kafka's
``sendOffsetsToTransaction``: outputs and position commit together or not at all.

.. code-block:: python

    def consume(eos):
        start = eos.offsets.get("kafka:orders/0", -1) + 1     # locks the source's row
        batch = read_from(start)
        eos.conn.cursor().executemany("INSERT INTO orders VALUES (%s, %s)", batch)
        eos.offsets["kafka:orders/0"] = start + len(batch) - 1  # staged
        return {"rows": len(batch)}                             # commit writes both

- ``get`` takes a transaction lock on the source (and ``FOR UPDATE`` on its row), so two
  effects consuming one source serialise: the second reads the first's committed position.
- Setting a position stages it; the protocol writes every staged position just before the
  commit point (and before each chunk's recovery point) with ``{schema}.advance_offsets``,
  which appends one ``offsets`` event holding each source's old and new position.
- Positions are any JSON value and are per ledger (schema and database).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg

from eos_airflow.errors import ConfigurationError, ResultError
from eos_airflow.ledger.store import LedgerStore

_MISSING = object()


class Offsets:
    """Positions of named sources, read and advanced inside one effect's transaction.

    Mapping-like: ``get(source, default=None)``, ``offsets[source]``, ``source in offsets``,
    ``offsets[source] = position`` (same as ``set``). Reading a source locks it until the
    effect's transaction ends.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        *,
        key: str,
        schema: str = "eos",
        owner: uuid.UUID | None = None,
    ) -> None:
        self._conn = conn
        self._key = key
        self._schema = schema
        self._owner = owner
        self._staged: dict[str, Any] = {}
        self._locked: dict[str, Any] = {}  # source -> committed position read (this txn)

    def __repr__(self) -> str:
        return f"<Offsets key={self._key!r} staged={sorted(self._staged)}>"

    # -- reading -------------------------------------------------------------------------
    def _committed(self, source: str) -> Any:
        if source not in self._locked:
            found, position = LedgerStore(self._conn, self._schema).offset(source)
            self._locked[source] = position if found else _MISSING
        return self._locked[source]

    def get(self, source: str, default: Any = None) -> Any:
        """The position staged in this effect, else the last committed one, else ``default``."""
        _check_source(source)
        if source in self._staged:
            return self._staged[source]
        position = self._committed(source)
        return default if position is _MISSING else position

    def __getitem__(self, source: str) -> Any:
        position = self.get(source, _MISSING)
        if position is _MISSING:
            raise KeyError(source)
        return position

    def __contains__(self, source: object) -> bool:
        return isinstance(source, str) and self.get(source, _MISSING) is not _MISSING

    # -- advancing -----------------------------------------------------------------------
    def set(self, source: str, position: Any) -> None:
        """Stage ``position`` for ``source``; it commits with the effect's outputs."""
        _check_source(source)
        try:
            json.dumps(position, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ResultError(
                f"offset position for {source!r} must be JSON (number, string, list, dict), "
                f"got {type(position).__name__}: {exc}"
            ) from None
        if source not in self._staged:
            self._committed(source)  # lock the source now, in the effect's transaction
        self._staged[source] = position

    def __setitem__(self, source: str, position: Any) -> None:
        self.set(source, position)

    @property
    def staged(self) -> dict[str, Any]:
        """Positions set in this effect and not yet written."""
        return dict(self._staged)

    def __iter__(self) -> Iterator[str]:
        return iter(self._staged)

    def __len__(self) -> int:
        return len(self._staged)

    def flush(self) -> dict[str, Any]:
        """Write the staged positions in the current transaction (the protocol calls this just
        before its commit point); return ``{source: {"from": old, "to": new}}``."""
        if not self._staged:
            return {}
        moves = LedgerStore(self._conn, self._schema).advance_offsets(
            self._key, self._owner, json.dumps(self._staged, allow_nan=False)
        )
        self._staged.clear()
        return moves

    def transaction_ended(self) -> None:
        """Forget the positions read: the next read locks the source again."""
        self._locked.clear()


def _check_source(source: object) -> None:
    if not isinstance(source, str) or not source.strip():
        raise ConfigurationError(
            f"an offset source must be a non-empty name such as 'kafka:orders/0' or "
            f"'table:public.readings', got {source!r}"
        )


__all__ = ["Offsets"]
