"""Package tier: eos-airflow: exactly-once effects for Apache Airflow 3.

``Ledger`` and the errors import without Airflow; the Airflow adapters (``exactly_once``,
``ExactlyOnceSQLOperator``, ``LedgerSensor``, ``LedgerTrigger``) are imported on first use, so scripts and the CLI stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eos_airflow.api import Ledger
from eos_airflow.errors import (
    AlreadyCommittedError,
    BadKeyError,
    CommitNotDoneError,
    CommitOutcomeUnknownError,
    ConfigurationError,
    DatabaseUnavailableError,
    DeliveryError,
    EosError,
    FailpointError,
    FencedError,
    FingerprintMismatchError,
    HorizonTimeoutError,
    InDoubtError,
    KafkaDataLostError,
    KafkaError,
    KeyInProgressError,
    LakehouseConflictError,
    LakehouseStorageError,
    LedgerIntegrityError,
    LedgerSchemaError,
    LostClaimError,
    MessageError,
    MisuseError,
    ParticipantError,
    PermissionDenied,
    PoolingError,
    ResultError,
    UserCodeError,
)
from eos_airflow.protocol.effect import Effect, Origin, Previous

if TYPE_CHECKING:
    from eos_airflow.decorators.exactly_once import exactly_once
    from eos_airflow.multiledger import MultiLedger
    from eos_airflow.operators.incremental import IncrementalTableOperator
    from eos_airflow.operators.kafka import KafkaToPostgresOperator
    from eos_airflow.operators.lakehouse import (
        ExactlyOnceDeltaOperator,
        ExactlyOnceIcebergOperator,
    )
    from eos_airflow.operators.multi import MultiTargetSQLOperator
    from eos_airflow.operators.outbox import OutboxRelayOperator
    from eos_airflow.operators.sql import ExactlyOnceSQLOperator
    from eos_airflow.operators.transfer import ExactlyOnceTransferOperator
    from eos_airflow.sensors.ledger import LedgerSensor
    from eos_airflow.triggers.ledger import LedgerTrigger

__version__ = "0.1.0"

_LAZY = {
    "exactly_once": "eos_airflow.decorators.exactly_once",
    "ExactlyOnceSQLOperator": "eos_airflow.operators.sql",
    "ExactlyOnceIcebergOperator": "eos_airflow.operators.lakehouse",
    "ExactlyOnceDeltaOperator": "eos_airflow.operators.lakehouse",
    "ExactlyOnceTransferOperator": "eos_airflow.operators.transfer",
    "IncrementalTableOperator": "eos_airflow.operators.incremental",
    "KafkaToPostgresOperator": "eos_airflow.operators.kafka",
    "OutboxRelayOperator": "eos_airflow.operators.outbox",
    "LedgerSensor": "eos_airflow.sensors.ledger",
    "LedgerTrigger": "eos_airflow.triggers.ledger",
    "MultiTargetSQLOperator": "eos_airflow.operators.multi",
    "MultiLedger": "eos_airflow.multiledger",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eos_airflow' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AlreadyCommittedError",
    "BadKeyError",
    "CommitNotDoneError",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "DeliveryError",
    "Effect",
    "EosError",
    "ExactlyOnceDeltaOperator",
    "ExactlyOnceIcebergOperator",
    "ExactlyOnceSQLOperator",
    "ExactlyOnceTransferOperator",
    "FailpointError",
    "FencedError",
    "FingerprintMismatchError",
    "HorizonTimeoutError",
    "InDoubtError",
    "IncrementalTableOperator",
    "KafkaDataLostError",
    "KafkaError",
    "KafkaToPostgresOperator",
    "KeyInProgressError",
    "LakehouseConflictError",
    "LakehouseStorageError",
    "Ledger",
    "LedgerIntegrityError",
    "LedgerSchemaError",
    "LedgerSensor",
    "LedgerTrigger",
    "LostClaimError",
    "MessageError",
    "MisuseError",
    "MultiLedger",
    "MultiTargetSQLOperator",
    "Origin",
    "OutboxRelayOperator",
    "ParticipantError",
    "PermissionDenied",
    "PoolingError",
    "Previous",
    "ResultError",
    "UserCodeError",
    "exactly_once",
]
