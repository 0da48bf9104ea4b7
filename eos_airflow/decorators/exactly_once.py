"""Adapters tier: ``@task.exactly_once``, a TaskFlow function committed with its ledger entry.

.. code-block:: python

    @task.exactly_once(conn_id="warehouse", key="sales/{{ ds }}")
    def load(eos, ds=None):
        eos.conn.execute("INSERT INTO sales_daily SELECT ... WHERE day = %s", [ds])
        return {"day": ds}

Several databases, committed atomically (docs/twophase.md):

.. code-block:: python

    @task.exactly_once(targets={"a": "bank_a", "b": "bank_b"}, ledger_conn_id="bank_a",
                       protocol="2pc", key="transfer/{{ ds }}")
    def transfer(eos, ds=None):
        eos.conns["a"].execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
        eos.conns["b"].execute("UPDATE accounts SET balance = balance + 10 WHERE id = 1")
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk.bases.decorator import task_decorator_factory

from eos_airflow.operators.base import ExactlyOnceBaseOperator, SeveralTargets
from eos_airflow.protocol.effect import Effect
from eos_airflow.protocol.fingerprints import code_of

if TYPE_CHECKING:
    from airflow.sdk.bases.decorator import TaskDecorator

#: Name of the parameter through which the open effect is passed to the function.
EFFECT_PARAMETER = "eos"


class _ExactlyOnceDecoratedOperator(ExactlyOnceBaseOperator, _PythonDecoratedOperator):
    """Calls the function inside the effect: ``eos`` (if it takes one) is the open effect."""

    custom_operator_name = "@task.exactly_once"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Any = None,
        op_kwargs: dict[str, Any] | None = None,
        targets: Mapping[str, str] | None = None,
        ledger_conn_id: str | None = None,
        protocol: str = "local",
        **kwargs: Any,
    ) -> None:
        op_kwargs = dict(op_kwargs or {})
        self._takes_effect = EFFECT_PARAMETER in inspect.signature(python_callable).parameters
        if self._takes_effect:
            # Airflow binds the signature when the DAG is parsed; the real effect exists
            # only at run time, so a placeholder stands in until execute_callable.
            op_kwargs.setdefault(EFFECT_PARAMETER, None)
        super().__init__(
            python_callable=python_callable,
            op_args=op_args or (),
            op_kwargs=op_kwargs,
            several=SeveralTargets.of(targets, ledger_conn_id, protocol),
            **kwargs,
        )
        self._effect: Effect | None = None

    def execute(self, context: Any) -> Any:
        def call(eos: Effect) -> Any:
            self._effect = eos
            try:
                return super(_ExactlyOnceDecoratedOperator, self).execute(context)
            finally:
                self._effect = None

        return self.run_effect(context, call)

    def fingerprint_inputs(self, context: Any) -> dict[str, Any]:
        """The function (qualified name and code) and its call arguments."""
        kwargs = {k: v for k, v in (self.op_kwargs or {}).items() if k != EFFECT_PARAMETER}
        return {
            "function": code_of(self.python_callable),
            "args": list(self.op_args or ()),
            "kwargs": kwargs,
            "templates_dict": getattr(self, "templates_dict", None),
        }

    def execute_callable(self) -> Any:
        if self._takes_effect:
            # a new dict: op_kwargs may be the context itself when the function takes **kwargs
            self.op_kwargs = {**self.op_kwargs, EFFECT_PARAMETER: self._effect}
        return super().execute_callable()


def exactly_once_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """Wrap a function into an exactly-once task (``@task.exactly_once(conn_id=...)``)."""
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_ExactlyOnceDecoratedOperator,
        **kwargs,
    )


#: ``from eos_airflow import exactly_once`` — the same decorator as ``@task.exactly_once``.
exactly_once = exactly_once_task
