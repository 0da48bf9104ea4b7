"""The code blocks of README.md and docs/*.md are checked against the code, so they stay true.

- ``python`` blocks: the block parses; every ``from eos_airflow… import X`` imports and X
  exists; every call of a public eos_airflow name (imported in the block, exported by
  ``eos_airflow``, a dotted ``eos_airflow.…`` path, or ``@task.exactly_once``) passes only
  keyword arguments its signature has (an operator: any ``__init__`` of its classes,
  ``BaseOperator``'s included).
- ``bash`` blocks: every ``eos-airflow …`` command's ``--help`` exits 0, and every option the
  block gives exists in that command's parser.

Inline code spans of the prose get the same checks: a span that starts with ``eos-airflow``
(the command tables of docs/usage.md; ``[ ]`` and ``|`` of a synopsis are dropped) and a span
that is a call of a public eos_airflow name (``MultiTargetSQLOperator(targets=..., ...)``).

A block that cannot be checked this way is skipped visibly: an HTML comment
``<!-- not-run: reason -->`` on a line of its own right before the opening fence. The test
prints how many blocks it checked and skipped, and fails on a marker without a reason.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None  # the not-run reason

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            opening = FENCE.match(lines[i])
            if not opening:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NOT_RUN.match(before)
            found.append(
                Block(
                    path,
                    i + 1,
                    opening.group(1),
                    "\n".join(lines[i + 1 : end]),
                    None if marker is None else marker.group(1),
                )
            )
            i = end + 1
    return found


ALL = blocks()


def _parameters(target: Any) -> set[str] | None:
    """Keyword names ``target`` accepts; None when it takes any (``**kwargs`` all the way)."""
    if inspect.isclass(target):
        names: set[str] = set()
        for cls in target.__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or cls is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                    names.add(p.name)
        return names
    params = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _resolve(name: str, imported: dict[str, Any]) -> Any:
    import eos_airflow

    if name in imported:
        return imported[name]
    if name == "task.exactly_once":
        from eos_airflow.decorators.exactly_once import _ExactlyOnceDecoratedOperator

        return _ExactlyOnceDecoratedOperator
    if name in getattr(eos_airflow, "__all__", ()):
        return getattr(eos_airflow, name)
    if name.startswith("eos_airflow."):
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError):
            return getattr(importlib.import_module(module), attr, None)
    return None


def check_python(block: Block) -> list[str]:
    try:
        tree = ast.parse(block.text)
    except SyntaxError as exc:
        return [f"does not parse ({exc.msg}, line {exc.lineno}); fix it or mark it not-run"]
    problems: list[str] = []
    imported: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eos_airflow"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                if not hasattr(module, alias.name):
                    problems.append(f"`from {node.module} import {alias.name}`: no such name")
                else:
                    imported[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("eos_airflow"):
                    importlib.import_module(alias.name)
    return problems + check_calls(tree, imported)


def check_calls(tree: ast.AST, imported: dict[str, Any]) -> list[str]:
    from eos_airflow.decorators.exactly_once import exactly_once_task

    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        target = _resolve(name, imported)
        if target is exactly_once_task:  # the decorator passes its kwargs to the operator
            target = _resolve("task.exactly_once", {})
        if target is None or not callable(target):
            continue
        accepted = _parameters(target)
        if accepted is None:
            continue
        for kw in node.keywords:
            if kw.arg is not None and kw.arg not in accepted:
                problems.append(f"{name}(...{kw.arg}=...): {name} has no parameter {kw.arg!r}")
    return problems


def _commands(text: str) -> list[list[str]]:
    """The ``eos-airflow`` command lines of a bash block, as argument lists."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
            words = shlex.split(part, comments=True)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)  # VAR=value prefixes
            if words and words[0] == "eos-airflow":
                found.append(words[1:])
    return found


def _subcommand(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], Any]:
    """Walk the subcommand words of ``argv``: the path and the innermost parser."""
    path: list[str] = []
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or len(path) >= len(argv) or argv[len(path)] not in subs[0].choices:
            return path, parser
        word = argv[len(path)]
        parser = subs[0].choices[word]
        path.append(word)


def check_bash(block: Block, helped: dict[tuple[str, ...], int]) -> list[str]:
    return check_commands(_commands(block.text), helped)


