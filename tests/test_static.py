"""Static checks of the repository: ruff's lint and format rules and mypy (pyproject.toml),
run with the tools installed next to this interpreter (the ``test`` extra)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import BIN, ROOT


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check_passes(command: list[str]) -> None:
    tool = BIN / command[0]
    assert tool.exists(), f"{tool} is missing: install the test extra (pip install -e '.[test]')"
    done = subprocess.run(
        [str(tool), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output}"
