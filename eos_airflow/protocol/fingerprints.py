"""Protocol tier: input fingerprints: what a committed version was made from.

A payment API refuses an idempotency key reused with another request body; the ledger does
the same for effect keys. Each effect may carry a fingerprint of its inputs (the rendered
SQL and parameters of a SQL operator; source query, target and mode of a transfer; the
function's qualified name, code and call arguments of ``@task.exactly_once``), stored with
the version it commits. A later attempt that skips the key with another fingerprint is a
*mismatch*: the key says "done", but the inputs say "not this". ``on_mismatch`` decides what
happens (protocol/local.py).

A fingerprint is ``sha256:`` and the SHA-256 of the inputs as canonical JSON: keys sorted,
no whitespace; dates and times as ISO 8601, sets sorted, bytes as hex, dataclasses and
objects with ``__dict__`` by their fields, anything else by its type and ``repr`` with
memory addresses removed (so that the same value gives the same fingerprint in every
process).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import inspect
import json
import re
import textwrap
import uuid
from collections.abc import Callable, Mapping
from typing import Any

#: ``<object at 0x7f...>``: a memory address, different in every process.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: Nesting bound: deeper values are fingerprinted by their repr.
_MAX_DEPTH = 32


def canonical(value: Any, _depth: int = 0) -> Any:
    """``value`` as plain JSON data that is the same for equal inputs in every process."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return (
            value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
        )
    if _depth > _MAX_DEPTH:
        return _repr(value)
    if isinstance(value, enum.Enum):
        return canonical(value.value, _depth + 1)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return {"timedelta": value.total_seconds()}
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, Mapping):
        return {str(k): canonical(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v, _depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [canonical(v, _depth + 1) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "type": _type_name(value),
            "fields": {
                f.name: canonical(getattr(value, f.name), _depth + 1)
                for f in dataclasses.fields(value)
            },
        }
    if callable(value):
        return {"callable": getattr(value, "__qualname__", _repr(value))}
    return _repr(value)


def _type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _repr(value: Any) -> str:
    return f"{_type_name(value)}:{_ADDRESS.sub('', repr(value))}"


def fingerprint(**inputs: Any) -> str:
    """The fingerprint of ``inputs`` (named parts, e.g. ``sql=..., parameters=...``)."""
    text = json.dumps(canonical(inputs), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def code_of(fn: Callable[..., Any]) -> dict[str, str]:
    """A function's identity for a fingerprint: its qualified name and the SHA-256 of its
    source (dedented; of its bytecode and constants when the source cannot be read)."""
    fn = inspect.unwrap(fn)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    try:
        body = textwrap.dedent(inspect.getsource(fn)).encode("utf-8")
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        body = (
            code.co_code + repr(code.co_consts).encode("utf-8")
            if code is not None
            else repr(fn).encode("utf-8")
        )
    return {"function": name, "code": hashlib.sha256(body).hexdigest()}


__all__ = ["canonical", "code_of", "fingerprint"]
