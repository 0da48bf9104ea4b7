"""Protocol tier: Delta Lake writes made idempotent by Delta's own transaction marker
(``eos.delta``).

A Delta commit is an object-store write, outside PostgreSQL's transaction: it cannot commit
with the ledger. Delta's log records *application transactions* (``txn`` actions:
``appId``, ``version``) in the same atomic commit as the data. Each write of an effect
carries ``appId`` = the effect key and ``version`` = the ledger version the attempt is
writing (the committed version + 1), and first reads the table's transaction for the key:

- found at that version (or newer): an earlier attempt of this version wrote the data and
  died before the ledger committed — nothing is written again, the ledger commits;
- not found: the data is written with the marker, in one Delta commit.

Two attempts of one version racing (a zombie and the try that fenced it) cannot both land:
Delta's conflict check refuses a commit whose ``appId`` a concurrent commit since the
table was read also set (delta-rs ``CommitFailedError``, "Concurrent transaction"), so the
loser fails (:class:`LakehouseConflictError`) without writing, and a ledger commit of a
fenced attempt is refused as always. The write is the step that cannot be undone: do it last
in the function — what runs after it and raises leaves the write in the table, and the
retry finds it and does not write again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from eos_airflow import failpoints
from eos_airflow.errors import (
    ConfigurationError,
    EosError,
    FencedError,
    LakehouseConflictError,
    LakehouseStorageError,
    MisuseError,
)
from eos_airflow.ledger.store import LedgerStore

if TYPE_CHECKING:
    from eos_airflow.protocol.effect import Effect

MODES = ("append", "overwrite")
#: delta-rs storage options: cloud credentials and endpoints (AWS_*, AZURE_*, GOOGLE_*, in
#: either case) and object_store's client settings. Anything else is a typo that delta-rs
#: would silently ignore.
_OPTION = re.compile(r"^(aws|azure|google|gcs|hdfs|lakefs)_\w+$", re.IGNORECASE)
_CLIENT_OPTIONS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "timeout",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "http1_only",
        "http2_only",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "user_agent",
        "default_content_type",
        "randomize_addresses",
        "conditional_put",
        "copy_if_not_exists",
        "max_retries",
        "retry_timeout",
        "backoff_config.init_backoff",
        "backoff_config.max_backoff",
        "backoff_config.base",
        "mount_allow_unsafe_rename",
    }
)
_SCHEMES = ("file://", "s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "memory://")


def check_options(storage_options: Mapping[str, str] | None) -> dict[str, str]:
    """The storage options as delta-rs takes them; refuses what it would ignore."""
    if storage_options is None:
        return {}
    if not isinstance(storage_options, Mapping):
        raise ConfigurationError(
            "eos.delta(): storage_options= must be a dict of strings, got "
            f"{type(storage_options).__name__}"
        )
    options: dict[str, str] = {}
    for name, value in storage_options.items():
        if not isinstance(name, str) or not isinstance(value, (str, int, float, bool)):
            raise ConfigurationError(
                f"eos.delta(): storage option {name!r} must be a string with a string value"
            )
        if not (_OPTION.match(name) or name.lower() in _CLIENT_OPTIONS):
            raise ConfigurationError(
                f"eos.delta(): unknown storage option {name!r}: delta-rs takes cloud settings "
                "(AWS_*, AZURE_*, GOOGLE_*: e.g. AWS_ENDPOINT_URL, AWS_REGION) and client "
                "settings (allow_http, timeout, conditional_put, ...)"
            )
        options[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return options


def check_uri(table_uri: Any) -> str:
    if not isinstance(table_uri, str) or not table_uri.strip():
        raise ConfigurationError(
            "eos.delta(): table_uri must be the table's location, e.g. 'file:///data/sales' "
            f"or 's3://bucket/sales', got {table_uri!r}"
        )
    if "://" in table_uri and not table_uri.startswith(_SCHEMES):
        raise ConfigurationError(
            f"eos.delta(): {table_uri!r}: unknown scheme; use one of "
            + ", ".join(s.removesuffix("://") for s in _SCHEMES)
        )
    return table_uri.rstrip("/")


class DeltaTarget:
    """The Delta table ``table_uri`` as one effect writes it (``eos.delta(...)``)."""

    def __init__(
        self, eos: Effect, table_uri: str, storage_options: Mapping[str, str] | None = None
    ) -> None:
        self.uri = check_uri(table_uri)
        self.options = check_options(storage_options)
        self._eos = eos

    def __repr__(self) -> str:
        return f"<DeltaTarget {self.uri} key={self._eos.key!r}>"

    def write(
        self,
        data: Any,
        *,
        mode: str = "append",
        predicate: str | None = None,
        partition_by: str | list[str] | None = None,
    ) -> dict[str, Any]:
        """Write ``data`` (a pyarrow Table, RecordBatchReader or anything that exports an
        Arrow stream) once for this effect version: ``mode="append"``, or ``"overwrite"``
        (of the rows matching ``predicate``, a SQL condition such as ``"day = '2026-12-01'"``,
        or of the whole table). Creates the table (partitioned by ``partition_by``) when the
        location holds none.

        Returns ``{"table_uri", "delta_version", "app_id", "txn_version", "written"}``:
        ``written`` is False when an earlier attempt of this version already wrote it
        (``delta_version`` is then the table's version when it was found)."""
        return self.prepare(mode=mode, predicate=predicate, partition_by=partition_by).commit(data)

    def prepare(
        self,
        *,
        mode: str = "append",
        predicate: str | None = None,
        partition_by: str | list[str] | None = None,
    ) -> DeltaWrite:
        """The write's first half: check the arguments and that this attempt owns the key,
        read the table and its marker for the key. :meth:`DeltaWrite.commit` is the second
        half (the protocol's two steps, which the stateful model interleaves with other
        attempts' steps)."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        if mode not in MODES:
            raise ConfigurationError(
                f"eos.delta().write(): mode must be one of {', '.join(MODES)}, got {mode!r}"
            )
        if predicate is not None and mode != "overwrite":
            raise ConfigurationError(
                "eos.delta().write(): predicate= selects the rows an overwrite replaces; "
                "use it with mode='overwrite'"
            )
        eos = self._eos
        if self.uri in eos.delta_writes:
            raise MisuseError(
                f"eos.delta({self.uri!r}).write() was already called in effect {eos.key!r}: "
                "one write per table per effect (its marker is the effect's); combine the data "
                "into one write"
            )
        # The table is read before the ledger says this attempt still owns the key: a newer
        # attempt can only write after taking the key over, so after this read, and Delta
        # refuses this attempt's commit if that write (with the same marker) came first.
        table = self._open(DeltaTable, TableNotFoundError)
        version = self._writing_version()
        # An earlier attempt of this version may have written: look for its marker (on S3 a
        # read of the log of its own). The first attempt of a version has nothing to find.
        found = None
        if table is not None and not eos.first_of_version:
            found = table.transaction_version(eos.key)
        eos.delta_writes[self.uri] = True
        return DeltaWrite(self, table, version, found, mode, predicate, partition_by)

    def _writing_version(self) -> int:
        """The ledger version this attempt writes, if it still owns the key."""
        eos = self._eos
        owner = getattr(eos.session, "owner", None)
        if owner is None:
            raise MisuseError(
                "eos.delta() is available in single-database effects (Ledger.run, "
                "@task.exactly_once without targets=): its marker is the effect's version"
            )
        entry = LedgerStore(eos.conn, eos.schema).entry(eos.key)
        if entry is None or entry.owner != owner:
            raise FencedError(
                f"effect {eos.key!r}: attempt {eos.attempt} no longer owns the key (a newer "
                "attempt took it over); it writes nothing to Delta"
            )
        return entry.version + 1

    def _open(self, table_class: Any, not_found: type[Exception]) -> Any:
        """The table, or None when the location holds no Delta table yet (nothing there)."""
        try:
            return table_class(self.uri, storage_options=self.options or None)
        except not_found as exc:
            if self._has_files():
                raise ConfigurationError(
                    f"eos.delta(): {self.uri!r} is not a Delta table: it holds files but no "
                    "Delta log (_delta_log/); point table_uri at a Delta table or at an empty "
                    "location"
                ) from exc
            return None
        except OSError as exc:
            raise self._refused(exc) from exc

    def _has_files(self) -> bool:
        """Whether the location holds anything (a missing location holds nothing)."""
        from pyarrow import fs  # type: ignore[import-untyped]

        filesystem, path = _filesystem(self.uri, self.options)
        try:
            info = filesystem.get_file_info(path)
        except OSError as exc:
            raise self._refused(exc) from exc
        if info.type == fs.FileType.NotFound:
            return False
        if info.type == fs.FileType.File:
            return True
        selector = fs.FileSelector(path, recursive=False, allow_not_found=True)
        return bool(filesystem.get_file_info(selector))

    def _refused(self, exc: BaseException) -> EosError:
        text = " ".join(str(exc).split())[:400]
        if "cast" in text.lower() or "schema" in text.lower():
            return ConfigurationError(
                f"Delta table {self.uri}: the data does not match the table's schema "
                f"({text}); nothing was written. Write columns of the table's types, or "
                "change the table's schema first"
            )
        return LakehouseStorageError(
            f"Delta table {self.uri}: the storage refused the request or could not be reached "
            f"({text}); nothing was written. Check table_uri and storage_options (endpoint, "
            "credentials, region); Airflow retries this"
        )


class DeltaWrite:
    """A prepared write (:meth:`DeltaTarget.prepare`): the table as read, the version this
    attempt writes and the marker the table held for the key then."""

    def __init__(
        self,
        target: DeltaTarget,
        table: Any,
        version: int,
        found: int | None,
        mode: str,
        predicate: str | None,
        partition_by: str | list[str] | None,
    ) -> None:
        self.target = target
        self.table = table
        self.version = version
        self.found = found
        self.mode = mode
        self.predicate = predicate
        self.partition_by = partition_by

    @property
    def done_already(self) -> bool:
        """An earlier attempt of this version wrote it: nothing is written again."""
        return self.found is not None and self.found >= self.version

    def commit(self, data: Any) -> dict[str, Any]:
        """Write ``data`` with the marker, on the table as read (a concurrent commit that set
        the same marker since then makes Delta refuse this one), unless it is done already."""
        from deltalake import CommitProperties, DeltaTable, Transaction
        from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

        target, table = self.target, self.table
        eos = target._eos
        app_id = eos.key
        if self.done_already:
            return self._result(app_id, self.found, written=False)
        marker = CommitProperties(
            app_transactions=[Transaction(app_id=app_id, version=self.version)]
        )
        if table is None:
            # The location held no table when read. Delta checks a commit's marker against
            # the commits made since the table was read, and a table-creating commit has no
            # such read: so the table is created first, empty (its own commit; a concurrent
            # creator's table is as good), and the write proceeds on the table as read then.
            data = _arrow(data)
            self._create(data.schema)
            self.table = table = target._open(DeltaTable, TableNotFoundError)
            if table is None:
                raise target._refused(OSError("the table just created cannot be read"))
            self.found = table.transaction_version(app_id)
            if self.done_already:
                return self._result(app_id, self.found, written=False)
        try:
            self._write(data, table, self.mode, marker)
        except (CommitFailedError, DeltaError) as exc:
            raise self._failure(exc) from exc
        failpoints.check("after_delta_commit", attempt=eos.attempt)
        return self._result(app_id, self.version, written=True)

    def _create(self, schema: Any) -> None:
        """Create the table, empty, unless one exists (also one created meanwhile)."""
        from deltalake import write_deltalake
        from deltalake.exceptions import CommitFailedError, DeltaError

        try:
            write_deltalake(
                self.target.uri,
                schema.empty_table(),
                mode="error",
                partition_by=self.partition_by,
                storage_options=self.target.options or None,
            )
        except CommitFailedError:
            pass  # a concurrent creator's first commit won
        except DeltaError as exc:
            if "already exists" not in str(exc):
                raise self._failure(exc) from exc
        except OSError as exc:
            raise self.target._refused(exc) from exc

    def _write(self, data: Any, table_or_uri: Any, mode: str, marker: Any) -> None:
        from deltalake import write_deltalake

        writer: Any = write_deltalake  # one call for every mode (typed per mode)
        try:
            writer(
                table_or_uri,
                data,
                mode=mode,
                predicate=self.predicate if mode == "overwrite" else None,
                partition_by=self.partition_by,
                storage_options=self.target.options or None,
                commit_properties=marker,
            )
        except OSError as exc:
            raise self.target._refused(exc) from exc
        except Exception as exc:
            if type(exc) is Exception:  # how deltalake reports an Arrow cast error
                raise self.target._refused(exc) from exc
            raise

    def _failure(self, exc: BaseException) -> EosError:
        from deltalake.exceptions import CommitFailedError

        if isinstance(exc, CommitFailedError):
            return LakehouseConflictError(
                f"Delta table {self.target.uri}: a concurrent commit conflicts with this "
                f"effect's write ({exc}); nothing of this effect was written. Retry (Airflow "
                "retries this): the next try finds the table as it is then"
            )
        return self.target._refused(exc)

    def _result(self, app_id: str, txn_version: int | None, *, written: bool) -> dict[str, Any]:
        version = self.table.version() if self.table is not None else None
        # the commit event names the table version the effect's write made (or found)
        self.target._eos.note("delta", self.target.uri, version)
        return {
            "table_uri": self.target.uri,
            "delta_version": version,
            "app_id": app_id,
            "txn_version": txn_version,
            "written": written,
        }


def _arrow(data: Any) -> Any:
    """``data`` as a pyarrow Table or RecordBatchReader (both know their schema)."""
    import pyarrow as pa

    if isinstance(data, (pa.Table, pa.RecordBatchReader)):
        return data
    if hasattr(data, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(data)
    raise ConfigurationError(
        "eos.delta().write(): data must be a pyarrow Table or RecordBatchReader (or export an "
        f"Arrow stream), got {type(data).__name__}"
    )


def _filesystem(uri: str, options: Mapping[str, str]) -> tuple[Any, str]:
    """A pyarrow filesystem for ``uri`` with the same endpoint and credentials as delta-rs."""
    from pyarrow import fs

    if uri.startswith(("s3://", "s3a://")):
        lowered = {k.lower(): v for k, v in options.items()}
        endpoint = lowered.get("aws_endpoint_url") or lowered.get("aws_endpoint")
        scheme = None
        if endpoint and "://" in endpoint:
            scheme, _, endpoint = endpoint.partition("://")
        filesystem = fs.S3FileSystem(
            access_key=lowered.get("aws_access_key_id"),
            secret_key=lowered.get("aws_secret_access_key"),
            session_token=lowered.get("aws_session_token"),
            region=lowered.get("aws_region") or lowered.get("aws_default_region"),
            endpoint_override=endpoint,
            scheme=scheme or "https",
        )
        return filesystem, uri.split("://", 1)[1]
    return fs.FileSystem.from_uri(uri if "://" in uri else f"file://{uri}")
