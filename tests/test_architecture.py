"""The import contracts of pyproject.toml ([tool.importlinter]) hold: `lint-imports` passes.

They draw the boundaries of DESIGN.md in imports: the API never reaches torch or the workers, the
contract (models.spec) is pydantic only, the training loop knows no Celery or MLflow, and no two
sibling modules import each other. tests/service/test_import_boundary.py checks the first at run time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), f"import-linter is not installed next to {sys.executable} (pip install -e '.[test]')"
    result = subprocess.run(
        [str(lint_imports), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, f"lint-imports failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
