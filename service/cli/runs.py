"""The commands that drive a running API from a shell or CI: submit, study create, status, wait,
cancel, best and lr-find. Each calls the API through :class:`~service.client.ConvtuneClient`
and exits with the code of what happened (docs/cli.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from service.cli.calls import SPEC_FILE, client_options, echo_json, load_spec, outputs_from_options, result_options, run_client
from service.cli.follow import EXIT_FAILED, EXIT_INVALID, EXIT_OK, Outputs, Progress, conclude
from service.cli.reports import front_table

__all__ = ["RUN_COMMANDS"]


@click.command()
@SPEC_FILE
@client_options
@result_options
def submit(spec_file: Path, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, requirements: tuple[str, ...], as_json: bool, junit: Path | None, summary: Path | None) -> None:
    """Submit a trial spec (YAML or JSON); with --wait, follow it to the end and gate on it."""
    from service.client import ConvtuneClient

    spec, outputs = load_spec(spec_file), outputs_from_options(as_json, junit, summary, requirements)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            accepted = client.submit_trial(spec)
            if not (wait or outputs.requirements or junit or summary):
                echo_json(accepted) if as_json else click.echo(f"trial {accepted['id']} queued: {accepted['url']}\n  MLflow: {accepted['mlflow_url']}")
                return EXIT_OK
            click.echo(f"trial {accepted['id']} queued ({accepted['name']}): {accepted['mlflow_url']}", err=True)
            return _follow_trial(client, accepted["id"], timeout, outputs)

    run_client(go)


def _follow_trial(client: Any, trial_id: str, timeout: float | None, outputs: Outputs) -> int:
    with Progress(f"trial {trial_id[:8]}", "trial") as progress:
        trial = client.wait_trial(trial_id, timeout_s=timeout, on_update=progress.update)
    return conclude("trial", trial, [trial], trial, outputs, ok=trial["status"] == "succeeded")


@click.group()
def study() -> None:
    """Studies: a search over trial specs (Optuna)."""


@study.command("create")
@SPEC_FILE
@client_options
@result_options
def study_create(spec_file: Path, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, requirements: tuple[str, ...], as_json: bool, junit: Path | None, summary: Path | None) -> None:
    """Create a study from a spec (YAML or JSON); with --wait, follow it and gate on its chosen trial (printing a front)."""
    from service.client import ConvtuneClient

    spec, outputs = load_spec(spec_file), outputs_from_options(as_json, junit, summary, requirements)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            created = client.create_study(spec)
            if not (wait or outputs.requirements or junit or summary):
                echo_json(created) if as_json else click.echo(f"study {created['id']} created: {created.get('url') or ''}".rstrip(": "))
                return EXIT_OK
            click.echo(f"study {created['id']} created", err=True)
            return _follow_study(client, created["id"], timeout, outputs)

    run_client(go)


@study.command("extend")
@click.argument("study_id")
@click.option("--trials", "n_trials", type=click.IntRange(1, 10_000), required=True, help="how many trials to add to its budget")
@click.option("--warm-start", "warm_start_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML or JSON list of configurations ({param: value}) to try first")
@client_options
@result_options
def study_extend(
    study_id: str, n_trials: int, warm_start_file: Path | None, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None,
    requirements: tuple[str, ...], as_json: bool, junit: Path | None, summary: Path | None,
) -> None:
    """Add trials to a running or ended study (it reopens); with --wait, follow it to its new end and gate on its chosen trial."""
    from service.client import ConvtuneClient

    warm_start = None
    if warm_start_file is not None:
        import yaml

        try:
            warm_start = yaml.safe_load(warm_start_file.read_text())  # YAML or JSON
        except (OSError, yaml.YAMLError) as exc:
            raise click.BadParameter(f"cannot read {warm_start_file}: {exc}", param_hint="--warm-start") from exc
        if not isinstance(warm_start, list) or not all(isinstance(point, dict) for point in warm_start):
            raise click.BadParameter(f"{warm_start_file} must hold a list of configurations ({{param: value}}, ...)", param_hint="--warm-start")
    outputs = outputs_from_options(as_json, junit, summary, requirements)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            extended = client.extend_study(study_id, n_trials, warm_start)
            if not (wait or outputs.requirements or junit or summary):
                budget = (extended.get("progress") or {}).get("n_trials")
                echo_json(extended) if as_json else click.echo(f"study {study_id} extended by {n_trials} trials (budget {budget}, {extended['state']})")
                return EXIT_OK
            click.echo(f"study {study_id} extended by {n_trials} trials", err=True)
            return _follow_study(client, study_id, timeout, outputs)

    run_client(go)


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
    front = front_table(current)
    if front and not outputs.as_json:  # --json carries the front in the study document
        click.echo(front)
    return conclude("study", current, trials, best, outputs, ok=ok)


def _resolve(client: Any, some_id: str) -> tuple[str, dict[str, Any]]:
    """('trial' | 'study' | 'lr-find', its document) for an id of any of them."""
    from service.client import ApiProblem

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


@click.command()
@click.argument("some_id", metavar="ID")
@client_options
@click.option("--json", "as_json", is_flag=True, help="print the whole document as JSON")
def status(some_id: str, api_url: str, token: str | None, retries: int, as_json: bool) -> None:
    """Show a trial, study or lr-find run by its id."""
    from service.cli.follow import describe
    from service.client import ConvtuneClient

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            kind, doc = _resolve(client, some_id)
        if as_json:
            echo_json({"kind": kind, **doc})
            return EXIT_OK
        done, total, state = describe(kind, doc)
        click.echo(f"{kind} {doc['id']}: {state} ({done}/{total if total is not None else '?'})")
        if doc.get("reason"):
            click.echo(f"  reason: {doc['reason']}")
        if doc.get("mlflow_url"):
            click.echo(f"  MLflow: {doc['mlflow_url']}")
        return EXIT_OK

    run_client(go)


@click.command("wait")
@click.argument("some_id", metavar="ID")
@client_options
@result_options
def wait_command(some_id: str, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, requirements: tuple[str, ...], as_json: bool, junit: Path | None, summary: Path | None) -> None:
    """Wait until a trial or study ends; gate and report like submit --wait."""
    from service.client import ConvtuneClient

    outputs = outputs_from_options(as_json, junit, summary, requirements)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            kind, _ = _resolve(client, some_id)
            if kind == "study":
                return _follow_study(client, some_id, timeout, outputs)
            if kind == "lr-find":
                return _follow_lr_find(client, some_id, timeout, as_json)
            return _follow_trial(client, some_id, timeout, outputs)

    run_client(go)


@click.command()
@click.argument("some_id", metavar="ID")
@client_options
@click.option("--json", "as_json", is_flag=True)
def cancel(some_id: str, api_url: str, token: str | None, retries: int, as_json: bool) -> None:
    """Cancel a queued or running trial or study."""
    from service.client import ConvtuneClient

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            kind, _ = _resolve(client, some_id)
            cancel_of = {"trial": client.cancel_trial, "study": client.cancel_study, "lr-find": client.cancel_lr_find}
            doc = cancel_of[kind](some_id)
        echo_json(doc) if as_json else click.echo(f"{kind} {some_id}: cancel requested ({doc.get('status') or doc.get('state')})")
        return EXIT_OK

    run_client(go)


@click.command()
@click.argument("study_id")
@client_options
@result_options
def best(study_id: str, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, requirements: tuple[str, ...], as_json: bool, junit: Path | None, summary: Path | None) -> None:
    """Show a study's chosen trial so far (with --wait: at its end) and its Pareto front, and gate on the chosen trial."""
    from service.client import ConvtuneClient

    outputs = outputs_from_options(as_json, junit, summary, requirements)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            return _follow_study(client, study_id, timeout, outputs, wait=wait)

    run_client(go)


