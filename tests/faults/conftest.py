"""Fixtures of the fault tests: a PostgreSQL server of their own, and a proxy in front of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eos_airflow import Ledger
from tests.faults.proxy import FaultProxy
from tests.faults.server import LocalServer


@pytest.fixture(scope="module")
def own_server() -> Iterator[LocalServer]:
    server = LocalServer().init().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def own_db(own_server: LocalServer, request) -> str:
    name = "eos_" + request.node.name.split("[")[0][-40:].lower()
    dsn = own_server.create_database(f"{name}_{id(request) % 100000}")
    with Ledger(dsn) as ledger:
        ledger.migrate()
    return dsn


@pytest.fixture
def proxy(own_server: LocalServer) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", own_server.port)) as p:
        yield p
