"""The outcome table against everything that maps an outcome: the code that writes them, the study's
Optuna states, the client's status, the API schema and docs/api.md (the one doc that lists them;
any other doc links to it, and one that copies part of the table fails here).

The code is read with ``ast``: every string given where an outcome goes (an argument of a parameter
called ``outcome``, an ``Ending``, an ``outcome = ...`` assignment, a comparison with an outcome, a
status/outcome pair) must be in the table with the same MLflow status, and every outcome in the
table must be written somewhere. Adding an outcome to the code alone, or removing one from the table
alone, fails here.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import optuna
import pytest
from optuna.trial import TrialState
from pydantic import TypeAdapter, ValidationError

from models.spec.outcomes import OUTCOMES, Outcome, OutcomeName, UnknownOutcome, describe_outcomes, outcome
from models.store.runs import client_status
from service.api.schemas import Status, TrialPublic
from service.api.studies.schemas import StudyTrial
from service.client import FINAL_STATUSES
from workers.study.recovery import PRUNED_OUTCOMES, trial_state
from workers.study.step import TrialFailed, _without_value
from workers.training import outcomes as endings
from workers.training.parallel import NotEnoughDevices

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("models", "service", "workers")
STATUSES = {"FINISHED", "FAILED", "KILLED"}


# --- reading the code -----------------------------------------------------------------------------


def _strings(node: ast.AST | None) -> list[str]:
    """The strings an expression can be: a literal, either branch of a conditional, a tuple/list/set of literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for element in node.elts for s in _strings(element)]
    return []


def _names_outcome(node: ast.AST) -> bool:
    """Whether an expression reads an outcome: ``outcome``, ``ending.outcome``, ``attrs.get(USER_ATTR.OUTCOME)``."""
    text = ast.unparse(node)
    return text.endswith("outcome") or "OUTCOME)" in text


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _trees(root: Path, packages: tuple[str, ...]) -> Iterator[tuple[str, ast.Module]]:
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            yield str(path.relative_to(root)), ast.parse(path.read_text(), filename=str(path))


def _outcome_positions(trees: list[tuple[str, ast.Module]]) -> dict[str, set[int]]:
    """Function name -> the positional index of its ``outcome`` parameter (``self``/``cls`` left out), for every def that has one."""
    positions: dict[str, set[int]] = {"Ending": {1}}  # a dataclass: (mlflow_status, outcome, reason)
    for _, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = [a.arg for a in node.args.posonlyargs + node.args.args]
                if params and params[0] in ("self", "cls"):
                    params = params[1:]
                if "outcome" in params:
                    positions.setdefault(node.name, set()).add(params.index("outcome"))
    return positions


def written_outcomes(root: Path = ROOT, packages: tuple[str, ...] = SOURCES) -> list[tuple[str, str | None, str]]:
    """Every (where, MLflow status or None, outcome) the code of ``packages`` (models/, service/, workers/) names."""
    trees = list(_trees(root, packages))
    positions = _outcome_positions(trees)
    found: list[tuple[str, str | None, str]] = []
    for where, tree in trees:
        for node in ast.walk(tree):
            at = f"{where}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                args = node.args
                for i in positions.get(_called_name(node), ()):
                    if i < len(args):
                        status = _strings(args[i - 1]) if i > 0 else []
                        found += [(at, status[0] if len(status) == 1 and status[0] in STATUSES else None, s) for s in _strings(args[i])]
                found += [(at, None, s) for k in node.keywords if k.arg == "outcome" for s in _strings(k.value)]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):  # mlflow_status, outcome = "FAILED", "error"
                        named = dict(zip((ast.unparse(t).split(".")[-1] for t in target.elts), node.value.elts, strict=False))
                        if "outcome" in named:
                            status = _strings(named.get("mlflow_status"))
                            found += [(at, status[0] if status else None, s) for s in _strings(named["outcome"])]
                    elif _names_outcome(target):
                        found += [(at, None, s) for s in _strings(node.value)]
            elif isinstance(node, ast.Compare) and _names_outcome(node.left):
                found += [(at, None, s) for c in node.comparators for s in _strings(c)]
            elif isinstance(node, ast.Dict) and node.keys and all(isinstance(k, ast.Constant) and k.value in STATUSES for k in node.keys):
                found += [(at, k.value, s) for k, v in zip(node.keys, node.values, strict=True) for s in _strings(v)]  # type: ignore[union-attr]
    return found


