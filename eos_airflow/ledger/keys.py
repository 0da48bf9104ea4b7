"""Ledger tier: what an effect key (the ledger's primary key) and a ledger schema name may be."""

from __future__ import annotations

import re

from eos_airflow.errors import BadKeyError, ConfigurationError

#: Longest key accepted. Keys are primary-key values: PostgreSQL's btree entries stop near
#: 2,700 bytes, and 1,000 characters leaves room for multi-byte text.
MAX_KEY_CHARS = 1000

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: A ledger schema name: a plain lowercase identifier, never quoted differently anywhere. The
#: name is also written into ``$$``-quoted function bodies by the migrations, where an
#: identifier's quoting does not protect it, so only these names are accepted.
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: PostgreSQL names are at most 63 bytes (NAMEDATALEN - 1); longer ones are cut silently.
MAX_NAME_BYTES = 63


def check_schema(name: str) -> str:
    """``name`` if it is an acceptable ledger schema name, else :class:`ConfigurationError`
    saying what is allowed. Every entry that takes a schema calls it."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError("schema must be a non-empty name, e.g. 'eos'")
    if len(name.encode()) > MAX_NAME_BYTES:  # PostgreSQL would cut it: another schema
        raise ConfigurationError(
            f"schema name {name!r} is {len(name.encode())} bytes; PostgreSQL names "
            f"are at most {MAX_NAME_BYTES} bytes: choose a shorter schema name"
        )
    if not _SCHEMA.fullmatch(name):
        raise ConfigurationError(
            f"schema name {name!r} is not allowed: a ledger schema must be a plain lowercase "
            "identifier (a-z or _ first, then a-z, 0-9 or _; at most 63 characters), e.g. "
            "'eos' or 'eos_ledger'; choose such a name"
        )
    return name


def check_key(key: object) -> str:
    """Return ``key`` if it is usable as an effect key, else raise :class:`BadKeyError`."""
    if not isinstance(key, str):
        raise BadKeyError(f"effect key must be a string, got {type(key).__name__}: {key!r}")
    if not key.strip():
        raise BadKeyError(
            "effect key is empty; pass key= a non-empty string such as 'sales/{{ ds }}'"
        )
    if len(key) > MAX_KEY_CHARS:
        raise BadKeyError(
            f"effect key is {len(key)} characters, the limit is {MAX_KEY_CHARS}; "
            "use a shorter key (e.g. a hash of the long part)"
        )
    bad = _CONTROL.search(key)
    if bad:
        raise BadKeyError(
            f"effect key {key!r} contains control character {bad.group()!r}; "
            "keys are printable text"
        )
    return key


__all__ = ["MAX_KEY_CHARS", "MAX_NAME_BYTES", "check_key", "check_schema"]
