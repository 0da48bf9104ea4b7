"""Where the lakehouse tests keep their tables: every test that asks for ``lake`` runs twice,
on local files (``file://``) and on the S3 API (moto's standalone server, one bucket per
test; in the heavy tier)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from eos_airflow.devtools.s3 import S3


@dataclass(frozen=True)
class Lake:
    """One test's storage: ``root`` is a fresh location (``file:///...`` or
    ``s3://bucket``); ``iceberg`` and ``delta`` are the settings each library needs for it
    (empty for local files)."""

    kind: str
    root: str
    iceberg: dict[str, str] = field(default_factory=dict)
    delta: dict[str, str] = field(default_factory=dict)
    s3: S3 | None = None

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def files(self, *parts: str) -> list[str]:
        """Every file under ``uri(*parts)``, as paths relative to it."""
        if self.s3 is None:
            base = Path(self.uri(*parts).removeprefix("file://"))
            return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
        bucket, _, prefix = self.uri(*parts).removeprefix("s3://").partition("/")
        prefix = f"{prefix}/" if prefix else ""
        pages = (
            self.s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(
            obj["Key"][len(prefix) :] for page in pages for obj in page.get("Contents", [])
        )


#: The S3 variants run in the heavy tier (EOS_SLOW=1, `-m slow`; CI runs both tiers): moto
#: answers each request in milliseconds, which doubles the time of the lakehouse tests.
@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.slow)])
def lake(request: pytest.FixtureRequest, tmp_path: Path) -> Lake:
    if request.param == "file":
        root = tmp_path / "lake"
        root.mkdir()
        return Lake("file", root.as_uri())
    s3: S3 = request.getfixturevalue("s3_server")
    bucket = s3.bucket(f"eos-{uuid.uuid4().hex[:12]}")
    return Lake("s3", bucket, s3.iceberg_properties(), s3.delta_options(), s3)
