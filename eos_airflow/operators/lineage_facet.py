"""Adapters tier: ``EosRunFacet``, the OpenLineage run facet ``eos`` of an exactly-once task.

Imported only when the OpenLineage provider asks a task for its lineage (it needs the
``openlineage-python`` client); :mod:`eos_airflow.operators.lineage` builds it.
"""

from __future__ import annotations

import attrs
from openlineage.client.facet_v2 import RunFacet

#: Where the facet's JSON schema is published (its source: docs/lineage/EosRunFacet.json).
EOS_RUN_FACET_SCHEMA_URL = (
    "https://pypi.org/project/eos-airflow/schemas/EosRunFacet.json#/$defs/EosRunFacet"
)


@attrs.define
class EosRunFacet(RunFacet):
    """What the ledger did for this task's effect.

    :param key: the effect key.
    :param version: the committed version the task's result comes from.
    :param action: ``committed``, ``replaced``, ``recovered`` (several databases) or
        ``skipped`` (committed before: the work did not run again).
    :param attempt: the Airflow try number that ran (or skipped) the effect.
    :param ledgerConnId: the Airflow connection whose ledger holds the effect.
    :param committedAt: when the version was committed (ISO 8601), if known.
    """

    key: str
    version: int
    action: str
    attempt: int
    ledgerConnId: str | None = None  # noqa: N815 (OpenLineage fields are camelCase)
    committedAt: str | None = None  # noqa: N815

    @staticmethod
    def _get_schema() -> str:
        return EOS_RUN_FACET_SCHEMA_URL


__all__ = ["EOS_RUN_FACET_SCHEMA_URL", "EosRunFacet"]
