"""NATS credentials reach the server as nats-py options and never a message or a log line:
token auth, passwords with ``/ # ? @ :``, Airflow connections, and the plain local server."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import psycopg
import pytest

from eos_airflow.relay import NatsSink, Relay
from eos_airflow.relay.sinks import DeliveryError, NatsCredentials, _redact, split_url
from tests.messaging.conftest import NATS_URL, nats_received

#: A password and a token made of the characters that end a URL's user info when unescaped.
PASSWORD = "p/a#s?s@w:rd"
TOKEN = "t0k/en#?@x"


def test_user_info_is_split_decoded_and_redacted():
    for url, server, credentials, shown in [
        (
            "nats://relay:s3cret@127.0.0.1:4222",
            "nats://127.0.0.1:4222",
            NatsCredentials(user="relay", password="s3cret"),
            "nats://relay:***@127.0.0.1:4222",
        ),
        (
            "nats://SECRETTOKEN@host:4222",
            "nats://host:4222",
            NatsCredentials(token="SECRETTOKEN"),
            "nats://***@host:4222",
        ),
        # unescaped / # ? @ in the password (as the old URL builder produced them)
        (
            f"nats://relay:{PASSWORD}@host:4222",
            "nats://host:4222",
            NatsCredentials(user="relay", password=PASSWORD),
            "nats://relay:***@host:4222",
        ),
        (
            "nats://relay:100%25%2F@host",
            "nats://host",
            NatsCredentials("relay", "100%/"),
            "nats://relay:***@host",
        ),
        (f"nats://{TOKEN}@host", "nats://host", NatsCredentials(token=TOKEN), "nats://***@host"),
        ("nats://host:4222", "nats://host:4222", NatsCredentials(), "nats://host:4222"),
    ]:
        assert split_url(url) == (server, credentials)
        assert _redact(url) == shown
    built = NatsCredentials(user="relay", password=PASSWORD).url("nats://host:4222")
    assert built == "nats://relay:p%2Fa%23s%3Fs%40w%3Ard@host:4222"
    assert split_url(built) == ("nats://host:4222", NatsCredentials("relay", PASSWORD))
    assert split_url(NatsCredentials(token=TOKEN).url("nats://h")) == (
        "nats://h",
        NatsCredentials(token=TOKEN),
    )
    assert PASSWORD not in repr(NatsCredentials("relay", PASSWORD))
    assert TOKEN not in repr(NatsCredentials(token=TOKEN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def auth_server(tmp_path) -> Iterator:
    """Start a private nats-server requiring ``--user/--pass`` or ``--auth``; yield its URL."""
    started: list[subprocess.Popen] = []

    def start(*auth: str) -> str:
        port = _free_port()
        server = subprocess.Popen(
            [
                "nats-server",
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "-js",
                "-sd",
                str(tmp_path / f"js{port}"),
                *auth,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(server)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return f"nats://127.0.0.1:{port}"
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no nats-server"
                time.sleep(0.05)

    try:
        subprocess.run(["nats-server", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("nats-server is not installed")
    yield start
    for server in started:
        server.terminate()
        server.wait(10)


def test_credentials_with_special_characters_reach_the_server_and_no_log(auth_server, caplog):
    caplog.set_level(logging.DEBUG)
    url = auth_server("--user", "relay", "--pass", PASSWORD)
    sink = NatsSink(NatsCredentials("relay", PASSWORD).url(url), timeout=5)  # encoded URL
    try:
        assert sink._nc.is_connected
        assert sink.servers == [url] and PASSWORD not in repr(sink)
    finally:
        sink.close()
    sink = NatsSink(f"nats://relay:{PASSWORD}@{url[len('nats://') :]}", timeout=5)  # raw
    sink.close()
    with pytest.raises(DeliveryError) as caught:
        NatsSink(NatsCredentials("relay", "wrong/" + PASSWORD).url(url), timeout=3)
    assert str(caught.value).startswith(f"cannot connect to NATS at nats://relay:***@{url[7:]}")
    assert caught.value.retryable

    token_url = auth_server("--auth", TOKEN)
    sink = NatsSink(NatsCredentials(token=TOKEN).url(token_url), timeout=5)
    try:
        assert sink._nc.is_connected
    finally:
        sink.close()
    with pytest.raises(DeliveryError) as caught:
        NatsSink(NatsCredentials(token=TOKEN + "x").url(token_url), timeout=3)
    assert str(caught.value).startswith(f"cannot connect to NATS at nats://***@{token_url[7:]}")

    for secret in (PASSWORD, "wrong/", TOKEN, "%2F"):
        assert secret not in caplog.text
        assert secret not in str(caught.value)


def test_unreachable_token_server_message_has_no_token(caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DeliveryError) as caught:
        NatsSink(f"nats://{TOKEN}@127.0.0.1:1", timeout=2)
    assert str(caught.value).startswith("cannot connect to NATS at nats://***@127.0.0.1:1: ")
    assert TOKEN not in str(caught.value) and TOKEN not in caplog.text


def test_an_airflow_connection_password_is_escaped(monkeypatch):
    pytest.importorskip("airflow")
    from eos_airflow.operators.outbox import nats_servers

    monkeypatch.setenv(
        "AIRFLOW_CONN_NATS_AUTH_T",
        (
            '{"conn_type": "generic", "host": "127.0.0.1", "port": 4999, "login": "relay", '
            f'"password": "{PASSWORD}"}}'
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_NATS_TOKEN_T",
        f'{{"conn_type": "generic", "host": "h", "password": "{TOKEN}"}}',
    )
    (url,) = nats_servers("nats_auth_t")
    parts = urlsplit(url)  # a well-formed URL: the password cannot end the user info
    assert (parts.hostname, parts.port, unquote(parts.password or "")) == (
        "127.0.0.1",
        4999,
        PASSWORD,
    )
    assert split_url(url) == ("nats://127.0.0.1:4999", NatsCredentials("relay", PASSWORD))
    (url,) = nats_servers("nats_token_t")
    assert split_url(url) == ("nats://h:4222", NatsCredentials(token=TOKEN))


def test_the_local_jetstream_without_auth_still_delivers(ledger, db, nats_stream):
    stream, prefix = nats_stream
    ledger.run("plain/1", lambda eos: eos.publish(f"nats:{prefix}.plain", {"n": 1}))
    sink = NatsSink(NATS_URL, timeout=5)
    try:
        with psycopg.connect(db, autocommit=True) as conn:
            assert Relay(conn, {"nats": sink}).drain().total == 1
    finally:
        sink.close()
    assert [payload for _, payload, _ in nats_received(stream, f"{prefix}.>")] == [{"n": 1}]
