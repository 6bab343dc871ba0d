"""``convtune ls``: trials or studies as a table (or JSON), filtered as the API's lists are (``GET /trials``, ``GET /studies``)."""

from __future__ import annotations

from typing import Any

import click

from service.cli.calls import client_options, echo_json, run_client
from service.cli.follow import EXIT_OK

__all__ = ["logs", "ls", "runs_table"]

_STATUSES = ("queued", "running", "succeeded", "pruned", "failed", "cancelled")


@click.command()
@click.argument("what", type=click.Choice(["trials", "studies"]), default="trials")
@client_options
@click.option("--status", type=click.Choice(_STATUSES), default=None, help="only those in this status (studies: no pruned)")
@click.option("--study", default=None, help="trials: only this study's")
@click.option("--team", default=None, help="only this team's (read-all and admin tokens; a team's token sees its own)")
@click.option("--owner", default=None, help="only what this API token (its name) submitted")
@click.option("--tag", default=None, metavar="KEY=VALUE", help="only runs whose spec tag KEY has VALUE")
@click.option("--since", default=None, help="accepted at or after: ISO 8601 or Unix seconds")
@click.option("--until", default=None, help="accepted before: ISO 8601 or Unix seconds")
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True, help="how many, newest first")
@click.option("--page-token", default=None, help="the next page: the token the previous page printed")
@click.option("--json", "as_json", is_flag=True, help="print the API's page as JSON")
def ls(
    what: str, api_url: str, token: str | None, retries: int, status: str | None, study: str | None, team: str | None, owner: str | None,
    tag: str | None, since: str | None, until: str | None, limit: int, page_token: str | None, as_json: bool,
) -> None:
    """List trials (default) or studies this token may read, newest first."""
    from service.client import ConvtuneClient

    if what == "studies" and study:
        raise click.UsageError("--study filters trials: convtune ls trials --study ID")
    if what == "studies" and status == "pruned":
        raise click.UsageError("a study is never pruned: --status queued, running, succeeded, failed or cancelled")

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            filters: dict[str, Any] = {"team": team, "owner": owner, "tag": tag, "since": since, "until": until}
            if what == "trials":
                page = client.list_trials(status, limit, page_token, study=study, **filters)
            else:
                page = client.list_studies(status, limit, page_token, **filters)
        if as_json:
            echo_json(page)
            return EXIT_OK
        from rich.console import Console

        console = Console()
        console.print(runs_table(what, page["items"]))
        if page.get("next_page_token"):
            console.print(f"more: --page-token {page['next_page_token']}", style="dim")
        return EXIT_OK

    run_client(go)


def runs_table(what: str, items: list[dict[str, Any]]) -> Any:
    """The rich table of one page of trials or studies."""
    from rich.table import Table

    table = Table(title=what)
    if what == "trials":
        table.add_column("id", no_wrap=True, min_width=32)  # whole, to copy into the next command
        for name in ("status", "outcome", "name", "epochs", "val_accuracy"):
            table.add_column(name, justify="right" if name in ("epochs", "val_accuracy") else "left")
        for t in items:
            best = (t.get("best") or {}).get("val_accuracy") or {}
            accuracy = best.get("value") if isinstance(best, dict) else None
            epochs = f"{t.get('epochs_done', 0)}/{t.get('epochs') or '?'}"
            table.add_row(t["id"], t["status"], t.get("outcome") or "", t.get("name") or "", epochs, "" if accuracy is None else f"{accuracy:.4f}")
    else:
        table.add_column("id", no_wrap=True, min_width=32)
        for name in ("state", "name", "trials", "best value"):
            table.add_column(name, justify="right" if name in ("trials", "best value") else "left")
        for s in items:
            progress = s.get("progress") or {}
            done = f"{progress.get('finished', '?')}/{progress.get('n_trials', '?')}" if progress else ""
            best = (s.get("best") or {}).get("value")
            table.add_row(s["id"], s["state"], s.get("name") or "", done, "" if best is None else f"{best:.4f}")
    if not items:
        table.caption = f"no {what} match"
    return table


@click.command()
@click.argument("some_id", metavar="ID")
@client_options
def logs(some_id: str, api_url: str, token: str | None, retries: int) -> None:
    """Print a trial's or range test's own log lines (warnings, errors, a failure's traceback), as its worker recorded them."""
    from service.client import ApiProblem, ConvtuneClient

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            try:
                text = client.logs(some_id)
            except ApiProblem as problem:
                if problem.status != 404:
                    raise
                text = client.logs(some_id, "lr-find")  # not a trial: a range test, or a 404 naming it
        click.echo(text, nl=not text.endswith("\n"))
        return EXIT_OK

    run_client(go)
