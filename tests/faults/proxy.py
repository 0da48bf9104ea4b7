"""A TCP fault proxy between the code under test and PostgreSQL.

It forwards bytes both ways and, on command, breaks connections the way networks do:

- ``cut_all()``: reset every open connection now (a lost link, a restarted pooler);
- ``stall(seconds)``: stop forwarding for a while (a partition), then go on;
- ``arm(trigger, mode)``: act on the next client message whose bytes contain ``trigger``
  (e.g. ``b"COMMIT"``): ``"drop"`` resets the connection *before* the message reaches the
  server (the statement never runs), ``"lose_reply"`` forwards it and resets the connection
  before the server's reply reaches the client (the statement ran — for COMMIT: the
  transaction committed — and the client cannot know). Either way the client sees the same
  error: this is the ambiguity the protocol must resolve from the ledger.

PostgreSQL's wire protocol is message-framed (a type byte and a length), so the proxy reads the
client's stream message by message and matches triggers against whole messages.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Armed:
    trigger: bytes
    mode: str
    reply_wait: float = 10.0
    fired: threading.Event = field(default_factory=threading.Event)


class FaultProxy:
    """Listen on 127.0.0.1:<port> (a free one unless ``port`` is given); forward to
    ``upstream`` (host, port) or a Unix socket."""

    def __init__(self, upstream: tuple[str, int] | str, port: int = 0) -> None:
        self.upstream = upstream
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", port))
        self._server.listen(128)
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._armed: _Armed | None = None
        self._stalled_until = 0.0
        self._closed = False
        self.fired = {"drop": 0, "lose_reply": 0, "cut_all": 0}
        threading.Thread(target=self._accept, daemon=True).start()

    def dsn(self, dbname: str, user: str = "postgres") -> str:
        return (
            f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"
            "?connect_timeout=5&sslmode=disable&gssencmode=disable"
        )

    # --- faults --------------------------------------------------------------------------

    def arm(self, trigger: bytes, mode: str, *, reply_wait: float = 10.0) -> threading.Event:
        """Break the connection at the next client message containing ``trigger``.

        With ``"lose_reply"`` the returned event is set once the server has answered the
        message (the answer is swallowed), or after ``reply_wait`` seconds when it does not
        answer (a statement blocked on a lock): a test that sees the event knows the statement
        ran, however loaded the machine."""
        if mode not in ("drop", "lose_reply"):
            raise ValueError(f"mode must be 'drop' or 'lose_reply', got {mode!r}")
        armed = _Armed(trigger, mode, reply_wait)
        with self._lock:
            self._armed = armed
        return armed.fired

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def cut_all(self) -> int:
        with self._lock:
            pairs = list(self._pairs)
            self.fired["cut_all"] += 1
        for pair in pairs:
            self._reset(pair)
        return len(pairs)

    def stall(self, seconds: float) -> None:
        self._stalled_until = time.monotonic() + seconds

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.cut_all()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- forwarding ----------------------------------------------------------------------

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.upstream, str):
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.upstream)
        else:
            upstream = socket.create_connection(self.upstream)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return upstream

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    @staticmethod
    def _reset(pair: tuple[socket.socket, socket.socket]) -> None:
        for sock in pair:
            try:  # RST rather than FIN: the peer sees "connection reset", as on a lost link
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass

    def _pump(self, pair: tuple[socket.socket, socket.socket]) -> None:
        client, upstream = pair
        pending = b""  # client bytes not yet framed into whole messages
        startup = True  # the first client message has no type byte
        swallowing: _Armed | None = None  # lose_reply: drop the answer, then reset
        swallowed = b""
        deadline = 0.0
        try:
            while True:
                readable, _, _ = select.select(
                    [client, upstream], [], [], 0.05 if swallowing else 0.5
                )
                while time.monotonic() < self._stalled_until:
                    time.sleep(0.01)
                if client in readable:
                    data = client.recv(65536)
                    if not data:
                        break
                    pending += data
                    messages, pending, startup = _frame(pending, startup)
                    for message in messages:
                        armed = self._armed
                        if armed is not None and armed.trigger in message:
                            with self._lock:
                                if self._armed is armed:
                                    self._armed = None
                                else:
                                    armed = None
                        else:
                            armed = None
                        if armed is not None and armed.mode == "drop":
                            self.fired["drop"] += 1
                            armed.fired.set()
                            raise ConnectionResetError
                        upstream.sendall(message)
                        if armed is not None:  # lose_reply: the server got it; no answer
                            swallowing = armed
                            deadline = time.monotonic() + armed.reply_wait
                if upstream in readable:
                    data = upstream.recv(65536)
                    if not data:
                        break
                    if swallowing is None:
                        client.sendall(data)
                    else:
                        swallowed += data
                # The answer to the armed message ends with ReadyForQuery ('Z', length 5),
                # sent once the server has acted on it (after a Sync, for the extended
                # protocol: later client messages are still forwarded meanwhile).
                if swallowing is not None and (
                    b"Z\x00\x00\x00\x05" in swallowed or time.monotonic() >= deadline
                ):
                    self.fired["lose_reply"] += 1
                    swallowing.fired.set()
                    time.sleep(0.2)  # a test may act on the client's socket first
                    raise ConnectionResetError
        except OSError:
            pass
        finally:
            with self._lock:
                self._pairs.discard(pair)
            self._reset(pair)


def _frame(buffer: bytes, startup: bool) -> tuple[list[bytes], bytes, bool]:
    """Split whole frontend messages off ``buffer``: (messages, rest, still_in_startup)."""
    messages = []
    while True:
        if startup:  # StartupMessage / SSLRequest: int32 length (inclusive), no type byte
            if len(buffer) < 4:
                break
            (length,) = struct.unpack("!i", buffer[:4])
            if len(buffer) < length:
                break
            message, buffer = buffer[:length], buffer[length:]
            messages.append(message)
            # an SSLRequest / GSSENCRequest is followed by the real startup message
            code = struct.unpack("!i", message[4:8])[0] if length >= 8 else 0
            startup = code in (80877103, 80877104)
            continue
        if len(buffer) < 5:
            break
        (length,) = struct.unpack("!i", buffer[1:5])
        if len(buffer) < 1 + length:
            break
        message, buffer = buffer[: 1 + length], buffer[1 + length :]
        messages.append(message)
    return messages, buffer, startup
