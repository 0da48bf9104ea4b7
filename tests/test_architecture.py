"""The house drawn from its imports (docs/architecture.md): tiers, no upward arrows, no cycles,
no private names across modules, one owner of the ledger's SQL, each module naming its tier.

The graph counts every import a module executes, also those inside functions; imports under
``if TYPE_CHECKING:`` are annotations only and are left out. Shipped migration revisions and
the example DAGs (package data) are not part of the graph.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "eos_airflow"

#: Tier of each module, by the longest matching prefix; lower tiers never import higher ones.
TIERS: dict[str, tuple[int, str]] = {
    "eos_airflow.errors": (0, "Errors"),
    "eos_airflow.failpoints": (0, "Errors"),
    "eos_airflow.states": (0, "Errors"),
    "eos_airflow.ledger": (1, "Ledger"),
    "eos_airflow.protocol": (2, "Protocol"),
    "eos_airflow.api": (3, "API"),
    "eos_airflow.multiledger": (3, "API"),
    "eos_airflow.relay": (3, "API"),
    "eos_airflow.operators": (4, "Adapters"),
    "eos_airflow.decorators": (4, "Adapters"),
    "eos_airflow.sensors": (4, "Adapters"),
    "eos_airflow.triggers": (4, "Adapters"),
    "eos_airflow.hooks": (4, "Adapters"),
    "eos_airflow.provider": (4, "Adapters"),
    "eos_airflow.config": (4, "Adapters"),
    "eos_airflow.cli": (5, "Faces"),
    "eos_airflow.web": (5, "Faces"),
    "eos_airflow.plugin": (5, "Faces"),
    "eos_airflow.devtools": (5, "Faces"),
    "eos_airflow": (6, "Package"),  # the public names, imported lazily
}
#: Only these modules run the ledger's named SQL (ledger/sql/*.sql): the gateway, and the
#: migration machinery, which runs whole scripts.
QUERY_OWNERS = {"eos_airflow.ledger.store", "eos_airflow.ledger.migrate"}
#: Libraries the Airflow-free tiers must not import.
AIRFLOW = re.compile(r"^airflow(\.|$)")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:4] == ("eos_airflow", "ledger", "migrations", "versions"):
            continue
        if rel.parts[:3] == ("eos_airflow", "devtools", "dags"):
            continue
        name = ".".join(rel.with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def tier(module: str) -> tuple[int, str]:
    best = max((p for p in TIERS if module == p or module.startswith(p + ".")), key=len)
    return TIERS[best]


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.found: list[tuple[str, list[str], int]] = []  # (module, names, line)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.module.split(".")
            keep = len(parts) - node.level + (1 if self.is_package else 0)
            base = ".".join(parts[:keep] + ([node.module] if node.module else []))
        self.found.append((base, [a.name for a in node.names], node.lineno))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    path = MODULES[module]
    visitor = _Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text("utf-8")))
    return visitor.found


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import mod`` names ``pkg.mod``)."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        deps = set()
        for target, names, _ in _imports(module):
            if not target.startswith("eos_airflow"):
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                deps.update(subs)
            if target in MODULES and len(subs) < len(names or [None]):
                deps.add(target)
        deps.discard(module)
        graph[module] = deps
    return graph


GRAPH = _graph()


def test_the_tier_table_covers_every_module():
    assert "eos_airflow.ledger.store" in MODULES and "eos_airflow.protocol.local" in MODULES
    for module in MODULES:
        tier(module)  # raises on a module outside every tier


def test_no_import_points_up_the_tiers():
    upward = [
        f"{module} ({tier(module)[1]}) imports {dep} ({tier(dep)[1]})"
        for module, deps in GRAPH.items()
        for dep in sorted(deps)
        if dep != "eos_airflow" and tier(dep)[0] > tier(module)[0]
    ]
    assert not upward, "imports up the tiers:\n" + "\n".join(upward)


def test_the_package_has_no_import_cycles():
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            if dep == "eos_airflow":
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_below_the_adapters_nothing_imports_airflow():
    found = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if tier(module)[0] <= 3
        for target, _, line in _imports(module)
        if AIRFLOW.match(target)
    ]
    assert not found, "Airflow imported below the adapters:\n" + "\n".join(found)


def test_no_private_name_is_imported_from_another_module():
    found = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, names, line in _imports(module)
        if target.startswith("eos_airflow")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not found, "private names across modules:\n" + "\n".join(found)


def test_only_the_gateway_runs_the_ledgers_named_queries():
    found = [
        f"{module} imports {name} from eos_airflow.ledger.queries"
        for module in MODULES
        if module not in QUERY_OWNERS and module != "eos_airflow.ledger.queries"
        for target, names, _ in _imports(module)
        if target == "eos_airflow.ledger.queries"
        for name in names
    ] + [
        f"{module} imports eos_airflow.ledger.queries"
        for module in MODULES
        if module not in QUERY_OWNERS
        for target, names, _ in _imports(module)
        if target == "eos_airflow.ledger" and "queries" in names
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_states_its_tier_in_its_first_line(module):
    doc = ast.get_docstring(ast.parse(MODULES[module].read_text("utf-8")), clean=False)
    assert doc, f"{module} has no module docstring"
    name = tier(module)[1]
    assert doc.startswith(f"{name} tier"), (
        f"{MODULES[module].relative_to(ROOT)}: the docstring's first line must start with "
        f"'{name} tier', got {doc.splitlines()[0]!r}"
    )


def test_the_readme_layout_table_matches_the_tree():
    """Every row of README's layout table names a module or package that exists, with its
    tier; every package and top-level module of eos_airflow has a row."""
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `eos_airflow/([^`]*)` \| (\w+) \|", section, re.MULTILINE)
    assert rows, "README has no layout table under '## Layout'"
    listed = {}
    for path, name in rows:
        dotted = "eos_airflow." + path.strip("/").removesuffix(".py").replace("/", ".")
        assert dotted in MODULES, f"README lists eos_airflow/{path}, which does not exist"
        assert tier(dotted)[1] == name, (
            f"README says {path} is {name}, the code says {tier(dotted)}"
        )
        listed[dotted] = name
    top = {m for m in MODULES if m.count(".") == 1}
    missing = sorted(top - set(listed))
    assert not missing, f"README's layout table lacks: {missing}"


def test_every_named_query_is_run_by_the_gateway():
    """No dead SQL: each ``-- name:`` block of ledger/sql is named in ledger/store.py (or, for
    the schema revision, ledger/migrate.py)."""
    from eos_airflow.ledger.queries import QUERY_FILES

    sql_dir = PACKAGE / "ledger" / "sql"
    names = {
        name
        for filename in QUERY_FILES
        for name in re.findall(r"^-- name: (\w+)", (sql_dir / filename).read_text("utf-8"), re.M)
    }
    code = "".join(MODULES[m].read_text("utf-8") for m in QUERY_OWNERS)
    unused = sorted(n for n in names if f'"{n}"' not in code)
    assert not unused, f"named queries nobody runs: {unused}"