@click.command("lr-find")
@SPEC_FILE
@client_options
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait for the suggested learning rate")
@click.option("--timeout", type=float, default=None)
@click.option("--json", "as_json", is_flag=True)
def lr_find(spec_file: Path, api_url: str, token: str | None, retries: int, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Run a learning-rate range test on a trial spec and print the suggested learning rate."""
    from service.client import ConvtuneClient

    spec = load_spec(spec_file)

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            started = client.start_lr_find(spec)
            if not wait:
                echo_json(started) if as_json else click.echo(f"lr-find {started['id']} started")
                return EXIT_OK
            return _follow_lr_find(client, started["id"], timeout, as_json)

    run_client(go)


def _follow_lr_find(client: Any, finder_id: str, timeout: float | None, as_json: bool) -> int:
    with Progress(f"lr-find {finder_id[:8]}", "lr-find") as progress:
        result = client.wait_lr_find(finder_id, timeout_s=timeout, on_update=progress.update)
    if as_json:
        echo_json(result)
    else:
        suggestion = result.get("suggested_lr") or (result.get("result") or {}).get("suggested_lr")
        click.echo(f"lr-find {finder_id} {result['status']}" + (f": suggested lr {suggestion:.3g}" if isinstance(suggestion, (int, float)) else ""))
        if result.get("reason"):
            click.echo(f"  {result['reason']}")
    return EXIT_OK if result["status"] == "succeeded" else EXIT_FAILED


RUN_COMMANDS = [submit, study, status, wait_command, cancel, best, lr_find]
