"""The demo the README's first command runs: trials of different shapes, their progress, a table."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.client import FINAL_STATUSES, ConvtuneClient

__all__ = ["DEMO_TRIALS", "run_demo"]

_BASE: dict[str, Any] = {"data": {"name": "digits"}, "optim": {"optimizer": "adamw", "lr": 3e-3, "batch_size": 32, "epochs": 6}}
# Three ways to grow the receptive field on the same data: strided conv vs pooling vs dilation + ASPP.
DEMO_TRIALS: list[dict[str, Any]] = [
    {**_BASE, "name": "strided conv", "model": {"channels": [32, 64], "downsample": "stride"}},
    {**_BASE, "name": "max pooling", "model": {"channels": [32, 64], "downsample": "maxpool"}},
    {**_BASE, "name": "dilation + ASPP", "model": {"channels": [16, 32], "downsample": "dilation", "kernel_size": 3, "aspp": {"rates": [1, 2, 3], "channels": 32}}},
    {**_BASE, "name": "5x5 kernels, gelu, cosine", "model": {"channels": [32, 64], "convs_per_stage": 1, "kernel_size": 5, "downsample": "stride", "activation": "gelu"}, "optim": {**_BASE["optim"], "schedule": "cosine"}},
]


def run_demo(client: ConvtuneClient, console: Console | None = None, trials: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Submit the demo trials, show their epochs as they train, print a results table; the trials."""
    console = console or Console()
    accepted = [client.submit_trial(spec) for spec in trials or DEMO_TRIALS]
    for a in accepted:
        console.print(f"submitted [bold]{a['name']}[/]: {a['id']} ({a['params_count']:,} params, {a['flops_per_sample']:,} FLOPs/sample)")
    columns = [TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs {task.fields[state]}"), TimeElapsedColumn()]
    finished: dict[str, dict[str, Any]] = {}
    with Progress(*columns, console=console) as progress:
        bars = {a["id"]: progress.add_task(a["name"], total=None, state="queued") for a in accepted}
        while len(finished) < len(accepted):
            for trial_id, bar in bars.items():
                if trial_id in finished:
                    continue
                trial = client.get_trial(trial_id)
                acc = trial["metrics"].get("val_accuracy")
                state = trial["status"] + (f"  val_acc {acc:.3f}" if acc is not None else "")
                progress.update(bar, total=trial["epochs"], completed=trial["epochs_done"], state=state)
                if trial["status"] in FINAL_STATUSES:
                    finished[trial_id] = trial
            time.sleep(0.5)
    results = [finished[a["id"]] for a in accepted]
    console.print(results_table(results))
    return results


def results_table(trials: list[dict[str, Any]]) -> Table:
    table = Table(title="convtune demo results")
    for column in ("trial", "status", "best val_acc", "epoch", "params", "FLOPs/sample", "run s"):
        table.add_column(column, justify="left" if column in ("trial", "status") else "right")
    for t in trials:
        best = t["best"].get("val_accuracy")
        run_s = t["timings"].get("run_seconds")
        table.add_row(
            t["name"] or t["id"], t["status"] if t["status"] == "succeeded" else f"{t['status']}: {t['reason']}",
            f"{best['value']:.4f}" if best else "-", str(best["epoch"]) if best else "-",
            f"{t['params_count']:,}" if t["params_count"] else "-", f"{t['flops_per_sample']:,}" if t["flops_per_sample"] else "-",
            f"{run_s:.1f}" if run_s is not None else "-",
        )
    return table
