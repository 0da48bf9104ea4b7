"""A TCP proxy that adds a fixed delay to every chunk in each direction: a network with a
round-trip time of twice ``--delay-ms`` (plus the proxy's own ~0.1 ms) on loopback.

    python benchmarks/delay_proxy.py --to 127.0.0.1:5432 --delay-ms 0.25 [--port 0]

Prints the port it listens on (127.0.0.1), then serves until killed. Each direction of each
connection has a reader thread and a sender thread; the sender holds every chunk until its
due time (arrival + delay), in arrival order, so the byte stream is unchanged. Used by
benchmarks/bench_network.py; run it in its own process so that its threads do not share the
measured process's interpreter lock. (tests/faults/proxy.py, the fault proxy of the tests, runs
inside the test process and breaks connections; it has no notion of delay.)
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import threading
import time


def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
    chunks: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()

    def send() -> None:
        while True:
            with ready:
                while not chunks:
                    ready.wait()
                due, data = chunks.popleft()
            if not data:
                break
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        with ready:
            chunks.append((time.perf_counter() + delay, data))
            ready.notify()
        if not data:
            break
    sender.join()


def _serve(client: socket.socket, upstream: tuple[str, int], delay: float) -> None:
    try:
        server = socket.create_connection(upstream)
    except OSError:
        client.close()
        return
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threads = [
        threading.Thread(target=_pipe, args=(client, server, delay), daemon=True),
        threading.Thread(target=_pipe, args=(server, client, delay), daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--to", required=True, help="HOST:PORT of the server")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: any)")
    args = ap.parse_args()
    host, _, port = args.to.rpartition(":")
    upstream = (host, int(port))
    listener = socket.create_server(("127.0.0.1", args.port))
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(
            target=_serve, args=(client, upstream, args.delay_ms / 1000), daemon=True
        ).start()


if __name__ == "__main__":
    sys.exit(main())
