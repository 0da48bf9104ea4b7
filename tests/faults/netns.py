"""A network that can vanish: a client in its own network namespace, reaching the host through
a router namespace that can start dropping everything.

    host (server) ── veth ── router ns ── veth ── client ns

:meth:`VanishingNetwork.vanish` puts blackhole routes on the router for both ends: from then
on every packet between client and server is discarded in the middle of the path, silently
(no ICMP, no FIN, no RST, no ACK), while both ends keep their links up and their kernels
keep trying — a partition, or a worker host that lost power, as the server sees it. A
userspace proxy cannot do this: the kernel under it keeps acknowledging; taking a link down
next to the server is not it either (the server's own sends then fail locally, which TCP
treats differently from silence).

Needs root and iproute2 (``ip netns``); :func:`available` says why not when it cannot.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
from collections.abc import Sequence


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check, timeout=30)


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
    the client namespace); :meth:`run` starts a process in the client namespace."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100, 1000)}"
        self.client_ns, self.router_ns = f"eos-client-{tag}", f"eos-router-{tag}"
        self.links = {name: f"eos{name}{tag}" for name in ("h", "ra", "rb", "c")}
        used = _ip("-4", "-o", "addr").stdout
        for _ in range(100):  # a /29 in 10.213.0.0/16 that no interface here uses
            net = ipaddress.ip_network(
                f"10.213.{random.randrange(256)}.{8 * random.randrange(32)}/29"
            )
            if not any(f" {address}/" in used for address in net):
                break
        self.network = net
        self.host_side = next(net.subnets(new_prefix=30))  # host .1 – router .2
        self.client_side = list(net.subnets(new_prefix=30))[1]  # router .5 – client .6
        self.host_address, self.router_host_address = map(str, list(self.host_side)[1:3])
        self.router_client_address, self.client_address = map(str, list(self.client_side)[1:3])
        self._made: list[str] = []

    def create(self) -> VanishingNetwork:
        h, ra, rb, c = (self.links[n] for n in ("h", "ra", "rb", "c"))
        for ns in (self.router_ns, self.client_ns):
            _ip("netns", "add", ns)
            self._made.append(ns)
        _ip("link", "add", h, "type", "veth", "peer", "name", ra)
        _ip("link", "set", ra, "netns", self.router_ns)
        _ip("link", "add", rb, "type", "veth", "peer", "name", c)
        _ip("link", "set", rb, "netns", self.router_ns)
        _ip("link", "set", c, "netns", self.client_ns)
        _ip("addr", "add", f"{self.host_address}/30", "dev", h)
        _ip("link", "set", h, "up")
        _ip("route", "add", str(self.client_side), "via", self.router_host_address)
        self._in(self.router_ns, "ip", "addr", "add", f"{self.router_host_address}/30", "dev", ra)
        self._in(self.router_ns, "ip", "addr", "add", f"{self.router_client_address}/30", "dev", rb)
        for link in (ra, rb, "lo"):
            self._in(self.router_ns, "ip", "link", "set", link, "up")
        self._in(self.router_ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        self._in(self.client_ns, "ip", "addr", "add", f"{self.client_address}/30", "dev", c)
        for link in (c, "lo"):
            self._in(self.client_ns, "ip", "link", "set", link, "up")
        self._in(self.client_ns, "ip", "route", "add", "default", "via", self.router_client_address)
        return self

    @staticmethod
    def _in(ns: str, *argv: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.Popen[str]:
        """Start ``argv`` inside the client namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.client_ns, *argv], text=True, **kwargs)

    def vanish(self) -> None:
        """From now on the router silently drops every packet between client and host."""
        for address in (self.client_address, self.host_address):
            self._in(self.router_ns, "ip", "route", "replace", "blackhole", f"{address}/32")

    def restore(self) -> None:
        """Forward again (for the next test)."""
        for address in (self.client_address, self.host_address):
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.router_ns,
                    "ip",
                    "route",
                    "del",
                    "blackhole",
                    f"{address}/32",
                ],
                capture_output=True,
                timeout=30,
            )

    def destroy(self) -> None:
        _ip("route", "del", str(self.client_side), check=False)
        while self._made:  # deleting a namespace deletes its veth ends and their peers
            _ip("netns", "del", self._made.pop(), check=False)
        _ip("link", "del", self.links["h"], check=False)

    def __enter__(self) -> VanishingNetwork:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
