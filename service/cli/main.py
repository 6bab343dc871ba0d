"""The ``convtune`` command: run the stack's processes, and drive the API from a shell or CI.

Exit codes (docs/cli.md): 0 success; 1 the trial/study failed or was cancelled; 2 invalid spec,
request or usage; 3 the service is unreachable or unavailable; 4 a --require was not met;
5 authentication or authorisation failed; 6 --timeout passed while waiting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

__all__ = ["main"]

from service.cli.follow import (
    EXIT_AUTH,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    Outputs,
    Progress,
    conclude,
)


@click.group(epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
@click.version_option(package_name="convtune")
def main() -> None:
    """Hyperparameter tuning for convolutional networks."""


@main.command()
@click.option("--bind", default="127.0.0.1:8000", show_default=True)
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes")
def api(bind: str, workers: int) -> None:
    """Serve the API under gunicorn (reads CONVTUNE_* settings)."""
    from service.stack.supervisor import api_command

    argv = api_command(bind, workers)
    os.execvp(argv[0], argv)


@main.command()
@click.option("--cpu-workers", default=1, show_default=True, help="worker processes on a host without GPUs")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(cpu_workers: int, loglevel: str) -> None:
    """Start one Celery worker process per visible GPU (concurrency 1), or CPU workers on a CPU host."""
    from service.stack.supervisor import gpu_count, worker_commands

    children = [subprocess.Popen(argv, env={**os.environ, **env}) for _, argv, env in worker_commands(gpu_count(), cpu_workers, loglevel)]

    def stop(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [child.wait() for child in children]
    sys.exit(max(codes, default=0))


@main.command()
@click.option("--home", type=click.Path(path_type=Path), default=Path(".convtune"), show_default=True, help="logs, sqlite store, artifacts")
@click.option("--api-port", default=8000, show_default=True)
@click.option("--mlflow-port", default=5000, show_default=True)
@click.option("--cpu-workers", default=1, show_default=True)
@click.option("--demo", is_flag=True, help="submit the demo trials once the stack is up")
@click.option("--detach-after-demo", is_flag=True, help="with --demo: stop the stack after the demo instead of serving on")
def up(home: Path, api_port: int, mlflow_port: int, cpu_workers: int, demo: bool, detach_after_demo: bool) -> None:
    """Start the local stack (Redis if needed, MLflow, workers, API); Ctrl-C stops all of it."""

    from service.cli.client import ApiProblem, Unreachable
    from service.stack.supervisor import Stack, StackConfig

    console = _console()
    config = StackConfig(home=home, redis_url=os.environ.get("CONVTUNE_REDIS_URL", "redis://127.0.0.1:6379/0"), api_port=api_port, mlflow_port=mlflow_port, cpu_workers=cpu_workers)
    stack = Stack(config, say=lambda m: console.print(f"[green]>[/] {m}"))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.up()
        runs_page = _demo(console, config.api_url) if demo else None
        ui = runs_page or f"{config.mlflow_url}/#/experiments (the 'convtune' experiment, Runs tab)"
        console.print(f"\n[bold]MLflow UI:[/] {ui}\n[bold]API:[/]       {config.api_url}  (GET /trials)")
        if demo and detach_after_demo:
            return
        console.print("The stack is up. Press Ctrl-C to stop it.")
        while (dead := stack.dead()) is None:
            time.sleep(1)
        console.print(f"[red]{dead.name} exited ({dead.popen.returncode}); stopping the stack. Its last lines:[/]\n{dead.tail()}")
        sys.exit(EXIT_FAILED)
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/]")
        sys.exit(EXIT_UNAVAILABLE)
    except (ApiProblem, Unreachable) as exc:
        console.print(f"[red]the demo failed: {exc}[/]")
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        console.print("\nstopping the stack...")
    finally:
        stack.down()
        console.print("stack stopped")


def _console() -> Any:
    """A terminal's own width; 120 columns when piped (a log), where rich would assume 80."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack like Ctrl-C does


def _demo(console: Any, api_url: str, token: str | None = None) -> str | None:
    """Run the demo trials; the MLflow UI page listing their runs."""
    from service.cli.client import ConvtuneClient
    from service.stack.demo import run_demo

    with ConvtuneClient(api_url, token) as client:
        results = run_demo(client, console)
    return results[0]["mlflow_url"].rsplit("/", 1)[0] if results else None


@main.command()
@click.option("--api", "api_url", envvar="CONVTUNE_API", default="http://127.0.0.1:8000", show_default=True)
@click.option("--token", envvar="CONVTUNE_TOKEN", default=None, help="API token (or CONVTUNE_TOKEN)")
def demo(api_url: str, token: str | None) -> None:
    """Submit the demo trials to a running stack and show their results."""

    def go() -> int:
        console = _console()
        console.print(f"MLflow UI: {_demo(console, api_url, token)}")
        return EXIT_OK

    _run_client(go)


# ---- driving the API from a shell or CI -------------------------------------------------------

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


