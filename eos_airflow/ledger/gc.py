"""Ledger tier: ``eos-airflow ledger gc``: remove old history of committed effects, keep it
verifiable.

Only committed keys with no running attempt whose last commit is older than the cutoff are
touched, and of them only the events older than the cutoff (a prefix of the chain). The
database function ``gc_prune`` (SECURITY DEFINER, schema revision 0006) is the one path
past the append-only trigger: per key it deletes the prefix, records where the remaining
chain starts in ``pruned_chains``, and appends a hash-chained ``pruned`` event saying the
same, all in one transaction. ``ledger verify`` then starts the key's chain there. Since
revision 0012 it first keeps, in ``pruned_claims``, the highest try of each task instance
among the ``claimed`` events it removes (the ``pruned`` event lists them as ``claims``):
``claim()`` fences with them and the remaining events, so fencing does not depend on what gc
removed.

Keys are pruned in batches, one transaction each, so a big run holds few locks at a time
and a crash loses at most one batch's work (which the next run redoes).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from eos_airflow.errors import ConfigurationError
from eos_airflow.ledger.store import LedgerStore

#: Keys per gc_prune call (one transaction): bounds the locks held and the work a crash loses.
BATCH_KEYS = 500


@dataclass
class GcReport:
    cutoff: datetime
    dry_run: bool
    keys: int = 0
    events: int = 0
    pruned: list[dict[str, Any]] = field(default_factory=list)  # the first 100 keys

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "dry_run": self.dry_run,
            "keys": self.keys,
            "events": self.events,
            "sample": self.pruned,
        }


def actor() -> str:
    return f"{getpass.getuser()}@{os.uname().nodename}"


def candidates(
    conn: psycopg.Connection[Any], schema: str, cutoff: datetime, prefix: str | None = None
) -> list[str]:
    return LedgerStore(conn, schema).gc_candidates(cutoff, prefix)


def gc(
    conn: psycopg.Connection[Any],
    schema: str,
    cutoff: datetime,
    *,
    dry_run: bool = False,
    prefix: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GcReport:
    """Prune every eligible key (``prefix`` is a LIKE pattern); ``progress(done, total)``
    is called after each batch."""
    report = GcReport(cutoff, dry_run)
    keys = candidates(conn, schema, cutoff, prefix)
    on_behalf_of = actor()
    for start in range(0, len(keys), BATCH_KEYS):
        batch = keys[start : start + BATCH_KEYS]
        if dry_run:
            n = LedgerStore(conn, schema).gc_preview(batch, cutoff)
            report.keys += len(batch)
            report.events += n
            report.pruned.extend({"key": k} for k in batch[: 100 - len(report.pruned)])
        else:
            try:
                with conn.transaction():
                    rows = LedgerStore(conn, schema).gc_prune(batch, cutoff, on_behalf_of)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise ConfigurationError(
                    f"this database role may not run gc ({exc.diag.message_primary}); run "
                    "`eos-airflow ledger gc` as the role that ran `eos-airflow db migrate`"
                ) from exc
            report.keys += len(rows)
            report.events += sum(r[1] for r in rows)
            report.pruned.extend(
                {"key": k, "events": n, "through_seq": s}
                for k, n, s in rows[: 100 - len(report.pruned)]
            )
        if progress:
            progress(min(start + BATCH_KEYS, len(keys)), len(keys))
    return report
