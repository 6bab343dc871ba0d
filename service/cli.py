"""The ``convtune`` command: run the stack's processes, and drive the API from a shell or CI.

Exit codes: 0 success; 1 the trial failed or was cancelled; 2 usage or invalid spec;
3 the service is unreachable or unavailable.
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

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 3


@click.group()
@click.version_option(package_name="convtune")
def main() -> None:
    """Hyperparameter tuning for convolutional networks."""


@main.command()
@click.option("--bind", default="127.0.0.1:8000", show_default=True)
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes")
def api(bind: str, workers: int) -> None:
    """Serve the API under gunicorn (reads CONVTUNE_* settings)."""
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", bind, "--access-logfile", "-", "service:create_app()"])


@main.command()
@click.option("--cpu-workers", default=1, show_default=True, help="worker processes on a host without GPUs")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(cpu_workers: int, loglevel: str) -> None:
    """Start one Celery worker process per visible GPU (concurrency 1), or CPU workers on a CPU host."""
    from service.stack import gpu_count, worker_commands

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
    from rich.console import Console

    from service.client import ApiProblem, Unreachable
    from service.stack import Stack, StackConfig

    console = Console()
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


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack like Ctrl-C does


def _demo(console: Any, api_url: str) -> str | None:
    """Run the demo trials; the MLflow UI page listing their runs."""
    from service.client import ConvtuneClient
    from service.demo import run_demo

    with ConvtuneClient(api_url) as client:
        results = run_demo(client, console)
    return results[0]["mlflow_url"].rsplit("/", 1)[0] if results else None


@main.command()
@click.option("--api", "api_url", envvar="CONVTUNE_API", default="http://127.0.0.1:8000", show_default=True)
def demo(api_url: str) -> None:
    """Submit the demo trials to a running stack and show their results."""
    from rich.console import Console

    def go() -> int:
        console = Console()
        console.print(f"MLflow UI: {_demo(console, api_url)}")
        return EXIT_OK

    _run_client(go)


def _load_spec(path: Path) -> dict[str, Any]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--api", "api_url", envvar="CONVTUNE_API", default="http://127.0.0.1:8000", show_default=True)
@click.option("--wait", is_flag=True, help="wait until the trial ends")
def submit(spec_file: Path, api_url: str, wait: bool) -> None:
    """Submit a trial spec (YAML or JSON); prints the accepted trial as JSON."""
    from service.client import ConvtuneClient

    def go() -> int:
        with ConvtuneClient(api_url) as client:
            accepted = client.submit_trial(_load_spec(spec_file))
            click.echo(json.dumps(accepted, indent=2))
            if not wait:
                return EXIT_OK
            trial = client.wait_trial(accepted["id"], on_update=lambda t: click.echo(f"{t['status']} epoch {t['epochs_done']}/{t['epochs']}", err=True))
            click.echo(json.dumps(trial, indent=2))
            return EXIT_OK if trial["status"] == "succeeded" else EXIT_FAILED

    _run_client(go)


@main.command()
@click.argument("trial_id")
@click.option("--api", "api_url", envvar="CONVTUNE_API", default="http://127.0.0.1:8000", show_default=True)
def status(trial_id: str, api_url: str) -> None:
    """Print a trial as JSON."""
    from service.client import ConvtuneClient

    def go() -> int:
        with ConvtuneClient(api_url) as client:
            click.echo(json.dumps(client.get_trial(trial_id), indent=2))
        return EXIT_OK

    _run_client(go)


@main.command()
@click.argument("trial_id")
@click.option("--api", "api_url", envvar="CONVTUNE_API", default="http://127.0.0.1:8000", show_default=True)
def cancel(trial_id: str, api_url: str) -> None:
    """Cancel a queued or running trial."""
    from service.client import ConvtuneClient

    def go() -> int:
        with ConvtuneClient(api_url) as client:
            click.echo(json.dumps(client.cancel_trial(trial_id), indent=2))
        return EXIT_OK

    _run_client(go)


def _run_client(action: Any) -> None:
    from service.client import ApiProblem, Unreachable

    try:
        code = action()
    except Unreachable as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except ApiProblem as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE if exc.status >= 500 else EXIT_INVALID)
    sys.exit(code or EXIT_OK)
