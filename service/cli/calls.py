"""What every command that calls the API shares: its options, the spec file it sends, and the exit
code each failure of the call maps to (docs/cli.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from service.cli.follow import EXIT_AUTH, EXIT_INVALID, EXIT_OK, EXIT_TIMEOUT, EXIT_UNAVAILABLE, Outputs

__all__ = ["SPEC_FILE", "client_options", "echo_json", "load_spec", "outputs_from_options", "result_options", "run_client"]

SPEC_FILE = click.argument("spec_file", type=click.Path(allow_dash=True, dir_okay=False, path_type=Path))


def client_options(command: Any) -> Any:
    """--api, --token and --retries, from flags or CONVTUNE_API / CONVTUNE_TOKEN / CONVTUNE_RETRIES."""
    command = click.option(
        "--retries", envvar="CONVTUNE_RETRIES", type=click.IntRange(0, 20), default=5, show_default=True, show_envvar=True,
        help="retries of a 429/503 answer (honouring Retry-After) or a failed connection",
    )(command)
    command = click.option("--token", envvar="CONVTUNE_TOKEN", default=None, show_envvar=True, help="API token (sent as a bearer token)")(command)
    return click.option("--api", "api_url", envvar="CONVTUNE_API", default="http://127.0.0.1:8000", show_default=True, show_envvar=True, help="API address")(command)


def result_options(command: Any) -> Any:
    """What to do with the result: wait for it, gate on it, report it."""
    options = [
        click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), help="append a Markdown summary to FILE (e.g. $GITHUB_STEP_SUMMARY)"),
        click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="write a JUnit XML report to FILE (one test case per trial)"),
        click.option("--json", "as_json", is_flag=True, help="print the result as JSON on stdout"),
        click.option("--require", "requirements", multiple=True, metavar="EXPR", help="gate: 'val_accuracy>=0.97', 'best.val_loss<0.1'; repeatable; implies --wait"),
        click.option("--timeout", type=float, default=None, help="give up waiting after this many seconds (exit 6)"),
        click.option("--wait", is_flag=True, help="wait until it ends, showing progress on stderr"),
    ]
    for option in options:
        command = option(command)
    return command


def outputs_from_options(as_json: bool, junit: Path | None, summary: Path | None, requirements: tuple[str, ...]) -> Outputs:
    """The result options as :class:`Outputs`; click.BadParameter for a requirement that does not parse."""
    from service.cli.reports import parse_requirement

    try:
        parsed = [parse_requirement(r) for r in requirements]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--require") from exc
    return Outputs(as_json=as_json, junit=junit, summary=summary, requirements=parsed)


def load_spec(path: Path) -> dict[str, Any]:
    """A spec from a YAML or JSON file ('-' reads stdin); click.BadParameter when it cannot be read."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="SPEC_FILE") from exc
    if not isinstance(spec, dict):
        raise click.BadParameter(f"{path} must hold a mapping (a spec), not {type(spec).__name__}", param_hint="SPEC_FILE")
    return spec


def echo_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2))


def run_client(action: Callable[[], int]) -> None:
    """Run a command's calls to the API and exit with their code, or with the code of how they failed."""
    from service.client import ApiProblem, Unreachable

    try:
        code = action()
    except Unreachable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except ApiProblem as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(_exit_code_of(exc.status))
    except TimeoutError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_TIMEOUT)
    sys.exit(code or EXIT_OK)


def _exit_code_of(status: int) -> int:
    if status in (401, 403):
        return EXIT_AUTH
    if status == 429 or status >= 500:
        return EXIT_UNAVAILABLE
    return EXIT_INVALID