def check_commands(commands: list[list[str]], helped: dict[tuple[str, ...], int]) -> list[str]:
    from eos_airflow.cli.main import build_parser, main

    problems = []
    for argv in commands:
        path, parser = _subcommand(build_parser(), argv)
        if not path:
            problems.append(f"`eos-airflow {' '.join(argv)}`: no such command")
            continue
        key = tuple(path)
        if key not in helped:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
                main([*path, "--help"])
            helped[key] = done.value.code or 0
        if helped[key] != 0:
            problems.append(f"`eos-airflow {' '.join(path)} --help` exited {helped[key]}")
        options = {s for a in parser._actions for s in a.option_strings}
        for word in argv[len(path) :]:
            if word.startswith("--"):
                option = word.split("=", 1)[0]
                if option not in options:
                    problems.append(f"`eos-airflow {' '.join(path)}` has no option {option}")
    return problems


SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def inline_spans() -> list[tuple[str, str]]:
    """(where, text) of every inline code span outside the fenced blocks."""
    spans = []
    for path in DOCS:
        prose, inside = [], False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                inside = not inside
                prose.append("")
            else:
                prose.append("" if inside else line)
        text = "\n".join(prose)
        for match in SPAN.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            spans.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return spans


def check_span(text: str, helped: dict[tuple[str, ...], int]) -> tuple[bool, list[str]]:
    """(checked?, problems) of one inline code span."""
    text = " ".join(text.split())
    if text.startswith("eos-airflow "):
        synopsis = re.sub(r"\\?\||[\[\]()]", " ", text.split(" | ")[0])
        words = shlex.split(synopsis.replace("…", ""))
        return True, check_commands([words[1:]], helped)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False, []
    if not isinstance(tree.body, ast.Call):
        return False, []
    name = _dotted(tree.body.func)
    if name is None or _resolve(name, {}) is None:
        return False, []
    return True, check_calls(tree, {})


def test_every_doc_code_block_is_checked_or_skipped_with_a_reason(capsys):
    helped: dict[tuple[str, ...], int] = {}
    checked, skipped, problems = 0, [], []
    for block in ALL:
        if block.skip is not None:
            if not block.skip:
                problems.append(f"{block}: not-run marker without a reason")
            skipped.append(block)
            continue
        if block.lang == "python":
            found = check_python(block)
        elif block.lang in ("bash", "sh", "shell"):
            found = check_bash(block, helped)
        else:
            continue  # text, sql, json, yaml: nothing to run
        checked += 1
        problems += [f"{block}: {p}" for p in found]
    spans = 0
    for where, text in inline_spans():
        done, found = check_span(text, helped)
        spans += done
        problems += [f"{where}: `{text}`: {p}" for p in found]
    with capsys.disabled():
        print(
            f"\ndocs code blocks: {checked} checked, {len(skipped)} skipped (not-run), "
            f"{len(ALL) - checked - len(skipped)} not code; {spans} inline commands and calls "
            f"checked; {len(helped)} subcommands' --help run"
        )
        for block in skipped:
            print(f"  skipped {block}: {block.skip}")
    assert not problems, "\n".join(problems)
    assert checked > 0


@pytest.mark.parametrize(
    ("lang", "text", "problem"),
    [
        ("python", "from eos_airflow import NoSuchThing", "no such name"),
        ("python", 'ExactlyOnceSQLOperator(task_id="t", conn_id="c", sqll="x")', "'sqll'"),
        ("python", '@task.exactly_once(conn_id="c", keyy="k")\ndef f(eos): ...', "'keyy'"),
        ("python", "def f(:", "does not parse"),
        ("bash", "eos-airflow ledger list --no-such-option", "no option --no-such-option"),
        ("bash", "EOS_X=1 eos-airflow nosuch thing", "no such command"),
    ],
)
def test_the_checks_find_drift(lang: str, text: str, problem: str):
    block = Block(ROOT / "README.md", 1, lang, text, None)
    found = check_python(block) if lang == "python" else check_bash(block, {})
    assert any(problem in p for p in found), found
    fine = 'ExactlyOnceSQLOperator(task_id="t", conn_id="c", sql="x", key="k")'
    assert check_python(Block(ROOT / "README.md", 1, "python", fine, None)) == []
    assert check_span("eos-airflow outbox relay [--nats-url URL] [--once]", {}) == (True, [])
    assert check_span("MultiTargetSQLOperator(targets=..., protocoll=1)", {})[1]