def _outputs(as_json: bool, junit: Path | None, summary: Path | None, requirements: tuple[str, ...]) -> Outputs:
    from service.cli.reports import parse_requirement

    try:
        parsed = [parse_requirement(r) for r in requirements]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--require") from exc
    return Outputs(as_json=as_json, junit=junit, summary=summary, requirements=parsed)


def _load_spec(path: Path) -> dict[str, Any]:
    """A spec from a YAML or JSON file ('-' reads stdin); click.BadParameter when it cannot be read."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="SPEC_FILE") from exc
    if not isinstance(spec, dict):
        raise click.BadParameter(f"{path} must hold a mapping (a spec), not {type(spec).__name__}", param_hint="SPEC_FILE")
    return spec


def _echo_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2))


SPEC_FILE = click.argument("spec_file", type=click.Path(allow_dash=True, dir_okay=False, path_type=Path))


@main.command()
@SPEC_FILE
@client_options
@result_options
def submit(spec_file: Path, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, requirements: tuple[str, ...], as_json: bool, junit: Path | None, summary: Path | None) -> None:
    """Submit a trial spec (YAML or JSON); with --wait, follow it to the end and gate on it."""
    from service.cli.client import ConvtuneClient

    spec, outputs = _load_spec(spec_file), _outputs(as_json, junit, summary, requirements)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            accepted = client.submit_trial(spec)
            if not (wait or outputs.requirements or junit or summary):
                _echo_json(accepted) if as_json else click.echo(f"trial {accepted['id']} queued: {accepted['url']}\n  MLflow: {accepted['mlflow_url']}")
                return EXIT_OK
            click.echo(f"trial {accepted['id']} queued ({accepted['name']}): {accepted['mlflow_url']}", err=True)
            return _follow_trial(client, accepted["id"], timeout, outputs)

    _run_client(go)


def _follow_trial(client: Any, trial_id: str, timeout: float | None, outputs: Outputs) -> int:
    with Progress(f"trial {trial_id[:8]}", "trial") as progress:
        trial = client.wait_trial(trial_id, timeout_s=timeout, on_update=progress.update)
    return conclude("trial", trial, [trial], trial, outputs, ok=trial["status"] == "succeeded")


@main.group()
def study() -> None:
    """Studies: a search over trial specs (Optuna)."""


@study.command("create")
@SPEC_FILE
@client_options
@result_options
def study_create(spec_file: Path, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, requirements: tuple[str, ...], as_json: bool, junit: Path | None, summary: Path | None) -> None:
    """Create a study from a spec (YAML or JSON); with --wait, follow it and gate on its best trial."""
    from service.cli.client import ConvtuneClient

    spec, outputs = _load_spec(spec_file), _outputs(as_json, junit, summary, requirements)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            created = client.create_study(spec)
            if not (wait or outputs.requirements or junit or summary):
                _echo_json(created) if as_json else click.echo(f"study {created['id']} created: {created.get('url') or ''}".rstrip(": "))
                return EXIT_OK
            click.echo(f"study {created['id']} created", err=True)
            return _follow_study(client, created["id"], timeout, outputs)

    _run_client(go)


def _follow_study(client: Any, study_id: str, timeout: float | None, outputs: Outputs, wait: bool = True) -> int:
    if wait:
        with Progress(f"study {study_id[:8]}", "study") as progress:
            current = client.wait_study(study_id, timeout_s=timeout, on_update=progress.update)
    else:
        current = client.get_study(study_id)
    # one JUnit test case per trial that has a run (a trial still waiting for a worker has none)
    trials = [client.get_trial(t["trial_id"]) for t in client.study_trials(study_id) if t.get("trial_id")]
    best_id = (current.get("best") or {}).get("trial_id")
    best = next((t for t in trials if t["id"] == best_id), None) or (client.get_trial(best_id) if best_id else None)
    ok = current["state"] not in ("failed", "cancelled") and best is not None
    if best is None and current["state"] not in ("failed", "cancelled"):
        current = {**current, "reason": current.get("reason") or "no trial of the study completed"}
    return conclude("study", current, trials, best, outputs, ok=ok)


def _resolve(client: Any, some_id: str) -> tuple[str, dict[str, Any]]:
    """('trial' | 'study' | 'lr-find', its document) for an id of any of them."""
    from service.cli.client import ApiProblem

    for kind, fetch in (("trial", client.get_trial), ("study", client.get_study), ("lr-find", client.get_lr_find)):
        try:
            return kind, fetch(some_id)
        except ApiProblem as exc:
            if exc.status not in (404, 405):
                raise
    raise ApiProblemNotFound(some_id)


class ApiProblemNotFound(click.ClickException):
    exit_code = EXIT_INVALID

    def __init__(self, some_id: str):
        super().__init__(f"no trial, study or lr-find run with id {some_id!r}")


@main.command()
@click.argument("some_id", metavar="ID")
@client_options
@click.option("--json", "as_json", is_flag=True, help="print the whole document as JSON")
def status(some_id: str, api_url: str, token: str | None, retries: int, as_json: bool) -> None:
    """Show a trial, study or lr-find run by its id."""
    from service.cli.client import ConvtuneClient
    from service.cli.follow import describe

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            kind, doc = _resolve(client, some_id)
        if as_json:
            _echo_json({"kind": kind, **doc})
            return EXIT_OK
        done, total, state = describe(kind, doc)
        click.echo(f"{kind} {doc['id']}: {state} ({done}/{total if total is not None else '?'})")
        if doc.get("reason"):
            click.echo(f"  reason: {doc['reason']}")
        if doc.get("mlflow_url"):
            click.echo(f"  MLflow: {doc['mlflow_url']}")
        return EXIT_OK

    _run_client(go)


@main.command("wait")
@click.argument("some_id", metavar="ID")
@client_options
@result_options
def wait_command(some_id: str, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, requirements: tuple[str, ...], as_json: bool, junit: Path | None, summary: Path | None) -> None:
    """Wait until a trial or study ends; gate and report like submit --wait."""
    from service.cli.client import ConvtuneClient

    outputs = _outputs(as_json, junit, summary, requirements)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            kind, _ = _resolve(client, some_id)
            if kind == "study":
                return _follow_study(client, some_id, timeout, outputs)
            if kind == "lr-find":
                return _follow_lr_find(client, some_id, timeout, as_json)
            return _follow_trial(client, some_id, timeout, outputs)

    _run_client(go)


@main.command()
@click.argument("some_id", metavar="ID")
@client_options
@click.option("--json", "as_json", is_flag=True)
def cancel(some_id: str, api_url: str, token: str | None, retries: int, as_json: bool) -> None:
    """Cancel a queued or running trial or study."""
    from service.cli.client import ConvtuneClient

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            kind, _ = _resolve(client, some_id)
            cancel_of = {"trial": client.cancel_trial, "study": client.cancel_study, "lr-find": client.cancel_lr_find}
            doc = cancel_of[kind](some_id)
        _echo_json(doc) if as_json else click.echo(f"{kind} {some_id}: cancel requested ({doc.get('status') or doc.get('state')})")
        return EXIT_OK

    _run_client(go)


@main.command()
@click.argument("study_id")
@client_options
@result_options
def best(study_id: str, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, requirements: tuple[str, ...], as_json: bool, junit: Path | None, summary: Path | None) -> None:
    """Show a study's best trial so far (with --wait: at its end) and gate on it."""
    from service.cli.client import ConvtuneClient

    outputs = _outputs(as_json, junit, summary, requirements)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            return _follow_study(client, study_id, timeout, outputs, wait=wait)

    _run_client(go)


