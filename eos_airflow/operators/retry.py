"""Adapters tier: ``EosRetryPolicy``, eos-airflow's errors mapped onto Airflow's retry policies.

Every exactly-once operator, ``@task.exactly_once``, ``LedgerSensor`` and
``OutboxRelayOperator`` take it as their ``retry_policy`` unless given one. Airflow (3.3+)
asks the policy, in the worker, what to do with the exception that ended a try:

- an error of eos-airflow that another try cannot fix (``EosError.retryable`` is false: bad
  SQL, a missing table, bad input, an unknown connection, a fenced attempt, ...): **fail** now,
  without spending the task's remaining retries; the reason is in the task log;
- an error of eos-airflow that another try can fix (another run holds the key, the database
  or the lakehouse storage did not answer, ...): **retry**, as the task's ``retries`` and
  ``retry_delay`` allow (a policy never adds tries); the reason is kept on the task instance;
- any other exception (one of your own code): what ``fallback`` decides, by default Airflow's
  standard rule (retry while tries remain).

Whether an error is retryable is a property of its class, or of the SQLSTATE for errors from
the database (eos_airflow/errors.py). A ``retry_policy=`` given to the operator replaces this
one; ``EosRetryPolicy(fallback=your_policy)`` keeps the mapping for eos-airflow's errors and
lets yours decide the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import RetryDecision, RetryPolicy

from eos_airflow.errors import EosError

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Longest reason kept: Airflow stores at most 500 characters of a retry's reason.
MAX_REASON = 500


def decide(exception: BaseException) -> RetryDecision | None:
    """The decision for an error of eos-airflow, or None for any other exception."""
    if not isinstance(exception, EosError):
        return None
    what = f"{type(exception).__name__}: {exception}"
    if exception.retryable:
        reason = f"eos-airflow: retryable error, retried while the task has tries left: {what}"
        return RetryDecision.retry(reason=reason[:MAX_REASON])
    reason = f"eos-airflow: permanent error, not retried (another try fails the same way): {what}"
    return RetryDecision.fail(reason=reason[:MAX_REASON])


class EosRetryPolicy(RetryPolicy):
    """Fail at once on eos-airflow's permanent errors, retry its retryable ones; leave other
    exceptions to ``fallback`` (default: Airflow's standard retries)."""

    def __init__(self, fallback: RetryPolicy | None = None) -> None:
        self.fallback = fallback

    def evaluate(
        self,
        exception: BaseException,
        try_number: int,
        max_tries: int,
        context: Context | None = None,
    ) -> RetryDecision:
        decision = decide(exception)
        if decision is not None:
            return decision
        if self.fallback is not None:
            return self.fallback.evaluate(exception, try_number, max_tries, context)
        return RetryDecision.default()

    def serialize(self) -> dict[str, Any]:
        return {
            "__type": "EosRetryPolicy",
            "fallback": None if self.fallback is None else self.fallback.serialize(),
        }

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> EosRetryPolicy:
        fallback = data.get("fallback")
        if fallback is None:
            return cls()
        kinds: dict[str, type[RetryPolicy]] = {"EosRetryPolicy": EosRetryPolicy}
        from airflow.sdk import ExceptionRetryPolicy

        kinds["ExceptionRetryPolicy"] = ExceptionRetryPolicy
        kind = kinds.get(fallback.get("__type", ""))
        if kind is None:
            raise NotImplementedError(
                f"EosRetryPolicy cannot rebuild a fallback of type {fallback.get('__type')!r}"
            )
        return cls(kind.deserialize(fallback))

    def __repr__(self) -> str:
        return f"EosRetryPolicy(fallback={self.fallback!r})"


def default_retry_policy(operator: Any) -> None:
    """Give ``operator`` an :class:`EosRetryPolicy` unless it was given a ``retry_policy``."""
    if getattr(operator, "retry_policy", None) is None:
        operator.retry_policy = EosRetryPolicy()


__all__ = ["EosRetryPolicy", "decide", "default_retry_policy"]
