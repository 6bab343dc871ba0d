"""Many small trials: convtune against the two ways a team would otherwise tune (issue 10's workload).

N one-epoch trials on ``digits`` (lr log-uniform 1e-4..1e-1, batch size 16/32/64, TPE, no pruning),
every trial logging params, per-epoch metrics and the model, all against ONE MLflow server (the
stack's own: sqlite, one server worker, as ``convtune up`` starts it). In the same run, each repeat
runs the three in turn:

  convtune   ``convtune up --cpu-workers 2`` (the CLI's own code path, nothing exported), one study
             with parallelism 2 on the base spec ``channels [32, 64], convs_per_stage 2, norm none``
             (2.99 MFLOPs a sample); timed from just before ``POST /studies`` (the durable accept
             included) to the end time of the study's parent run (the study ended: report done).
  peer 1     bench/peers/optuna_mlflow.py: a hand-written Optuna + MLflow loop in one process, one
             torch thread, nested runs, batched metrics, a state_dict artifact, a 3.58 MFLOPs net;
             timed from creating its parent run to ending it (imports and a first optimizer step
             before the clock, once per process, as a warm worker has them).
  peer 2     bench/peers/ray_tune.py: Ray Tune, 2 concurrent trials, actors reused, OptunaSearch TPE,
             MLflow from inside the trainable; timed over ``Tuner.fit()`` (``ray.init`` before).

Divergence checks are off in the base spec (``--divergence-checks`` keeps them): a diverged trial
stops mid-epoch, and the peers train every trial's whole epoch. Before the first repeat the stack
runs a warm-up study (4 trials) so both workers have paid their
once-per-process costs, as a long-lived ``convtune up`` has. Two figures per way:
``trials/min`` (N over the timed wall, the headline) and ``span trials/min`` (N over the first trial's
start to the last trial's end, from MLflow's timestamps for convtune, the peers' own clocks for
them). Medians over --repeats. Beside them, the CPU the shared MLflow server spent per trial (its
process and its uvicorn, from /proc, over each way's run: what each way's requests and uploads cost
it). Target: convtune's trials/min >= 1.3x the best peer's.

    python bench/small_trials.py [--quick] [--trials 60] [--repeats 3] [--peers optuna,ray]

Needs the ``bench`` extra for peer 2 (``pip install -e ".[bench]"``); without Ray that peer is
reported ``unavailable``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Stack, Target, convtune_up, cpu_delta, emit, median, note, print_table, private_redis, process_cpu  # noqa: E402

BASE_MODEL = {"channels": [32, 64], "convs_per_stage": 2, "norm": "none"}
PEER_FLOPS = 3_577_088  # bench/peers/optuna_mlflow.small_net, per sample
PEERS = {"optuna": ("peer 1: Optuna + MLflow, one process", "peers/optuna_mlflow.py"), "ray": ("peer 2: Ray Tune, 2 actors reused", "peers/ray_tune.py")}
TERMINAL = ("succeeded", "failed", "cancelled")


def study_body(trials: int, seed: int, name: str, divergence_checks: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        # Divergence checks off: every trial trains its whole epoch, as the peers' do (same work).
        "base": {"model": BASE_MODEL, "optim": {"epochs": 1}, "data": {"name": "digits"}, "divergence": {"enabled": divergence_checks}},
        "search_space": {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "optim.batch_size": [16, 32, 64],
        },
        "sampler": {"name": "tpe"},
        "pruner": {"name": "none"},
        "seed": seed,
        "n_trials": trials,
        "parallelism": 2,
    }


def planned_flops() -> int:
    from models.spec.plan import builtin_input, plan_network
    from models.spec.trial import ConvNetSpec, DataSpec

    return plan_network(ConvNetSpec.model_validate(BASE_MODEL), builtin_input(DataSpec(name="digits"))).flops


def run_convtune(stack: Stack, trials: int, seed: int, name: str, divergence_checks: bool = False) -> dict[str, Any]:
    """One study through the API; its wall (POST -> parent run ended), span and per-trial records from MLflow."""
    import httpx
    from mlflow.tracking import MlflowClient

    with httpx.Client(base_url=stack.api_url, timeout=60) as api:
        t_post = time.time()
        accepted = api.post("/studies", json=study_body(trials, seed, name, divergence_checks))
        accepted.raise_for_status()
        accept_s = time.time() - t_post
        study_id = accepted.json()["id"]
        while (study := api.get(f"/studies/{study_id}").raise_for_status().json())["state"] not in TERMINAL:
            time.sleep(1.0)  # as `convtune study wait` polls; the end time is the parent run's, not the poll's
    mlflow = MlflowClient(stack.mlflow_url)
    parent = mlflow.get_run(study_id)
    children = mlflow.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study_id}'", max_results=10_000)
    starts = [_epoch(c.data.tags["convtune.started_at"]) for c in children if "convtune.started_at" in c.data.tags]
    ends = [c.info.end_time / 1000 for c in children if c.info.end_time]
    outcomes: dict[str, int] = {}
    for c in children:
        outcomes[c.data.tags.get("convtune.outcome", "none")] = outcomes.get(c.data.tags.get("convtune.outcome", "none"), 0) + 1
    flops = {c.data.tags.get("convtune.flops_per_sample") for c in children}
    return {
        "wall_s": parent.info.end_time / 1000 - t_post, "accept_s": accept_s, "starts": sorted(starts), "ends": sorted(ends),
        "completed": sum(n for o, n in outcomes.items() if o in ("succeeded", "diverged")), "outcomes": outcomes, "state": study["state"],
        "best": (study.get("best") or {}).get("value"), "reported_flops": sorted(int(f) for f in flops if f),
    }


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def run_peer(script: str, tracking_uri: str, trials: int, seed: int) -> dict[str, Any]:
    """One run of a peer script in a process of its own; its JSON line, or why it is unavailable."""
    argv = [sys.executable, str(ROOT / "bench" / script), "--tracking-uri", tracking_uri, "--trials", str(trials), "--seed", str(seed)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"unavailable": f"exit {done.returncode}: {reason[:300]}"}
    return json.loads(lines[-1])


def ray_available() -> str | None:
    """None when Ray Tune and its Optuna search import here; else why not."""
    probe = subprocess.run([sys.executable, "-c", "import ray, ray.tune; from ray.tune.search.optuna import OptunaSearch"], capture_output=True, text=True)
    if probe.returncode:
        return f"Ray Tune does not import ({(probe.stderr.strip().splitlines() or ['?'])[-1]}); pip install -e '.[bench]'"
    return None


def rates(result: dict[str, Any], trials: int) -> tuple[float, float]:
    """(trials/min over the timed wall, trials/min over first start -> last end)."""
    if "unavailable" in result or not result.get("ends"):
        return float("nan"), float("nan")
    span = max(result["ends"]) - min(result["starts"])
    return 60 * trials / result["wall_s"], 60 * trials / span if span > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 trials, 1 repeat")
    parser.add_argument("--trials", type=int, default=None, help="trials per study (60; --quick 12)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of each way (3; --quick 1)")
    parser.add_argument("--peers", default="optuna,ray", help="comma-separated: optuna, ray (or none)")
    parser.add_argument("--warmup-trials", type=int, default=None, help="trials of the warm-up study (4; --quick 2)")
    parser.add_argument("--divergence-checks", action="store_true", help="keep the product's divergence checks (diverged trials stop early: less work)")
    args = parser.parse_args()
    trials = args.trials or (12 if args.quick else 60)
    repeats = args.repeats or (1 if args.quick else 3)
    peers = [p for p in args.peers.split(",") if p in PEERS]
    warmup = args.warmup_trials if args.warmup_trials is not None else (2 if args.quick else 4)

    flops = planned_flops()
    note(f"convtune base model {BASE_MODEL}: {flops:,} FLOPs a sample (plan_network); peers' net {PEER_FLOPS:,}")
    unavailable = {"ray": ray_available()} if "ray" in peers else {}
    results: dict[str, list[dict[str, Any]]] = {"convtune": [], **{p: [] for p in peers}}
    with private_redis() as redis_url, convtune_up(redis_url, cpu_workers=2) as stack:
        if warmup:
            warm = run_convtune(stack, warmup, 1000, "warm-up")
            note(f"warm-up study: {warm['outcomes']} in {warm['wall_s']:.1f}s")
        for r in range(repeats):
            before = process_cpu(stack.popen.pid)
            run = run_convtune(stack, trials, r, f"small trials {r}", args.divergence_checks)
            run["cpu_s"] = cpu_delta(before, process_cpu(stack.popen.pid))
            results["convtune"].append(run)
            note(f"repeat {r}: convtune {run['state']} {run['outcomes']} in {run['wall_s']:.1f}s (accept {run['accept_s'] * 1000:.0f} ms)")
            for peer in peers:
                if unavailable.get(peer):
                    results[peer].append({"unavailable": unavailable[peer]})
                    continue
                before = process_cpu(stack.popen.pid)
                out = run_peer(PEERS[peer][1], stack.mlflow_url, trials, r)
                out["cpu_s"] = cpu_delta(before, process_cpu(stack.popen.pid))  # the stack is idle meanwhile: its MLflow server's share
                results[peer].append(out)
                note(f"repeat {r}: {peer} " + (out["unavailable"] if "unavailable" in out else f"{out['completed']} trials in {out['wall_s']:.1f}s"))
                if "unavailable" in out:
                    unavailable[peer] = out["unavailable"]

    rows, figures = [], {"trials": trials, "repeats": repeats, "flops_per_sample": {"convtune": flops, "peers": PEER_FLOPS}}
    reported = sorted({f for run in results["convtune"] for f in run["reported_flops"]})
    figures["flops_per_sample"]["convtune_reported"] = reported
    for key, runs in results.items():
        label = "convtune: up --cpu-workers 2, parallelism 2" if key == "convtune" else PEERS[key][0]
        if any("unavailable" in run for run in runs) or not runs:
            reason = next((run["unavailable"] for run in runs if "unavailable" in run), "not run")
            rows.append([label, "unavailable", "-", "-", "-", "-", reason[:80]])
            figures[key] = {"unavailable": reason}
            continue
        per_run = [rates(run, trials) for run in runs]
        tpm, span_tpm = median([p[0] for p in per_run]), median([p[1] for p in per_run])
        complete = min(run["completed"] for run in runs)
        best = median([run["best"] for run in runs if run.get("best") is not None])
        server_ms = median([1000 * run["cpu_s"].get("mlflow server", 0.0) / trials for run in runs])
        rows.append([label, round(tpm, 1), round(60 / tpm, 3), round(span_tpm, 1), round(server_ms), f"{complete}/{trials}", round(best, 3)])
        figures[key] = {
            "trials_per_min": tpm, "per_trial_s": 60 / tpm, "span_trials_per_min": span_tpm, "completed_min": complete, "best_val_accuracy": best,
            "runs_trials_per_min": [p[0] for p in per_run], "wall_s": [run["wall_s"] for run in runs], "mlflow_server_cpu_ms_per_trial": server_ms,
            **({"workers_cpu_ms_per_trial": median([1000 * run["cpu_s"].get("workers", 0.0) / trials for run in runs])} if key == "convtune" else {}),
            **({"accept_ms": median([run["accept_s"] * 1000 for run in runs])} if key == "convtune" else {}),
        }
    print_table(
        f"{trials} one-epoch digits trials, median of {repeats}, one MLflow server (sqlite, 1 worker)",
        ["how", "trials/min", "per trial s", "span trials/min", "MLflow server CPU ms/trial", "completed", "best val_acc"], rows,
    )
    peer_rates = {k: figures[k]["trials_per_min"] for k in peers if "trials_per_min" in figures.get(k, {})}
    best_peer = max(peer_rates, key=peer_rates.get) if peer_rates else None
    ratio = figures["convtune"]["trials_per_min"] / peer_rates[best_peer] if best_peer else float("nan")
    figures["best_peer"] = best_peer
    figures["ratio_vs_best_peer"] = ratio
    if best_peer:
        # Paired by repeat (each repeat's convtune against that repeat's best peer): drift between repeats cancels.
        paired = [ours / max(figures[k]["runs_trials_per_min"][r] for k in peer_rates) for r, ours in enumerate(figures["convtune"]["runs_trials_per_min"])]
        figures["paired_ratios"], figures["paired_ratio_median"] = paired, median(paired)
        print(f"per repeat, convtune / that repeat's best peer: {', '.join(f'{p:.2f}' for p in paired)} (median {median(paired):.2f}x)")
    if best_peer:
        # The steady state has its own best peer (Ray's actors start slowly, then run fast).
        span_rates = {k: figures[k]["span_trials_per_min"] for k in peer_rates}
        best_span_peer = max(span_rates, key=span_rates.get)
        span_ratio = figures["convtune"]["span_trials_per_min"] / span_rates[best_span_peer]
        figures["span_ratio_vs_best_peer"], figures["best_span_peer"] = span_ratio, best_span_peer
        print(f"convtune / best peer ({best_peer}): {ratio:.2f}x trials/min; first start -> last end, against the best there ({best_span_peer}): {span_ratio:.2f}x")
    all_done = all(run["completed"] == trials for run in results["convtune"])
    emit("small_trials", figures, {
        "convtune_vs_best_peer": Target(ratio, ">=", 1.3),
        "convtune_all_trials_trained": Target(1.0 if all_done else 0.0, ">=", 1),
    })


if __name__ == "__main__":
    main()
