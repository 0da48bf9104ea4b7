"""Ledger tier: the filters that reads of the ledger take (``--since``, key prefixes)."""

from __future__ import annotations

import re
from datetime import datetime

import pendulum

from eos_airflow.errors import ConfigurationError

_DURATION = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str | None) -> datetime | None:
    """``30d``, ``12h``, ``15m`` ago, or an ISO 8601 timestamp."""
    if value is None:
        return None
    match = _DURATION.match(value.strip())
    if match:
        return pendulum.now("UTC") - pendulum.duration(**{_UNITS[match[2]]: int(match[1])})
    try:
        return pendulum.parse(value)  # type: ignore[return-value]
    except (ValueError, pendulum.parsing.exceptions.ParserError):
        raise ConfigurationError(
            f"--since {value!r} is neither a duration (30d, 12h, 15m, 90s, 2w) nor an ISO "
            "timestamp (2024-01-31T00:00:00Z)"
        ) from None


def like_prefix(prefix: str | None) -> str | None:
    """A LIKE pattern matching the keys that start with ``prefix`` (its wildcards escaped)."""
    if prefix is None:
        return None
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
