"""The built wheel works outside the source checkout.

Builds the wheel (``pip wheel --no-deps``), installs it into a new virtualenv and runs
``eos-airflow`` from there, from a temporary directory, so nothing of the source tree is
importable. Installing Airflow and the other dependencies from PyPI into every new venv
would take minutes and need the network; instead the venv reads the dependencies from this
interpreter's site-packages through a ``.pth`` line. A ``.pth`` line only adds a path: the
``.pth`` files inside it (among them an editable install of this checkout) are not run, so
``eos_airflow`` itself can come only from the wheel, which the tests check
(``eos_airflow.__file__`` inside the venv). ``airflow`` gets a launcher in the venv's
``bin`` so that the Airflow processes the demo starts import the wheel's package too.

The demo (14 ``airflow dags test`` runs) took 93 s here on a 2-core machine, 3-5 minutes under
load, hence the slow tier (``EOS_SLOW=1 ./dev test -m slow tests/deploy/test_wheel.py``); the
rest of the file, the wheel build and the venv included, takes about 10 seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
    )
    (built,) = out.glob("eos_airflow-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
    python = home / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q"]
        + ["--no-index", "--force-reinstall", str(wheel)],
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        check=True,
        timeout=600,
    )
    # after the install: pip would otherwise see this checkout's editable install
    Path(site, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    launcher = home / "bin" / "airflow"
    launcher.write_text(
        f"#!{python}\nimport sys\nfrom airflow.__main__ import main\nsys.exit(main())\n"
    )
    launcher.chmod(0o755)
    return home


def _env(venv: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EOS_", "AIRFLOW_", "AIRFLOW__", "PYTHON"))
    }
    here = str(Path(sys.executable).parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != here]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["COLUMNS"] = "240"
    return env


def _run(venv, tmp_path, *argv, timeout=300, env=None):
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        env=env or _env(venv),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wheel_ships_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "eos_airflow/py.typed" in names
    dags = {n for n in names if n.startswith("eos_airflow/devtools/dags/")}
    assert "eos_airflow/devtools/dags/eos_sales_daily.py" in dags
    assert len(dags) == len(list((ROOT / "eos_airflow" / "devtools" / "dags").glob("*.py")))
    assert any(n.startswith("eos_airflow/ledger/migrations/versions/0001") for n in names)
    assert any(n.startswith("eos_airflow/ledger/sql/") for n in names)


def test_installed_package_comes_from_the_wheel_and_imports_every_public_name(venv, tmp_path):
    code = (
        "import eos_airflow, importlib\n"
        "print(eos_airflow.__file__)\n"
        "for name in eos_airflow.__all__: getattr(eos_airflow, name)\n"
        "for name in eos_airflow._LAZY: getattr(eos_airflow, name)\n"
        "from eos_airflow.provider import get_provider_info\n"
        "info = get_provider_info()\n"
        "for kind in ('operators', 'sensors', 'triggers', 'hooks'):\n"
        "    for entry in info[kind]:\n"
        "        for module in entry['python-modules']:\n"
        "            importlib.import_module(module); print(module)\n"
    )
    done = _run(venv, tmp_path, "python", "-c", code)
    assert done.returncode == 0, done.stderr
    first, *modules = done.stdout.split()
    assert Path(first).resolve().is_relative_to(venv.resolve()), first
    assert not Path(first).resolve().is_relative_to(ROOT.resolve())
    # every module of eos_airflow/operators that defines an operator class is registered
    operators = sorted(
        f"eos_airflow.operators.{p.stem}"
        for p in (ROOT / "eos_airflow" / "operators").glob("*.py")
        if p.stem != "base" and _defines_operator(p)
    )
    assert sorted(m for m in modules if ".operators." in m) == operators


def test_cli_help_and_airflow_providers_list_the_registered_modules(venv, tmp_path):
    done = _run(venv, tmp_path, "eos-airflow", "--help")
    assert done.returncode == 0, done.stderr
    for command in ("db", "demo", "stack", "doctor"):
        assert re.search(rf"\b{command}\b", done.stdout), done.stdout

    env = _env(venv)
    env["AIRFLOW_HOME"] = str(tmp_path / "airflow")
    done = _run(venv, tmp_path, "airflow", "providers", "list", "-o", "json", env=env)
    assert done.returncode == 0, done.stderr
    assert '"eos-airflow"' in done.stdout, done.stdout
    done = _run(venv, tmp_path, "airflow", "providers", "triggers", "-o", "json", env=env)
    assert done.returncode == 0, done.stderr
    assert "eos_airflow.triggers.ledger" in done.stdout, done.stdout
    done = _run(
        venv,
        tmp_path,
        "airflow",
        "providers",
        "get",
        "eos-airflow",
        "--full",
        "-o",
        "json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    for module in (
        "eos_airflow.operators.sql",
        "eos_airflow.operators.transfer",
        "eos_airflow.operators.incremental",
        "eos_airflow.operators.multi",
        "eos_airflow.operators.kafka",
        "eos_airflow.operators.outbox",
        "eos_airflow.sensors.ledger",
        "eos_airflow.triggers.ledger",
        "eos_airflow.hooks.ledger",
    ):
        assert module in done.stdout, (module, done.stdout)


def test_db_migrate_from_the_installed_wheel(venv, tmp_path, empty_db):
    done = _run(venv, tmp_path, "eos-airflow", "db", "migrate", "--dsn", empty_db)
    assert done.returncode == 0, done.stdout + done.stderr
    with psycopg.connect(empty_db) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchone()
    assert count > 0


@pytest.mark.slow
def test_demo_from_the_installed_wheel(venv, tmp_path):
    env = _env(venv)
    env["EOS_DEMO_NATS_URL"] = ""
    done = _run(
        venv,
        tmp_path,
        "eos-airflow",
        "demo",
        "--workdir",
        str(tmp_path / "demo"),
        timeout=1500,
        env=env,
    )
    out = done.stdout
    assert done.returncode == 0, out[-6000:] + done.stderr[-3000:]
    assert "✗" not in out, out[-6000:]
    assert "Without the ledger the same failures wrote 6 duplicate rows." in out
    summary = out[out.index("what happened, and what the ledger prevented") :]
    assert len(re.findall(r"│ ok\s*│", summary)) == 4, summary  # analytics, IoT, finance, lakehouse


def _defines_operator(path: Path) -> bool:
    """Does the module define a class named ``...Operator`` (not the shared base)?"""
    import ast

    tree = ast.parse(path.read_text())
    return any(
        isinstance(node, ast.ClassDef) and node.name.endswith("Operator") for node in tree.body
    )
