"""A network that can vanish: a client in its own network namespace, joined to the host by a
veth pair, whose link the test takes down.

Once the link is down the client's kernel sends nothing more and nothing reaches it: no FIN,
no RST, no ACK — to the server the client is silent, exactly like a worker whose host lost
power or whose network was partitioned. (A userspace proxy cannot do this: the kernel under
it keeps acknowledging.) Needs root and iproute2 (``ip netns``); :func:`available` says why
not when it cannot.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import subprocess
from collections.abc import Sequence


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check,
                          timeout=30)


def available() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"eosprobe{os.getpid() % 100000}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class VanishingNetwork:
    """``host_address`` (on the host, where the server listens) and ``client_address`` (in
    the namespace) on one /30; :meth:`run` starts a process in the namespace and
    :meth:`vanish` takes the namespace's link down."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100, 1000)}"
        self.name = f"eos-vanish-{tag}"
        self.host_link, self.client_link = f"eosh{tag}", f"eosc{tag}"
        used = _ip("-4", "-o", "addr").stdout
        for _ in range(100):  # a /30 in 10.213.0.0/16 that no interface here uses
            net = ipaddress.ip_network(f"10.213.{random.randrange(256)}."
                                       f"{4 * random.randrange(64)}/30")
            if f" {net[1]}/" not in used and f" {net[2]}/" not in used:
                break
        self.network = net
        self.host_address, self.client_address = str(net[1]), str(net[2])
        self._made = False

    def create(self) -> VanishingNetwork:
        _ip("netns", "add", self.name)
        self._made = True
        _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.client_link)
        _ip("link", "set", self.client_link, "netns", self.name)
        _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
        _ip("link", "set", self.host_link, "up")
        self._in_ns("ip", "addr", "add", f"{self.client_address}/30", "dev", self.client_link)
        self._in_ns("ip", "link", "set", self.client_link, "up")
        self._in_ns("ip", "link", "set", "lo", "up")
        return self

    def _in_ns(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                       text=True, check=True, timeout=30)

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.Popen[str]:
        """Start ``argv`` inside the namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], text=True,
                                **kwargs)

    def vanish(self) -> None:
        """Take the client's link down: from now on the client is silent."""
        self._in_ns("ip", "link", "set", self.client_link, "down")

    def restore(self) -> None:
        """Bring the client's link back (for the next test)."""
        self._in_ns("ip", "link", "set", self.client_link, "up")

    def destroy(self) -> None:
        if self._made:
            _ip("netns", "del", self.name, check=False)  # takes the veth pair with it
            with contextlib.suppress(Exception):
                _ip("link", "del", self.host_link, check=False)
            self._made = False

    def __enter__(self) -> VanishingNetwork:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