WRITTEN = written_outcomes()


def test_every_outcome_the_code_names_is_in_the_table():
    unknown = sorted({f"{name!r} at {at}" for at, _, name in WRITTEN if name not in OUTCOMES})
    assert not unknown, f"outcomes the code names that models/spec/outcomes.py lacks: {unknown}"


def test_the_code_writes_each_outcome_with_the_tables_mlflow_status():
    wrong = sorted({f"{name!r} as {status} at {at} (the table: {OUTCOMES[name].mlflow_status})" for at, status, name in WRITTEN
                    if status is not None and name in OUTCOMES and OUTCOMES[name].mlflow_status != status})
    assert not wrong, f"status/outcome pairs that disagree with models/spec/outcomes.py: {wrong}"


def test_every_outcome_in_the_table_is_written_by_the_code():
    named = {name for _, _, name in WRITTEN}
    assert set(OUTCOMES) <= named, f"outcomes in the table that no code writes: {sorted(set(OUTCOMES) - named)}"


def test_the_reader_finds_an_outcome_added_in_code_only(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        "class Melted(TrialStopped):\n    outcome = 'melted'\n\n"
        "class Runs:\n    def end(self, run_id, status, outcome, reason): ...\n\n"
        "runs.end(run_id, 'FAILED', 'frozen' if cold else 'error', 'why')\n"
        "Ending('KILLED', 'thawed', 'why')\n"
        "if ending.outcome == 'boiled': pass\n"
        "mlflow_status, outcome = 'FINISHED', 'steamed'\n"
        "budget.stop('not_an_outcome')\n"
    )
    found = {(status, name) for _, status, name in written_outcomes(tmp_path, ("pkg",))}
    assert found == {(None, "melted"), ("FAILED", "frozen"), ("FAILED", "error"), ("KILLED", "thawed"), (None, "boiled"), ("FINISHED", "steamed")}


# --- the table itself -----------------------------------------------------------------------------


def test_the_table_is_keyed_by_name_and_its_values_are_known():
    for name, o in OUTCOMES.items():
        assert o.name == name
        assert o.mlflow_status in STATUSES
        assert o.study_state in ("COMPLETE", "PRUNED", "FAIL", None)
        assert o.meaning and ";" not in o.meaning, f"{name}: the API description separates meanings with ';'"


def test_an_unknown_name_fails_with_the_list_of_outcomes():
    assert outcome("timeout") is OUTCOMES["timeout"]
    with pytest.raises(UnknownOutcome, match="unknown outcome 'melted'.*succeeded") as raised:
        outcome("melted")
    assert isinstance(raised.value, KeyError)


def test_the_literal_is_the_tables_names():
    assert get_args(OutcomeName) == tuple(OUTCOMES)
    adapter = TypeAdapter(OutcomeName)
    assert adapter.validate_python("over_budget") == "over_budget"
    with pytest.raises(ValidationError):
        adapter.validate_python("melted")


# --- the sites that map an outcome ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(OUTCOMES))
def test_a_study_tells_optuna_the_tables_state(name: str):
    o = OUTCOMES[name]
    assert trial_state(name) == (TrialState[o.study_state] if o.study_state else TrialState.FAIL)
    assert (name in PRUNED_OUTCOMES) == o.counts_as_pruned
    # Without a value (no epochs to read one from), a trial is PRUNED or FAIL, never COMPLETE.
    expected = optuna.TrialPruned if o.counts_as_pruned else TrialFailed
    assert type(_without_value(name, "why")) is expected


def test_an_outcome_the_table_lacks_fails_the_study_trial():
    assert trial_state("melted") == TrialState.FAIL


@pytest.mark.parametrize("name", list(OUTCOMES))
def test_the_client_sees_the_tables_status(name: str):
    o = OUTCOMES[name]
    assert client_status(o.mlflow_status, name) == o.client_status
    assert o.client_status in get_args(Status)


def test_the_clients_final_statuses_are_the_tables():
    assert set(FINAL_STATUSES) == {o.client_status for o in OUTCOMES.values()}


def test_client_status_before_and_without_an_outcome():
    assert client_status("SCHEDULED", None) == "queued"
    assert client_status("RUNNING", None) == "running"
    assert client_status("FINISHED", None) == "succeeded"
    assert client_status("FAILED", None) == "failed"