@main.command("lr-find")
@SPEC_FILE
@client_options
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait for the suggested learning rate")
@click.option("--timeout", type=float, default=None)
@click.option("--json", "as_json", is_flag=True)
def lr_find(spec_file: Path, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Run a learning-rate range test on a trial spec and print the suggested learning rate."""
    from service.cli.client import ConvtuneClient

    spec = _load_spec(spec_file)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            started = client.start_lr_find(spec)
            if not wait:
                _echo_json(started) if as_json else click.echo(f"lr-find {started['id']} started")
                return EXIT_OK
            return _follow_lr_find(client, started["id"], timeout, as_json)

    _run_client(go)


def _follow_lr_find(client: Any, finder_id: str, timeout: float | None, as_json: bool) -> int:
    with Progress(f"lr-find {finder_id[:8]}", "lr-find") as progress:
        result = client.wait_lr_find(finder_id, timeout_s=timeout, on_update=progress.update)
    if as_json:
        _echo_json(result)
    else:
        suggestion = result.get("suggested_lr") or (result.get("result") or {}).get("suggested_lr")
        click.echo(f"lr-find {finder_id} {result['status']}" + (f": suggested lr {suggestion:.3g}" if isinstance(suggestion, (int, float)) else ""))
        if result.get("reason"):
            click.echo(f"  {result['reason']}")
    return EXIT_OK if result["status"] == "succeeded" else EXIT_FAILED


@main.command()
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["read", "submit", "admin"]), default=("read", "submit"), show_default=True)
def token(name: str, scopes: tuple[str, ...]) -> None:
    """Create an API token: prints the token (give it to the client) and its entry for CONVTUNE_AUTH_TOKENS."""
    from service.api.auth import hash_token, new_token
    from service.api.settings import TokenConfig

    secret = new_token()
    entry = TokenConfig(name=name, sha256=hash_token(secret), scopes=list(dict.fromkeys(scopes)))
    click.echo("token (shown once; give it to the client as CONVTUNE_TOKEN), on stdout:", err=True)
    click.echo(secret)
    click.echo("entry for the API's CONVTUNE_AUTH_TOKENS (a JSON list of these):", err=True)
    click.echo(entry.model_dump_json(), err=True)


def _run_client(action: Any) -> None:
    from service.cli.client import ApiProblem, Unreachable

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
