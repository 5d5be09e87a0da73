"""The docs say only what the code does: every command, flag, make target, benchmark script and reason
named in README.md and infra/README.md exists.

Commands are checked against the CLI itself (`synergen CMD --help` must succeed and list the flag);
reasons against the string literals of the pipeline's code (the only place a reason can come from).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from synergen.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "infra" / "README.md"]

_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
_INLINE = re.compile(r"`([^`\n]+)`")
_INVOCATION = re.compile(r"\bsynergen\)?\s+([a-z][a-z0-9-]*)((?:\s+[^\s|;&`]+)*)")


def _snippets(text: str) -> list[str]:
    """Every line of every fenced block, and every inline code span, of a markdown text."""
    lines = [line for block in _FENCE.findall(text) for line in block.splitlines()]
    prose = _FENCE.sub("", text)
    return lines + _INLINE.findall(prose)


def _invocations() -> list[tuple[str, str, list[str]]]:
    """(doc, command, flags) for each `synergen COMMAND ... --flag ...` the docs show."""
    found = []
    for doc in DOCS:
        for snippet in _snippets(doc.read_text()):
            for m in _INVOCATION.finditer(snippet):
                flags = re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", m.group(2))
                found.append((doc.name if doc.parent == REPO else f"infra/{doc.name}", m.group(1), flags))
    return found


def _cli() -> click.Group:
    return typer.main.get_command(app)


def test_docs_show_cli_commands():
    assert {cmd for _, cmd, _ in _invocations()} >= {"ingest", "tokenize", "train", "generate", "demo", "mix", "inspect"}


@pytest.mark.parametrize("doc,command,flags", _invocations(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_command_and_flag_exists(doc, command, flags):
    group = _cli()
    assert command in group.commands, f"{doc} shows `synergen {command}`, which the CLI does not have"
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    known = {opt for p in group.commands[command].params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
    missing = [f for f in flags if f not in known]
    assert not missing, f"{doc} shows `synergen {command}` with {missing}, which it does not accept"


def test_documented_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    for doc in DOCS:
        for snippet in _snippets(doc.read_text()):
            for target in re.findall(r"^\s*make\s+([a-z][\w-]*)", snippet):
                assert target in targets, f"{doc.name} shows `make {target}`; the Makefile has {sorted(targets)}"


def test_documented_benchmarks_and_their_flags_exist():
    shown = 0
    for doc in DOCS:
        for snippet in _snippets(doc.read_text()):
            for m in re.finditer(r"(tests/(?:benchmarks|gpu)/\w+\.py)((?:\s+--?[\w-]+(?:\s+[^\s-][^\s]*)?)*)", snippet):
                script = REPO / m.group(1)
                assert script.exists(), f"{doc.name} names {m.group(1)}, which does not exist"
                source = script.read_text()
                for flag in re.findall(r"(--[\w-]+)", m.group(2)):
                    assert re.search(rf"""["']{re.escape(flag)}["']""", source), \
                        f"{doc.name} runs {m.group(1)} with {flag}, which the script does not define"
                shown += 1
    assert shown >= 5


def _pipeline_literals() -> set[str]:
    out: set[str] = set()
    for path in (REPO / "pipeline").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
    return out


def test_every_reason_the_docs_name_is_one_the_code_emits():
    literals = _pipeline_literals()
    named = set()
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"(?:by_reason|reason[s]?)`?\s*\(([^)]*)\)", text):
            named |= {t for t in _INLINE.findall(m.group(1)) if re.fullmatch(r"[a-z][a-z0-9_]*", t)}
    assert named, "the docs name no reasons any more; update this test"
    def emitted(reason: str) -> bool:  # `http_404` comes from f"http_{code}"
        family = re.fullmatch(r"([a-z_]+_)\d+", reason)
        return reason in literals or bool(family and family.group(1) in literals)

    unknown = sorted(r for r in named if not emitted(r))
    assert not unknown, f"the docs name reasons the code never emits: {unknown}"
