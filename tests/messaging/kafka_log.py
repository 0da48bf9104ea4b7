"""What a ``read_committed`` consumer may count as delivered, on librdkafka's mock cluster.

A real broker writes a commit or abort marker when a producer transaction ends, and a
``read_committed`` consumer never returns the records of an aborted (or still open)
transaction. librdkafka's mock cluster accepts transactions but keeps no outcome: its
EndTxn writes no marker, its Fetch reports no aborted transactions and a last stable offset
equal to the high watermark, so its ``read_committed`` consumers return aborted records too.
A test that counted those as delivered would pass a relay that never commits.

So the producer side keeps the outcome: :class:`JournaledKafkaSink` is the product's
:class:`~eos_airflow.relay.KafkaSink` whose producer is wrapped to append, each time
``commit_transaction`` returns, the (partition, offset) of every record of that transaction
to a journal file (one JSON line per transaction; a producer killed before that line is
written committed nothing that counts). :func:`committed_messages` reads the topic with
``isolation.level=read_committed`` (what a real broker needs) and keeps only the records the
journal shows committed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from eos_airflow.relay import KafkaSink


class _JournaledProducer:
    """A confluent_kafka Producer that journals the records of each committed transaction."""

    def __init__(self, producer: Any, journal: str) -> None:
        self._producer = producer
        self._journal = journal
        self._produced = 0
        self._delivered: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def begin_transaction(self, *args: Any) -> Any:
        self._produced, self._delivered = 0, []
        return self._producer.begin_transaction(*args)

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        callback = kwargs.pop("on_delivery", None) or kwargs.pop("callback", None)

        def delivered(err: Any, msg: Any) -> None:
            if err is None:
                self._delivered.append((msg.partition(), msg.offset()))
            if callback is not None:
                callback(err, msg)

        out = self._producer.produce(topic, *args, on_delivery=delivered, **kwargs)
        self._produced += 1
        return out

    def commit_transaction(self, *args: Any) -> Any:
        out = self._producer.commit_transaction(*args)  # raises unless it committed
        deadline = time.monotonic() + 10
        while len(self._delivered) < self._produced and time.monotonic() < deadline:
            self._producer.poll(0.05)  # serve the delivery reports of the flushed records
        assert len(self._delivered) == self._produced, (
            f"{self._produced} records produced, {len(self._delivered)} delivery reports"
        )
        line = json.dumps({"committed": self._delivered}) + "\n"
        fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return out


class JournaledKafkaSink(KafkaSink):
    """The product's Kafka sink, its producer's committed transactions journaled."""

    def __init__(self, *args: Any, journal: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journal = journal

    def _start(self) -> Any:
        producer = super()._start()
        if not isinstance(producer, _JournaledProducer):
            producer = self._producer = _JournaledProducer(producer, self.journal)
        return producer


def committed_offsets(journal: str) -> set[tuple[int, int]]:
    """(partition, offset) of every record of every transaction whose commit returned."""
    if not os.path.exists(journal):
        return set()
    with open(journal) as f:
        return {(p, o) for line in f if line.strip() for p, o in json.loads(line)["committed"]}


def committed_messages(bootstrap: str, topic: str, journal: str) -> tuple[list[Any], int]:
    """(the records of ``topic`` that a read_committed consumer of a real broker would
    deliver, how many records of aborted or unfinished transactions were left out)."""
    from tests.messaging.conftest import consume_all

    committed = committed_offsets(journal)
    read = consume_all(bootstrap, topic, "read_committed")
    kept = [m for m in read if (m.partition(), m.offset()) in committed]
    return kept, len(read) - len(kept)