@pytest.mark.parametrize("stop", [endings.TrialStopped, endings.Cancelled, endings.TimedOut, endings.Diverged, endings.Pruned, NotEnoughDevices])
def test_a_stop_ends_with_its_outcomes_mlflow_status(stop: type[endings.TrialStopped]):
    ending = endings.classify(stop("why"))
    assert ending.mlflow_status == OUTCOMES[ending.outcome].mlflow_status


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("boom"), ValueError()])
def test_a_classified_exception_ends_with_its_outcomes_mlflow_status(exc: BaseException):
    ending = endings.classify(exc)
    assert ending.mlflow_status == OUTCOMES[ending.outcome].mlflow_status


def test_an_ending_of_an_unknown_outcome_is_refused():
    with pytest.raises(UnknownOutcome):
        endings.Ending.of("melted", "why")


# --- what people read -----------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [TrialPublic, StudyTrial])
def test_the_api_describes_every_outcome(schema):
    description = schema.model_json_schema()["properties"]["outcome"]["description"]
    for name, o in OUTCOMES.items():
        assert re.search(rf"\b{name}( \(in a study\))?: {re.escape(o.meaning)}", description), f"{schema.__name__}.outcome does not describe {name}"
    assert describe_outcomes() in description


def doc_row(o: Outcome) -> str:
    """The row of docs/api.md's outcome table for ``o``, as it must read."""
    yes = {True: "yes", False: "no"}
    return f"| `{o.name}` | {o.mlflow_status} | `{o.client_status}` | {o.study_state or 'its twin' + chr(39) + 's'} | {yes[o.retried]} | {yes[o.study_only]} | {o.meaning} |"


def _api_doc_outcome_rows() -> list[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("\n## Outcomes\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def test_docs_api_lists_every_outcome_as_the_table_says():
    rows = _api_doc_outcome_rows()
    expected = [doc_row(o) for o in OUTCOMES.values()]
    missing = [row for row in expected if row not in rows]
    extra = [row for row in rows if row not in expected]
    assert not missing and not extra, f"docs/api.md's ## Outcomes table disagrees with models/spec/outcomes.py; rows it should have: {missing}; rows it should not: {extra}"


# An outcome's MLflow status or Optuna state, as a doc would copy it.
_RECORDED_AS = {"FINISHED", "FAILED", "KILLED", "COMPLETE", "PRUNED", "FAIL"}


def outcome_table_copies(text: str) -> list[str]:
    """The paragraphs, list items and table rows of a markdown ``text`` that copy part of the outcome table.

    A table row keyed by an outcome that names a status or state, or a passage that pairs three or
    more outcomes with two or more statuses or states (``succeeded`` COMPLETE; ``pruned`` PRUNED...).
    """
    copies = []
    for passage in re.split(r"\n\s*\n|\n(?=\s*[-*] )|\n(?=\|)", text):
        outcomes = set(re.findall(r"`([a-z_]+)`", passage)) & set(OUTCOMES)
        recorded = set(re.findall(r"\b[A-Z]+\b", passage)) & _RECORDED_AS
        if (passage.startswith("| `") and outcomes and recorded) or (len(outcomes) >= 3 and len(recorded) >= 2):
            copies.append(passage.strip())
    return copies


def test_the_copy_finder_finds_a_table_row_and_a_state_list():
    assert outcome_table_copies("intro\n\n| `timeout` | FAILED | past its limit |\n| `cancelled` | KILLED | flag |\n") == [
        "| `timeout` | FAILED | past its limit |", "| `cancelled` | KILLED | flag |",
    ]
    state_list = "- Outcome -> Optuna state: `succeeded` COMPLETE; `pruned`,\n  `diverged` PRUNED; `error` FAIL."
    assert outcome_table_copies(f"text\n{state_list}\n- next item") == [state_list]
    assert outcome_table_copies("- `over_budget` (MLflow FAILED, like `infeasible`) and a reason") == []


_OTHER_DOCS = [p for p in [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))] if p.name != "api.md"]


@pytest.mark.parametrize("path", _OTHER_DOCS, ids=lambda p: p.name)
def test_no_doc_but_docs_api_carries_a_copy_of_the_outcome_table(path: Path):
    copies = outcome_table_copies(path.read_text(encoding="utf-8"))
    assert not copies, f"{path.name} copies the outcome table (link to docs/api.md#outcomes instead): {copies}"
