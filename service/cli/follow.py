"""Following a trial or study from the CLI: live progress, then a verdict, reports and an exit code.

Progress goes to stderr (a rich progress bar on a terminal, one plain line per change otherwise),
updated at each event of the run's stream (each epoch of a trial as it ends, each trial of a study
as it starts and ends; :meth:`service.client.ConvtuneClient.wait_trial`), or at each poll of an API
without streams; stdout carries only the result: a short human summary, or the ``--json`` document. The exit
code says what happened (see :data:`EXIT_CODES`); CI branches on it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from service.cli.reports import Check, Requirement, check, checks_as_dicts, junit_xml, markdown_summary

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["EXIT_CODES", "Outputs", "Progress", "conclude"]

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE, EXIT_REQUIREMENT, EXIT_AUTH, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5, 6
EXIT_CODES = {
    EXIT_OK: "success (and every --require met)",
    EXIT_FAILED: "the trial or study failed, diverged, timed out or was cancelled",
    EXIT_INVALID: "invalid spec or request (422/400/404/409), or bad command-line usage",
    EXIT_UNAVAILABLE: "the service is unreachable or unavailable (503, or 429 after retries)",
    EXIT_REQUIREMENT: "it ran, but a --require was not met",
    EXIT_AUTH: "authentication or authorisation failed (401/403)",
    EXIT_TIMEOUT: "--timeout passed before it ended",
}


UNITS = {"trial": "epochs", "study": "trials", "lr-find": "steps"}


@dataclass
class Outputs:
    """What the user asked the command to produce besides its exit code."""

    as_json: bool = False
    junit: Path | None = None
    summary: Path | None = None
    requirements: list[Requirement] = field(default_factory=list)


class Progress:
    """Live progress of one trial or study: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, title: str, kind: str, tty: bool | None = None):
        self.title = title
        self.kind = kind
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._last = ""
        self._rich: Any = None
        self._task: Any = None

    def __enter__(self) -> Self:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            unit = UNITS[self.kind]
            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit + "  {task.fields[state]}"), TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.title, total=None, state="submitted")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def update(self, current: dict[str, Any]) -> None:
        done, total, state = describe(self.kind, current)
        if self._rich is not None:
            self._rich.update(self._task, completed=done, total=total, state=state)
            return
        line = f"{self.kind} {current.get('id')}: {state} ({done}/{total if total is not None else '?'} {UNITS[self.kind]})"
        if line != self._last:
            click.echo(line, err=True)
            self._last = line


def describe(kind: str, current: dict[str, Any]) -> tuple[int, int | None, str]:
    """(done, total, state text) of a trial (epochs), a study (trials) or an lr-find (steps), for display."""
    if kind == "lr-find":
        lr = current.get("suggested_lr")
        return int(current.get("steps_done") or 0), current.get("steps"), current.get("status", "?") + (f"  suggested lr {lr:.3g}" if lr else "")
    if kind == "trial":
        acc = (current.get("metrics") or {}).get("val_accuracy")
        best = ((current.get("best") or {}).get("val_accuracy") or {}).get("value")
        state = current.get("status", "?")
        if acc is not None:
            state += f"  val_accuracy {acc:.4f}"
        if best is not None:
            state += f"  best {best:.4f}"
        return int(current.get("epochs_done") or 0), current.get("epochs"), state
    progress = current.get("progress") or {}
    best = (current.get("best") or {}).get("value")
    metric = (current.get("objective") or {}).get("metric", "value")
    state = current.get("state", "?") + f"  {progress.get('running', 0)} running" + (f"  best {metric} {best:.4f}" if best is not None else "")
    return int(progress.get("finished") or 0), progress.get("n_trials"), state


def _state(subject: dict[str, Any]) -> str:
    return str(subject.get("status") or subject.get("state"))


def conclude(
    kind: str, subject: dict[str, Any], trials: list[dict[str, Any]], gated: dict[str, Any] | None, outputs: Outputs,
    ok: bool, say: Callable[[str], None] = click.echo,
) -> int:
    """Check requirements on ``gated`` (the trial, or the study's best trial), write the reports, print; the exit code."""
    checks: list[Check] = check(gated, outputs.requirements) if gated is not None and outputs.requirements else []
    if outputs.requirements and gated is None:
        checks = [Check(str(r), None, False, f"no trial to check {r} on") for r in outputs.requirements]
    checks_by_trial = {gated["id"]: checks} if gated is not None else {}
    if not ok:
        code, verdict = EXIT_FAILED, f"{kind} {subject['id']} {_state(subject)}: {subject.get('reason') or ''}".strip()
    elif any(not c.passed for c in checks):
        code, verdict = EXIT_REQUIREMENT, "requirement not met: " + "; ".join(c.message for c in checks if not c.passed)
    else:
        code, verdict = EXIT_OK, f"{kind} {subject['id']} {_state(subject)}" + (f"; {len(checks)} requirement(s) met" if checks else "")
        if kind == "study" and gated is not None:
            verdict += f"; best trial {gated['id']} ({gated.get('name') or ''})"
    title = f"convtune {kind} {subject.get('name') or subject['id']}"
    if outputs.junit is not None:
        outputs.junit.parent.mkdir(parents=True, exist_ok=True)
        outputs.junit.write_text(junit_xml(title, trials, checks_by_trial))
    if outputs.summary is not None:
        outputs.summary.parent.mkdir(parents=True, exist_ok=True)
        with outputs.summary.open("a") as out:  # append: GitHub's $GITHUB_STEP_SUMMARY collects several steps
            out.write(markdown_summary(title, verdict, trials, checks_by_trial))
    if outputs.as_json:
        document = {
            "kind": kind, "id": subject["id"], "status": _state(subject), "passed": code == EXIT_OK, "exit_code": code,
            "verdict": verdict, "requirements": checks_as_dicts(checks), kind: subject,
        }
        if kind == "study":
            document["best_trial"] = gated
        say(json.dumps(document, indent=2))
    else:
        say(verdict)
        for c in checks:
            say(("  ok   " if c.passed else "  FAIL ") + c.message)
        if subject.get("mlflow_url"):
            say(f"  MLflow: {subject['mlflow_url']}")
    return code
