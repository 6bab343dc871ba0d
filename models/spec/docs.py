"""The docs' tables of choices, kept in step with :mod:`models.spec.choices`.

``python -m models.spec.docs`` rewrites every marked section (``<!-- choices:samplers -->`` ...
``<!-- /choices:samplers -->``) of README.md and docs/*.md with the current table of its concept;
``--check`` only says which files are stale (exit 1). ``tests/test_registries.py`` fails while one is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from models.spec.choices import rendered_docs

__all__ = ["doc_files", "stale_docs", "write_docs"]

ROOT = Path(__file__).resolve().parents[2]


def doc_files(root: Path = ROOT) -> list[Path]:
    """The markdown files that may hold marked sections: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def stale_docs(root: Path = ROOT) -> list[Path]:
    """The doc files whose marked sections differ from the current tables."""
    return [p for p in doc_files(root) if rendered_docs(p.read_text(encoding="utf-8")) != p.read_text(encoding="utf-8")]


def write_docs(root: Path = ROOT) -> list[Path]:
    """Rewrite the stale marked sections of the docs under ``root``; the files that changed."""
    stale = stale_docs(root)
    for path in stale:
        path.write_text(rendered_docs(path.read_text(encoding="utf-8")), encoding="utf-8")
    return stale


def main(argv: list[str]) -> int:
    """Rewrite the stale tables (no arguments) or only list them (``--check``, exit 1 if any); the exit status."""
    if argv not in ([], ["--check"]):
        print("usage: python -m models.spec.docs [--check]", file=sys.stderr)
        return 2
    changed = stale_docs() if argv else write_docs()
    for path in changed:
        print(f"{'stale' if argv else 'rewrote'} {path.relative_to(ROOT)}")
    return 1 if argv and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
