"""API tier: where a relay sends messages: NATS JetStream and Kafka.

A sink's :meth:`Sink.send` returns only when the broker acknowledged every message of the
batch (or raises), so the relay marks rows delivered only after they are durable:

- **NATS JetStream** (:class:`NatsSink`): each message is published with the
  ``Nats-Msg-Id`` header set to its outbox message id and its acknowledgement awaited. A
  re-send within the stream's ``duplicate_window`` is dropped by the server (the ack says
  ``duplicate``), so a relay crash between sending and marking costs nothing.
- **Kafka** (:class:`KafkaSink`): one producer transaction per batch
  (``transactional.id`` derived from the relay identity; idempotent producer), the message id
  in the ``eos-message-id`` header. A crash before the transaction commits leaves an aborted
  transaction that ``read_committed`` consumers never see; the next relay with the same
  identity fences the old producer (``init_transactions``). A crash after the commit but
  before the rows are marked re-sends them in a new transaction: Kafka keeps both copies, so
  consumers deduplicate by the header (``KafkaToPostgresOperator`` does, in its inbox).

nats-py is asyncio-only; :class:`NatsSink` runs a private event loop so that the relay stays
synchronous like the rest of the protocol.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote

from eos_airflow.errors import ConfigurationError, DeliveryError
from eos_airflow.protocol.messages import KAFKA_MSG_ID_HEADER, NATS_MSG_ID_HEADER, OutboxMessage

log = logging.getLogger(__name__)

#: Seconds to wait for a broker to acknowledge a batch before the relay gives up (the rows
#: stay undelivered and the next run sends them again under the same ids).
DEFAULT_SEND_TIMEOUT = 30.0


class Sink(Protocol):
    scheme: str

    def send(self, messages: Sequence[OutboxMessage]) -> int:
        """Deliver ``messages`` in order; return how many the broker dropped as duplicates."""

    def close(self) -> None: ...


class NatsSink:
    """Publishes to NATS JetStream with ``Nats-Msg-Id`` set to the outbox message id."""

    scheme = "nats"

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        timeout: float = DEFAULT_SEND_TIMEOUT,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import nats
        except ImportError:
            raise ConfigurationError(
                "the NATS sink needs nats-py: pip install 'eos-airflow[nats]'"
            ) from None
        urls = [servers] if isinstance(servers, str) else list(servers)
        # The credentials travel as nats-py options, never inside the URLs it may show.
        self.servers, credentials = split_servers(urls)
        self._shown = [_redact(url) for url in urls]
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        try:
            self._nc = self._loop.run_until_complete(
                nats.connect(
                    servers=self.servers,
                    connect_timeout=min(timeout, 10.0),
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.2,
                    error_cb=_nats_error,
                    **{**credentials.options(), **dict(options or {})},
                )
            )
        except Exception as exc:
            self._loop.close()
            raise DeliveryError(
                f"cannot connect to NATS at {', '.join(self._shown)}: "
                f"{exc or type(exc).__name__}; check the URL and that the "
                "server runs with JetStream enabled (-js)"
            ) from exc
        self._js = self._nc.jetstream(timeout=timeout)

    def __repr__(self) -> str:
        return f"<NatsSink servers={self._shown!r}>"

    def send(self, messages: Sequence[OutboxMessage]) -> int:
        return self._loop.run_until_complete(self._send(messages))

    async def _send(self, messages: Sequence[OutboxMessage]) -> int:
        from nats.js.errors import NoStreamResponseError

        async def one(message: OutboxMessage) -> bool:
            headers = {**message.headers, NATS_MSG_ID_HEADER: message.message_id}
            ack = await self._js.publish(
                message.destination.name, message.body, timeout=self.timeout, headers=headers
            )
            return bool(ack.duplicate)

        # Publishes are written in order on one connection; their acks are awaited together.
        try:
            acks = await asyncio.gather(*(one(m) for m in messages))
        except NoStreamResponseError as exc:
            subjects = sorted({m.destination.name for m in messages})
            raise DeliveryError(
                f"no JetStream stream stores subject(s) {', '.join(subjects)}; create one "
                "(e.g. `nats stream add --subjects 'alerts.>' --dupe-window 2m`) whose "
                "duplicate window is longer than a relay outage"
            ) from exc
        except Exception as exc:
            raise DeliveryError(
                f"NATS did not acknowledge the batch ({type(exc).__name__}: "
                f"{exc}); the messages stay in the outbox and are re-sent "
                "under the same ids"
            ) from exc
        return sum(acks)

    def close(self) -> None:
        try:
            if not self._nc.is_closed:
                self._loop.run_until_complete(self._nc.close())
        finally:
            self._loop.close()


async def _nats_error(exc: Exception) -> None:
    """nats-py reports connection errors here (its default logs a traceback per attempt);
    the failure itself reaches the caller as an exception."""
    log.debug("NATS client error: %s", exc)


@dataclass(frozen=True)
class NatsCredentials:
    """The credentials of a NATS server URL: ``user`` and ``password``, or a ``token``."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never shows a secret
        return (
            f"NatsCredentials(user={self.user!r}, password={_hidden(self.password)}, "
            f"token={_hidden(self.token)})"
        )

    def options(self) -> dict[str, str]:
        """Keyword arguments of ``nats.connect`` (only those that are set)."""
        given = {"user": self.user, "password": self.password, "token": self.token}
        return {name: value for name, value in given.items() if value is not None}

    def url(self, server: str) -> str:
        """``server`` (without credentials) with these credentials percent-encoded into it."""
        scheme, sep, rest = server.partition("://")
        if not sep:
            scheme, rest = "", server
        if self.token is not None:
            auth = quote(self.token, safe="") + "@"
        elif self.user is not None:
            auth = quote(self.user, safe="")
            auth += (":" + quote(self.password, safe="")) if self.password is not None else ""
            auth += "@"
        else:
            auth = ""
        return f"{scheme}{sep}{auth}{rest}"


