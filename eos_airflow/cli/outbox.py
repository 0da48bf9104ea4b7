"""Faces tier: ``eos-airflow outbox status | relay``: the transactional outbox from the command
line.

``relay`` runs :func:`eos_airflow.relay.loop.relay_forever` as a service (until SIGTERM or
Ctrl-C), or drains the outbox once with ``--once``; ``status`` shows the backlog.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from eos_airflow.cli import output
from eos_airflow.errors import ConfigurationError


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    outbox = sub.add_parser(
        "outbox", help="the transactional outbox: backlog and relay"
    ).add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    status = outbox.add_parser(
        "status", parents=[common], help="undelivered messages per destination"
    )
    status.set_defaults(func=cmd_outbox_status)
    relay = outbox.add_parser(
        "relay", parents=[common], help="deliver the outbox to NATS JetStream / Kafka"
    )
    relay.add_argument(
        "--nats-url", action="append", default=[], help="NATS server URL (repeat for a cluster)"
    )
    relay.add_argument(
        "--kafka-config", help="librdkafka producer config as JSON, or @FILE holding it"
    )
    relay.add_argument("--kafka-conn-id", help="Airflow Kafka connection instead")
    relay.add_argument(
        "--destination",
        action="append",
        default=[],
        help="exact destination or SCHEME:* (repeat; default: every scheme with a broker)",
    )
    relay.add_argument("--batch-size", type=int, default=500, help="messages per batch")
    relay.add_argument(
        "--relay-id",
        default=None,
        help="relay identity: delivered_by and Kafka transactional.id "
        "eos-outbox-<id> (default: eos-airflow-relay@HOST)",
    )
    relay.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="seconds between looks at an empty outbox (default: 1)",
    )
    relay.add_argument(
        "--once",
        action="store_true",
        help="drain what is pending and exit instead of running as a service",
    )
    relay.set_defaults(func=cmd_outbox_relay)


def cmd_outbox_status(args: argparse.Namespace) -> int:
    from eos_airflow.cli.session import checked
    from eos_airflow.protocol.outbox import backlog

    with checked(args) as conn:
        rows = output.records(backlog(conn, args.schema))
    if args.format == "json":
        output.emit(args, {"pending": rows}, lambda d: "")
    else:
        output.table(
            args, "undelivered outbox messages", ["destination", "pending", "oldest"], rows
        )
    return 0


def _sinks(args: argparse.Namespace, relay_id: str) -> dict[str, Any]:
    from eos_airflow.relay.sinks import KafkaSink, NatsSink

    sinks: dict[str, Any] = {}
    if args.kafka_config and args.kafka_conn_id:
        raise ConfigurationError("give --kafka-config or --kafka-conn-id, not both")
    config = None
    if args.kafka_config:
        text = args.kafka_config
        if text.startswith("@"):
            text = Path(text[1:]).read_text("utf-8")
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(
                f"--kafka-config is not JSON ({exc}); pass e.g. "
                '\'{"bootstrap.servers": "broker:9092"}\''
            ) from None
    elif args.kafka_conn_id:
        from eos_airflow.operators.kafka import kafka_config

        config = kafka_config(args.kafka_conn_id)
    if config is not None:
        sinks["kafka"] = KafkaSink(config, transactional_id=f"eos-outbox-{relay_id}")
    if args.nats_url:
        sinks["nats"] = NatsSink(args.nats_url)
    if not sinks:
        raise ConfigurationError(
            "no broker given: pass --nats-url and/or --kafka-config (or --kafka-conn-id)"
        )
    return sinks


def cmd_outbox_relay(args: argparse.Namespace) -> int:
    from eos_airflow.cli.session import checked, connect_factory
    from eos_airflow.relay.loop import Relay, relay_forever

    relay_id = args.relay_id or f"eos-airflow-relay@{socket.gethostname()}"
    sinks = _sinks(args, relay_id)
    try:
        if args.once:
            with checked(args) as conn:
                stats = Relay(
                    conn,
                    sinks,
                    schema=args.schema,
                    destinations=args.destination or None,
                    relay_id=relay_id,
                    batch_size=args.batch_size,
                ).drain()
        else:
            stop = threading.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: stop.set())
            stats = relay_forever(
                connect_factory(args),
                sinks,
                schema=args.schema,
                destinations=args.destination or None,
                relay_id=relay_id,
                batch_size=args.batch_size,
                poll_interval=args.poll_interval,
                stop=stop,
            )
    finally:
        for sink in sinks.values():
            sink.close()
    output.emit(
        args,
        {"relay_id": relay_id, **stats.as_dict()},
        lambda d: (
            f"relay {d['relay_id']}: delivered {d['delivered']} message(s) "
            f"in {d['batches']} batch(es); {d['duplicates']} duplicate(s) "
            f"dropped by the broker; by destination: "
            f"{json.dumps(d['by_destination'])}"
        ),
    )
    return 0
