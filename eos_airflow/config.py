"""Adapters tier: the ``[eos_airflow]`` section of Airflow's configuration, read and checked.

The options are declared, with their descriptions and defaults, in the provider info
(:func:`eos_airflow.provider.get_provider_info`, key ``config``), so ``airflow config list
--section eos_airflow`` shows them. Each is set like any Airflow option: in ``airflow.cfg`` or
as ``AIRFLOW__EOS_AIRFLOW__<OPTION>`` in the environment of the process that parses the DAG
(the DAG processor) and runs the task (the worker).

Each accessor reads the current value and checks it: a value that is not one raises
:class:`~eos_airflow.errors.ConfigurationError` (also a ``ValueError``) naming the option,
what it got and what it takes, so a DAG whose operators take their defaults from a bad setting
fails to import with that message. The operators read them when the DAG is parsed, for every
argument left at ``None``; an argument given to the operator wins.
"""

from __future__ import annotations

import math

from eos_airflow.errors import ConfigurationError
from eos_airflow.ledger import connection
from eos_airflow.ledger.keys import check_schema
from eos_airflow.protocol.effect import MAX_RESULT_BYTES
from eos_airflow.protocol.local import DEFAULT_WAIT_TIMEOUT
from eos_airflow.states import OnCommitted, OnMismatch

#: The configuration section (``[eos_airflow]``; environment ``AIRFLOW__EOS_AIRFLOW__*``).
SECTION = "eos_airflow"

#: Defaults, as the provider info declares them (tests/airflow/test_config.py holds the two
#: equal): used when Airflow has not loaded the provider's configuration.
DEFAULT_LEDGER_SCHEMA = "eos"
DEFAULT_LEDGER_CONN_ID = "eos_ledger"
DEFAULT_ON_COMMITTED = OnCommitted.SKIP.value
DEFAULT_ON_MISMATCH = "warn"
#: ``on_mismatch`` choices (what a skip does when the inputs differ from the committed ones).
ON_MISMATCH_CHOICES = tuple(OnMismatch)


def _setting(option: str) -> str | None:
    """The option's text as set (airflow.cfg, environment) or declared, None when empty."""
    from airflow.sdk import conf

    value = conf.get(SECTION, option, fallback=None)
    return (str(value).strip() or None) if value is not None else None


def _raw(option: str, default: str) -> str:
    """The option's text, else ``default`` (the provider info declares the same)."""
    return _setting(option) or default


def _bad(option: str, value: object, what: str) -> ConfigurationError:
    env = f"AIRFLOW__{SECTION.upper()}__{option.upper()}"
    return ConfigurationError(
        f"[{SECTION}] {option} = {value!r} is not valid: {what}; fix it in airflow.cfg or {env}"
    )


def _seconds(option: str, value: str, *, minimum: float = 0.0) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if math.isnan(seconds) or math.isinf(seconds) or seconds < minimum:
        raise _bad(option, value, f"give a number of seconds >= {minimum:g}")
    return seconds


def ledger_schema() -> str:
    """``[eos_airflow] ledger_schema``: the schema holding the ledger (default ``eos``)."""
    value = _raw("ledger_schema", DEFAULT_LEDGER_SCHEMA)
    try:
        return check_schema(value)
    except ConfigurationError as exc:
        raise _bad("ledger_schema", value, str(exc)) from None


def ledger_conn_id() -> str:
    """``[eos_airflow] ledger_conn_id``: the Airflow connection of the ledger the audit UI
    reads (default ``eos_ledger``)."""
    return _raw("ledger_conn_id", DEFAULT_LEDGER_CONN_ID)


def wait_timeout() -> float:
    """``[eos_airflow] wait_timeout``: seconds a task waits for another live attempt of its
    key before failing with the retryable ``KeyInProgressError``."""
    return _seconds("wait_timeout", _raw("wait_timeout", str(DEFAULT_WAIT_TIMEOUT)))


def on_committed() -> OnCommitted:
    """``[eos_airflow] on_committed``: what a task does when its key is committed already."""
    value = _raw("on_committed", DEFAULT_ON_COMMITTED)
    if value not in {c.value for c in OnCommitted}:
        raise _bad("on_committed", value, f"choose one of {', '.join(OnCommitted)}")
    return OnCommitted(value)


def on_mismatch() -> str:
    """``[eos_airflow] on_mismatch``: what a skip does when the attempt's inputs differ from
    those of the committed version."""
    value = _raw("on_mismatch", DEFAULT_ON_MISMATCH)
    if value not in ON_MISMATCH_CHOICES:
        raise _bad("on_mismatch", value, f"choose one of {', '.join(ON_MISMATCH_CHOICES)}")
    return value


def max_result_bytes() -> int:
    """``[eos_airflow] max_result_bytes``: the largest result (JSON bytes) stored in the
    ledger and returned again on a skip."""
    value = _raw("max_result_bytes", str(MAX_RESULT_BYTES))
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise _bad("max_result_bytes", value, "give a whole number of bytes >= 1")
    return limit


def liveness_timeout() -> float | None:
    """``[eos_airflow] liveness_timeout``: seconds within which PostgreSQL ends the session
    of a worker that went silent (its keepalive timers; 0 = off), or None when unset: then
    ``EOS_LIVENESS_TIMEOUT``, else 60 s."""
    raw = _setting("liveness_timeout")
    if raw is None:
        return None
    value = _seconds("liveness_timeout", raw)
    if 0 < value < connection.MIN_LIVENESS_TIMEOUT:
        raise _bad(
            "liveness_timeout",
            raw,
            f"use at least {connection.MIN_LIVENESS_TIMEOUT:g} seconds (the server's keepalive "
            "timers count in whole seconds), or 0 for off",
        )
    return value


__all__ = [
    "DEFAULT_LEDGER_CONN_ID",
    "DEFAULT_LEDGER_SCHEMA",
    "DEFAULT_ON_COMMITTED",
    "DEFAULT_ON_MISMATCH",
    "ON_MISMATCH_CHOICES",
    "SECTION",
    "ledger_conn_id",
    "ledger_schema",
    "liveness_timeout",
    "max_result_bytes",
    "on_committed",
    "on_mismatch",
    "wait_timeout",
]