def _hidden(secret: str | None) -> str:
    return "None" if secret is None else "'***'"


def split_url(url: str) -> tuple[str, NatsCredentials]:
    """``nats://user:pass@host:4222`` → (``nats://host:4222``, the credentials).

    The user info is everything between ``://`` and the *last* ``@`` of the authority, so a
    password with an unescaped ``/``, ``#``, ``?`` or ``@`` is still taken whole; percent-escapes
    are decoded. ``nats://TOKEN@host`` (no ``:``) is token authentication.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url, NatsCredentials()
    userinfo, _, hostpart = rest.rpartition("@")
    prefix = f"{scheme}://" if sep else ""
    if ":" in userinfo:
        user, _, password = userinfo.partition(":")
        credentials = NatsCredentials(user=unquote(user), password=unquote(password))
    else:
        credentials = NatsCredentials(token=unquote(userinfo))
    return prefix + hostpart, credentials


def split_servers(urls: Sequence[str]) -> tuple[list[str], NatsCredentials]:
    """The URLs without credentials, and their one set of credentials (nats-py takes one)."""
    split = [split_url(url) for url in urls]
    found = {credentials for _, credentials in split if credentials != NatsCredentials()}
    if len(found) > 1:
        raise ConfigurationError(
            "the NATS server URLs carry different credentials; nats-py uses one set for every "
            "server: give the same user/password or token in each URL"
        )
    return [server for server, _ in split], (found.pop() if found else NatsCredentials())


def _redact(url: str) -> str:
    """A URL fit for messages and logs: ``nats://user:***@host:4222``, ``nats://***@host``
    (a token), anything else unchanged."""
    server, credentials = split_url(url)
    if credentials == NatsCredentials():
        return url
    shown = (
        NatsCredentials(token="***")
        if credentials.token is not None
        else NatsCredentials(user=credentials.user, password="***")
    )
    return shown.url(server).replace("%2A%2A%2A", "***")


class KafkaSink:
    """Produces to Kafka in one transaction per batch, the message id in a header."""

    scheme = "kafka"

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        transactional_id: str,
        timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> None:
        try:
            import confluent_kafka  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "the Kafka sink needs confluent-kafka: pip install 'eos-airflow[kafka]'"
            ) from None
        if "bootstrap.servers" not in config:
            raise ConfigurationError(
                "the Kafka producer config has no 'bootstrap.servers'; "
                "set it in the connection's extra JSON"
            )
        self.config = {**config, "transactional.id": transactional_id, "enable.idempotence": True}
        self.timeout = timeout
        self._producer: Any = None

    def __repr__(self) -> str:
        return f"<KafkaSink transactional.id={self.config['transactional.id']!r}>"

    def _start(self) -> Any:
        from confluent_kafka import KafkaException, Producer

        if self._producer is None:
            producer = Producer(self.config)
            try:
                # Fences any older producer with this transactional.id and aborts its open
                # transaction (a relay that crashed mid-batch).
                producer.init_transactions(self.timeout)
            except KafkaException as exc:
                raise DeliveryError(
                    f"Kafka producer could not start its transactions "
                    f"({exc.args[0].str()}); check bootstrap.servers and that "
                    "the cluster supports transactions"
                ) from exc
            self._producer = producer
        return self._producer

    def send(self, messages: Sequence[OutboxMessage]) -> int:
        from confluent_kafka import KafkaException

        producer = self._start()
        try:
            producer.begin_transaction()
            for message in messages:
                headers = [(k, v.encode()) for k, v in message.headers.items()]
                headers.append((KAFKA_MSG_ID_HEADER, message.message_id.encode()))
                key = message.key.encode() if message.key is not None else None
                while True:
                    try:
                        producer.produce(
                            message.destination.name, value=message.body, key=key, headers=headers
                        )
                        break
                    except BufferError:  # local queue full: let librdkafka drain it
                        producer.poll(0.1)
            producer.commit_transaction(self.timeout)
        except KafkaException as exc:
            error = exc.args[0]
            self._abort(error)
            raise DeliveryError(
                f"Kafka did not commit the batch ({error.str()}); the "
                "messages stay in the outbox and are re-sent under the same "
                "ids"
            ) from exc
        return 0  # Kafka reports no duplicates: consumers drop them by eos-message-id

    def _abort(self, error: Any) -> None:
        from confluent_kafka import KafkaException

        if not error.txn_requires_abort():
            self.close()  # fatal or unknown state: start a new producer next time
            return
        try:
            self._producer.abort_transaction(self.timeout)
        except KafkaException:
            self.close()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(0)
            self._producer = None


__all__ = [
    "DEFAULT_SEND_TIMEOUT",
    "DeliveryError",
    "KafkaSink",
    "NatsCredentials",
    "NatsSink",
    "Sink",
    "split_servers",
    "split_url",
]
