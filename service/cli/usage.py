"""``convtune usage``: the compute used, by team and device kind, as a table or JSON (``GET /usage``)."""

from __future__ import annotations

from typing import Any

import click

from service.cli.calls import client_options, echo_json, run_client
from service.cli.follow import EXIT_OK

__all__ = ["usage", "usage_table"]


@click.command()
@client_options
@click.option("--since", default=None, help="start of the span: ISO 8601 or Unix seconds (default: 24 hours before --until)")
@click.option("--until", default=None, help="end of the span: ISO 8601 or Unix seconds (default: now)")
@click.option("--json", "as_json", is_flag=True, help="print the API's document as JSON")
def usage(api_url: str, token: str | None, retries: int, since: str | None, until: str | None, as_json: bool) -> None:
    """Show the compute used by this token's team (every team's for an admin token)."""
    from service.client import ConvtuneClient

    def go() -> int:
        with ConvtuneClient(api_url, token, retries=retries) as client:
            doc = client.usage(since=since, until=until)
        if as_json:
            echo_json(doc)
            return EXIT_OK
        from rich.console import Console

        Console().print(usage_table(doc))
        return EXIT_OK

    run_client(go)


def usage_table(doc: dict[str, Any]) -> Any:
    """The rich table of a ``GET /usage`` document: one row per team and device kind, then the total."""
    from rich.table import Table

    table = Table(title=f"compute used from {doc['since']} to {doc['until']}")
    for name in ("team", "device kind"):
        table.add_column(name)
    for name in ("device-hours", "CPU-hours", "TFLOPs", "runs"):
        table.add_column(name, justify="right")
    rows = doc["items"] + ([doc["total"]] if doc.get("total") and len(doc["items"]) > 1 else [])
    for row in rows:
        team = "(total)" if row is doc.get("total") else (row["team"] or "-")
        table.add_row(
            team, row["device_kind"], f"{row['device_seconds'] / 3600:.3f}", f"{row['cpu_seconds'] / 3600:.3f}", f"{row['flops'] / 1e12:.3f}", str(row["runs"]),
        )
    if not doc["items"]:
        table.caption = "no runs ended in this span"
    return table
