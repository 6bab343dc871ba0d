"""Docstrings and comments of models/, service/ and workers/ say what the code does and why, not which issue asked for it.

An issue number ("issue 10", "#14") means nothing to a reader of the code; what the issue
measured belongs in docs/performance.md. Another project's issue (``celery#5935``) names where a
behaviour of that library is discussed, and stays.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "service", "workers")
# An issue number, or a document the repository does not hold (the team's design notes).
ISSUE = re.compile(r"(?i)\bissues?\s*#?\d+|(?<![\w.-])#\d+\b|\bDESIGN(?:\.md| decision)|\bSEED-NOTES|\bSTACK-NOTES")


def prose(source: str) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of every comment and every module, class and function docstring in ``source``."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                first = node.body[0].lineno
                yield from ((first + i, line) for i, line in enumerate(doc.splitlines()))


def issue_numbers(source: str) -> list[str]:
    return [f"{line}: {text.strip()}" for line, text in prose(source) if ISSUE.search(text)]


@pytest.mark.parametrize("source", [
    '"""Faster accepts (issue 10)."""\n',
    'def f():\n    """As Issue 4 asked."""\n',
    "class C:\n    '''Fixes #14.'''\n",
    "x = 1  # see issues 9 and 10\n",
    "# (#7) a comment of its own\n",
    '"""Accepting follows DESIGN decision 3."""\n',
    "# strided conv vs pooling (SEED-NOTES)\n",
])
def test_an_issue_number_in_a_docstring_or_comment_is_found(source: str) -> None:
    assert issue_numbers(source)


@pytest.mark.parametrize("source", [
    '"""Redis redelivers a message unacknowledged that long (celery#5935)."""\n',
    'label = f"trial #{n}"  # the number a person sees\n',
    'def f():\n    """Logs trial #n\'s curve; colour #1f77b4."""\n',
    'x = "issue 10"  # a string of code, not prose\n',
])
def test_what_is_not_an_issue_number_of_ours_passes(source: str) -> None:
    assert issue_numbers(source) == []


def test_no_docstring_or_comment_names_an_issue() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{where}"
        for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
        for where in issue_numbers(path.read_text())
    ]
    assert found == [], "say what the code does and why; move what the issue measured to docs/performance.md:\n" + "\n".join(found)
