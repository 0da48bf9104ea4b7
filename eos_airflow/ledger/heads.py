"""Ledger tier: the heads file: every key's hash-chain head at one moment, kept outside the
database.

The hash chains show that no event was edited, inserted or removed *inside* a key's chain,
but someone able to bypass the append-only trigger could also cut a chain's newest events
and set the ledger row's head back, or remove a key's whole history with its row: what is
left still verifies. A heads file (kept on other storage, in a ticket or in another system)
pins each key's chain head at the time it was written::

    eos-airflow ledger heads --out /audit/eos-2024-06-30.json
    eos-airflow ledger verify --heads /audit/eos-2024-06-30.json

Each chain must still contain the head event the file recorded, with the same hash (or gc
must have removed it, recording that in the chain), and the newest event the file recorded
must still be there. The file carries a digest over its heads, so an edited file is refused.

Files are marked ``"format": "eos-airflow-heads"``; files written before the command was
named ``ledger heads`` carry ``"eos-airflow-checkpoint"`` and are read the same way.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

from eos_airflow.errors import ConfigurationError
from eos_airflow.ledger.chain import Problem, load_starts
from eos_airflow.ledger.store import LedgerStore

FORMAT = "eos-airflow-heads"
#: the marker of heads files written by ``ledger checkpoint`` (same content, still read)
LEGACY_FORMATS = ("eos-airflow-checkpoint",)
FORMAT_VERSION = 1
WRITE_ONE = "write one with `eos-airflow ledger heads --out FILE`"


def heads_digest(heads: dict[str, list[Any]]) -> str:
    """SHA-256 over every key's head, in key order: ``key US seq US hash LF``."""
    digest = hashlib.sha256()
    for key in sorted(heads, key=lambda k: k.encode()):
        seq, head = heads[key]
        digest.update(f"{key}\x1f{seq}\x1f{head}\n".encode())
    return digest.hexdigest()


def take(conn: psycopg.Connection[Any], schema: str) -> dict[str, Any]:
    """The chain heads of the ledger now (one consistent snapshot), as a heads file's content."""
    outermost = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if outermost:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        store = LedgerStore(conn, schema)
        heads = {key: [seq, bytes(h).hex()] for key, seq, h in store.chain_heads()}
        last = store.newest_event()
        events, pruned = store.event_totals()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "schema": schema,
        "database": conn.info.dbname,
        "taken_at": datetime.now(timezone.utc).isoformat(),
        "last_event": None
        if last is None
        else {"id": last[0], "key": last[1], "seq": last[2], "hash": bytes(last[3]).hex()},
        "events": events,
        "pruned_events": pruned,
        "keys": len(heads),
        "heads_digest": heads_digest(heads),
        "heads": heads,
    }


def write(taken: dict[str, Any], path: str) -> None:
    """Write a heads file (the content :func:`take` returned)."""
    Path(path).write_text(json.dumps(taken, sort_keys=True, indent=1) + "\n", "utf-8")


def load(path: str) -> dict[str, Any]:
    """Read and self-check a heads file; a damaged or foreign file is a clear error."""
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"heads file {path!r} does not exist; {WRITE_ONE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigurationError(
            f"heads file {path!r} is not a heads file written by "
            f"`eos-airflow ledger heads` ({exc}); {WRITE_ONE}"
        ) from None
    if not isinstance(data, dict) or data.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise ConfigurationError(
            f"heads file {path!r} is not a heads file written by "
            f"`eos-airflow ledger heads` (no format marker); {WRITE_ONE}"
        )
    if data.get("format_version") != FORMAT_VERSION:
        raise ConfigurationError(
            f"heads file {path!r} has format version {data.get('format_version')!r}; "
            f"this eos-airflow reads version {FORMAT_VERSION}: upgrade eos-airflow"
        )
    heads = data.get("heads")
    try:
        valid = isinstance(heads, dict) and heads_digest(heads) == data.get("heads_digest")
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ConfigurationError(
            f"heads file {path!r} is damaged: its heads do not match its heads_digest "
            "(edited after it was written); use an intact copy"
        )
    return data


def check(conn: psycopg.Connection[Any], schema: str, pinned: dict[str, Any]) -> list[Problem]:
    """Where the ledger lost history that the heads file ``pinned`` recorded."""
    if pinned.get("schema") != schema:
        raise ConfigurationError(
            f"the heads file was written of ledger schema {pinned.get('schema')!r}, "
            f"not {schema!r}; pass --schema {pinned.get('schema')}"
        )
    problems: list[Problem] = []
    starts = load_starts(conn, schema)
    store = LedgerStore(conn, schema)
    rows = {key: seq for key, seq, _ in store.chain_heads()}
    for key, (seq, head) in sorted(pinned["heads"].items(), key=lambda kv: kv[0].encode()):
        if key not in rows:
            problems.append(
                Problem(
                    key,
                    seq,
                    None,
                    f"the heads file records {seq} events of "
                    "this key; its ledger row and history are gone (removed)",
                )
            )
            continue
        found = _event_hash(conn, schema, key, seq)
        start = starts.get(key)
        if found is not None:
            if found.hex() != head:
                problems.append(
                    Problem(
                        key,
                        seq,
                        None,
                        f"event {seq} differs from the heads file's (history rewritten since)",
                    )
                )
        elif start is not None and start.through_seq >= seq:
            if start.through_seq == seq and start.through_hash.hex() != head:
                problems.append(
                    Problem(
                        key,
                        seq,
                        None,
                        f"gc says it removed events up to "
                        f"{seq}, but not the ones the heads file recorded",
                    )
                )
        elif rows[key] < seq:
            problems.append(
                Problem(
                    key,
                    seq,
                    None,
                    f"the heads file records event {seq} ({head[:16]}…), the "
                    f"ledger now ends at {rows[key]} (the tail was removed)",
                )
            )
        else:
            problems.append(
                Problem(
                    key, seq, None, f"event {seq}, recorded by the heads file, is missing (removed)"
                )
            )
    last = pinned.get("last_event")
    if last is not None:
        newest = store.newest_event()
        newest_id = newest[0] if newest else 0
        if newest_id < last["id"]:
            problems.append(
                Problem(
                    last["key"],
                    last["seq"],
                    last["id"],
                    f"the heads file's newest event has id {last['id']}; the "
                    f"ledger's newest is {newest_id} (the newest events were "
                    "removed)",
                )
            )
    return problems


def _event_hash(conn: psycopg.Connection[Any], schema: str, key: str, seq: int) -> bytes | None:
    return LedgerStore(conn, schema).event_hash(key, seq)
