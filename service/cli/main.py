"""The ``convtune`` command: run the stack's processes (here: api, worker, up, demo, token; and
:mod:`service.cli.access`: mlflow-access, who reads a team's work in MLflow), and
drive the API from a shell or CI (:mod:`service.cli.runs`: submit, study create and extend, status,
wait, cancel, best, lr-find; :mod:`service.cli.lists`: ls; :mod:`service.cli.usage`: usage).

Exit codes (docs/cli.md): 0 success; 1 the trial/study failed or was cancelled; 2 invalid spec,
request or usage; 3 the service is unreachable or unavailable; 4 a --require was not met;
5 authentication or authorisation failed; 6 --timeout passed while waiting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from service.cli.access import mlflow_access
from service.cli.calls import run_client
from service.cli.follow import EXIT_CODES, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE
from service.cli.lists import logs, ls
from service.cli.runs import RUN_COMMANDS
from service.cli.usage import usage

__all__ = ["main"]


@click.group(epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
@click.version_option(package_name="convtune")
def main() -> None:
    """Hyperparameter tuning for convolutional networks."""


for _command in RUN_COMMANDS:  # submit, study create, status, wait, cancel, best, lr-find
    main.add_command(_command)
main.add_command(mlflow_access)  # sync, add, remove: who reads a team's work in MLflow
main.add_command(usage)  # the compute a team used
main.add_command(ls)  # trials or studies, filtered
main.add_command(logs)  # a trial's own log lines


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
@click.option("--trials-per-worker", default=1, show_default=True, envvar="CONVTUNE_TRIALS_PER_WORKER", type=click.IntRange(1, 64),
              help="trials each worker trains at once (small trials: more than 1 overlaps one's MLflow writes with another's training)")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--stop-timeout", default=90.0, show_default=True, envvar="CONVTUNE_WORKER_STOP_TIMEOUT_S",
              help="on SIGINT/SIGTERM, seconds a worker may take to finish its running task before it is killed")
def worker(cpu_workers: int, trials_per_worker: int, loglevel: str, stop_timeout: float) -> None:
    """Start one Celery worker process per visible GPU (concurrency 1), or CPU workers on a CPU host,
    plus the light callback worker; all of them live and stop with this process.

    SIGINT or SIGTERM (also with SIGINT inherited ignored, as a script's `convtune worker &` has it)
    stops them: each takes no new task and finishes the one it runs (Celery's warm shutdown), then is
    killed after --stop-timeout. If one exits, the others are stopped and this exits 1. On Linux the
    kernel sends each SIGTERM when this process dies, even by SIGKILL.
    """
    from service.stack.supervisor import gpu_count, spawn, stop_on_signals, stop_processes, worker_commands

    stop_on_signals()  # before the first child: a signal from here on lands in `except KeyboardInterrupt`
    children: list[tuple[str, subprocess.Popen]] = []
    code = EXIT_OK
    try:
        for name, argv, env in worker_commands(gpu_count(), cpu_workers, loglevel, trials_per_worker):  # stdout and stderr inherited: one stream, as a container's log wants
            children.append((name, spawn(argv, env)))
        while (dead := next(((n, c) for n, c in children if c.poll() is not None), None)) is None:
            time.sleep(0.5)
        click.echo(f"convtune worker: {dead[0]} exited ({dead[1].returncode}); stopping the others", err=True)
        code = EXIT_FAILED
    except KeyboardInterrupt as exc:
        click.echo(f"convtune worker: {exc or 'interrupted'}; stopping {', '.join(n for n, _ in children)} (warm shutdown, at most {stop_timeout:g}s)", err=True)
    finally:
        codes = stop_processes([c for _, c in children], stop_timeout, term_group=False)
    unclean = [f"{name} ({rc})" for (name, _), rc in zip(children, codes) if rc != 0]
    if code == EXIT_OK and unclean:
        click.echo(f"convtune worker: not stopped cleanly: {', '.join(unclean)}", err=True)
        code = EXIT_FAILED
    sys.exit(code)


@main.command()
@click.option("--home", type=click.Path(path_type=Path), default=Path(".convtune"), show_default=True, help="logs, sqlite store, artifacts")
@click.option("--api-port", default=8000, show_default=True)
@click.option("--mlflow-port", default=5000, show_default=True)
@click.option("--cpu-workers", default=1, show_default=True)
@click.option("--trials-per-worker", default=1, show_default=True, envvar="CONVTUNE_TRIALS_PER_WORKER", type=click.IntRange(1, 64),
              help="trials each worker trains at once (small trials: more than 1 overlaps one's MLflow writes with another's training)")
@click.option("--demo", is_flag=True, help="submit the demo trials once the stack is up")
@click.option("--detach-after-demo", is_flag=True, help="with --demo: stop the stack after the demo instead of serving on")
def up(home: Path, api_port: int, mlflow_port: int, cpu_workers: int, trials_per_worker: int, demo: bool, detach_after_demo: bool) -> None:
    """Start the local stack (Redis if needed, MLflow, workers, API); Ctrl-C stops all of it."""

    from service.client import ApiProblem, Unreachable
    from service.stack.supervisor import Stack, StackConfig, stop_on_signals

    stop_on_signals()  # Ctrl-C and SIGTERM both land in `except KeyboardInterrupt`, even from `convtune up &`
    console = _console()
    config = StackConfig(home=home, redis_url=os.environ.get("CONVTUNE_REDIS_URL", "redis://127.0.0.1:6379/0"), api_port=api_port, mlflow_port=mlflow_port, cpu_workers=cpu_workers, trials_per_worker=trials_per_worker)
    stack = Stack(config, say=lambda m: console.print(f"[green]>[/] {m}"))
    try:
        stack.up()
        runs_page = _demo(console, config.api_url) if demo else None
        ui = runs_page or f"{config.mlflow_url}/#/experiments (the 'convtune' experiment, Runs tab)"
        console.print(f"\n[bold]MLflow UI:[/] {ui}\n[bold]API:[/]       {config.api_url}  (GET /trials)")
        if demo and detach_after_demo:
            return
        console.print("The stack is up. Press Ctrl-C to stop it.")
        dead = stack.watch()
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


def _demo(console: Any, api_url: str, token: str | None = None) -> str | None:
    """Run the demo trials; the MLflow UI page listing their runs."""
    from service.client import ConvtuneClient
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

    run_client(go)


@main.command()
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["read", "read-all", "submit", "admin"]), default=("read", "submit"), show_default=True)
@click.option("--team", default=None, help="The team it acts for (its tokens share their work); default: a team of its own, named NAME.")
def token(name: str, scopes: tuple[str, ...], team: str | None) -> None:
    """Create an API token: prints the token (give it to the client) and its entry for CONVTUNE_AUTH_TOKENS."""
    from service.api.auth import hash_token, new_token
    from service.api.settings import TokenConfig

    secret = new_token()
    entry = TokenConfig(name=name, sha256=hash_token(secret), scopes=list(dict.fromkeys(scopes)), team=team)
    click.echo("token (shown once; give it to the client as CONVTUNE_TOKEN), on stdout:", err=True)
    click.echo(secret)
    click.echo("entry for the API's CONVTUNE_AUTH_TOKENS (a JSON list of these):", err=True)
    click.echo(entry.model_dump_json(exclude_none=True), err=True)
    if os.environ.get("CONVTUNE_SECRET_KEY") or os.environ.get("CONVTUNE_CALLBACK_SECRET"):
        _echo_webhook_key(entry.team_name, err=True)  # stdout stays the token alone: TOKEN=$(convtune token NAME)


@main.command("webhook-key")
@click.option("--team", required=True, help="The team whose callback receivers verify with it ('default': callbacks without authentication).")
def webhook_key(team: str) -> None:
    """Print a team's webhook signing key (whsec_...), derived from CONVTUNE_SECRET_KEY in this environment."""
    if not (os.environ.get("CONVTUNE_SECRET_KEY") or os.environ.get("CONVTUNE_CALLBACK_SECRET")):
        raise click.UsageError("set CONVTUNE_SECRET_KEY (the API's and workers' secret key) in this environment: the key is derived from it")
    _echo_webhook_key(team)


def _echo_webhook_key(team: str, err: bool = False) -> None:
    """Print ``team``'s current webhook key (on stdout, or stderr with ``err``), what it is on stderr."""
    from service.api.settings import ApiSettings
    from service.api.teams import team_webhook_key

    key = team_webhook_key(ApiSettings(), team)
    click.echo(f"webhook key of team {team!r}, version {key.version} (its callback receivers verify signatures with it):", err=True)
    click.echo(key.secret, err=err)
