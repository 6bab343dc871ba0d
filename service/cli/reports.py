"""What the CLI tells a CI system: requirement checks, a JUnit XML report and a Markdown summary.

A requirement is ``METRIC OP NUMBER`` (``val_accuracy>=0.97``, ``val_loss<0.2``). ``METRIC`` is
the latest logged value of a trial's metric (what its logged model scores), or ``best.METRIC``
for the best epoch's value (val_accuracy and val_loss). For a study, requirements apply to its
chosen trial (the best, or the one its rule picks from the Pareto front; :func:`front_table`
prints the front). Everything here is plain data in, text out: no HTTP, no terminal.
"""

from __future__ import annotations

import operator
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Check", "Requirement", "front_table", "junit_xml", "markdown_summary", "parse_requirement"]

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_PATTERN = re.compile(r"^\s*(?P<metric>[A-Za-z_][\w.\-]*)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Requirement:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class Check:
    """One requirement evaluated on one trial."""

    requirement: str
    value: float | None
    passed: bool
    message: str


def parse_requirement(text: str) -> Requirement:
    """``'val_accuracy>=0.97'`` -> Requirement; raises ValueError saying what is wrong."""
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"cannot read requirement {text!r}: write METRIC OP NUMBER, e.g. 'val_accuracy>=0.97' (OP: >= <= > < == !=)")
    return Requirement(match["metric"], match["op"], float(match["value"]))


def metric_value(trial: dict[str, Any], metric: str) -> float | None:
    """A trial's latest ``metric`` (or its size: params, flops_per_sample), or its best-epoch value for ``best.<metric>``; None when not known."""
    if metric.startswith("best."):
        best = (trial.get("best") or {}).get(metric.removeprefix("best."))
        return None if best is None else float(best["value"])
    sizes = {"params": trial.get("params_count"), "flops_per_sample": trial.get("flops_per_sample")}  # known before training
    value = sizes[metric] if metric in sizes else (trial.get("metrics") or {}).get(metric)
    return None if value is None else float(value)


def check(trial: dict[str, Any], requirements: list[Requirement]) -> list[Check]:
    checks = []
    for req in requirements:
        value = metric_value(trial, req.metric)
        if value is None:
            checks.append(Check(str(req), None, False, f"{req.metric} was not logged by trial {trial.get('id')}"))
            continue
        passed = bool(_OPS[req.op](value, req.threshold))
        verdict = "met" if passed else "NOT met"
        checks.append(Check(str(req), value, passed, f"{req.metric} = {value:.6g}: {req} {verdict}"))
    return checks


def checks_as_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]


def _case_time(trial: dict[str, Any]) -> str:
    seconds = (trial.get("timings") or {}).get("run_seconds")
    return f"{seconds or 0:.3f}"


def junit_xml(suite_name: str, trials: list[dict[str, Any]], checks_by_trial: dict[str, list[Check]]) -> str:
    """One test case per trial: an error when it did not succeed, a failure per unmet requirement."""
    suite = ET.Element("testsuite", name=suite_name)
    failures = errors = skipped = 0
    total = 0.0
    for trial in trials:
        case = ET.SubElement(suite, "testcase", classname=suite_name, name=trial.get("name") or trial["id"], time=_case_time(trial))
        total += float(_case_time(trial))
        ET.SubElement(case, "properties")
        for key in ("id", "status", "outcome", "mlflow_url"):
            if trial.get(key) is not None:
                ET.SubElement(case.find("properties"), "property", name=key, value=str(trial[key]))
        status = trial.get("status")
        if status == "pruned":
            skipped += 1
            ET.SubElement(case, "skipped", message=f"pruned: {trial.get('reason') or ''}")
            continue
        if status != "succeeded":
            errors += 1
            error = ET.SubElement(case, "error", type=trial.get("outcome") or str(status), message=f"trial {status}: {trial.get('reason') or ''}")
            error.text = trial.get("reason") or ""
            continue
        unmet = [c for c in checks_by_trial.get(trial["id"], []) if not c.passed]
        if unmet:
            failures += 1
            failure = ET.SubElement(case, "failure", type="requirement", message="; ".join(c.message for c in unmet))
            failure.text = "\n".join(c.message for c in unmet)
        metrics = trial.get("metrics") or {}
        if metrics:
            ET.SubElement(case, "system-out").text = "\n".join(f"{k} = {v:.6g}" for k, v in sorted(metrics.items()))
    suite.set("tests", str(len(trials)))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", str(skipped))
    suite.set("time", f"{total:.3f}")
    root = ET.Element("testsuites", name="convtune", tests=str(len(trials)), failures=str(failures), errors=str(errors), time=f"{total:.3f}")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def front_table(study: dict[str, Any]) -> str:
    """A study's Pareto front as a text table (empty for a single objective), the chosen trial marked with ``*``."""
    front = study.get("front") or []
    if not front:
        return ""
    metrics = [o["metric"] for o in study.get("objectives") or []]
    chosen = study.get("best") or {}
    headers = ["", "trial", *[f"{m} ({_arrow(o)})" for m, o in zip(metrics, study["objectives"], strict=True)], "params", "MLflow"]
    rows = [
        ["*" if t["number"] == chosen.get("number") else "", f"#{t['number']}", *[_number(t["values"].get(m)) for m in metrics],
         " ".join(f"{k.rsplit('.', 1)[-1]}={_compact(v)}" for k, v in t["params"].items()), t.get("mlflow_url") or "-"]
        for t in front
    ]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [f"Pareto front: {len(front)} trials; * chosen by {chosen.get('rule') or 'its rule'}"]
    lines += ["  " + "  ".join(str(c).rjust(w) if 1 < i < len(headers) - 2 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


def _arrow(objective: dict[str, str]) -> str:
    return "max" if objective.get("direction") == "maximize" else "min"


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def _compact(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else f"{value:.3g}" if isinstance(value, float) else str(value)


def _cell(value: Any) -> str:
    text = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_summary(title: str, verdict: str, trials: list[dict[str, Any]], checks_by_trial: dict[str, list[Check]]) -> str:
    """A Markdown table of the trials and the requirement checks, for a CI job's summary page."""
    lines = [f"## {title}", "", f"**{verdict}**", "", "| trial | status | val_accuracy | best val_accuracy | val_loss | epochs | requirements | MLflow |", "|---|---|---:|---:|---:|---:|---|---|"]
    for t in trials:
        metrics = t.get("metrics") or {}
        best = ((t.get("best") or {}).get("val_accuracy") or {}).get("value")
        checks = checks_by_trial.get(t["id"], [])
        reqs = "<br>".join(("✅ " if c.passed else "❌ ") + c.message for c in checks) or "-"
        status = t.get("status") if t.get("status") == "succeeded" else f"{t.get('status')}: {t.get('reason') or ''}"
        link = f"[run]({t['mlflow_url']})" if t.get("mlflow_url") else "-"
        epochs = f"{t.get('epochs_done', '-')}/{t.get('epochs') or '-'}"
        lines.append(
            f"| {_cell(t.get('name') or t['id'])} | {_cell(status)} | {_cell(metrics.get('val_accuracy'))} | {_cell(best)} | "
            f"{_cell(metrics.get('val_loss'))} | {epochs} | {reqs} | {link} |"
        )
    return "\n".join(lines) + "\n"
