"""Faces tier: a local S3 API (moto's standalone server) for the tests, the benchmarks and the
lakehouse demo on ``s3://``.

``EOS_S3_ENDPOINT`` names a running server (``.ci/run`` starts one); without it
:func:`start_s3` starts ``moto_server`` on a free loopback port for the caller's lifetime.
The same settings reach each client by its own names: pyiceberg's FileIO properties
(:meth:`S3.iceberg_properties`), delta-rs storage options (:meth:`S3.delta_options`) and
boto3 (:meth:`S3.client`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eos_airflow.errors import ConfigurationError

#: moto accepts any credentials; these are what every client is given.
ACCESS_KEY = "eos-test"
SECRET_KEY = "eos-test-secret"
REGION = "us-east-1"


@dataclass
class S3:
    """An S3 API endpoint (``http://127.0.0.1:PORT``) and, when this process started it, the
    server's process."""

    endpoint: str
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def iceberg_properties(self) -> dict[str, str]:
        """pyiceberg FileIO properties (``eos.iceberg(properties=...)``, a catalog's)."""
        return {
            "s3.endpoint": self.endpoint,
            "s3.access-key-id": ACCESS_KEY,
            "s3.secret-access-key": SECRET_KEY,
            "s3.region": REGION,
        }

    def delta_options(self) -> dict[str, str]:
        """delta-rs storage options (``eos.delta(storage_options=...)``); the server
        supports conditional puts, so concurrent writers need no lock."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
            "conditional_put": "etag",
        }

    def client(self) -> Any:
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def bucket(self, name: str) -> str:
        """Create the bucket ``name`` (if missing) and return ``s3://name``."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


def start_s3(log: Path | None = None, timeout: float = 30.0) -> S3:
    """The server of ``EOS_S3_ENDPOINT``, or a new ``moto_server`` on a free port."""
    configured = os.environ.get("EOS_S3_ENDPOINT")
    if configured:
        return S3(configured.rstrip("/"))
    exe = Path(sys.executable).parent / "moto_server"
    command = [str(exe)] if exe.exists() else [shutil.which("moto_server") or ""]
    if not command[0]:
        raise ConfigurationError(
            "no S3 API to test against: set EOS_S3_ENDPOINT, or pip install 'moto[server]' "
            "(the test extra brings it)"
        )
    port = _free_port()
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        [*command, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not _answers(endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise ConfigurationError(
                f"moto_server did not answer on {endpoint} within {timeout:g} s"
                + (f" (its log: {log})" if log else "")
            )
        time.sleep(0.1)
    return S3(endpoint, process)
