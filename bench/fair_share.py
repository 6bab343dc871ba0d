"""Fair share between teams: does a small team's work start soon behind a big team's backlog, does
each team get its weight's share of the workers while all wait, and is no worker time lost to it?

The scenario, run twice in one invocation on the same machine, with the same tokens and work:

  fair  ``CONVTUNE_FAIR_SHARE=true``: each team's work waits in a queue of its own, fed to the
        workers by weight (``CONVTUNE_TEAMS`` from ``--weights``)
  fifo  ``CONVTUNE_FAIR_SHARE=false``: one queue per device kind, first come first served (the baseline)

Each run has a stack of its own (``convtune up --cpu-workers 2``: two workers on the ``cpu`` queue,
the API with auth on and one token per team A, B, C; a Redis database of its own, so no message,
heartbeat or share state of one run reaches another) against one MLflow server all runs share
(sqlite, one server worker, as ``convtune up`` starts it; each run's teams in experiments of their
own, ``bench-fair-share-<run>/<team>``). Before the scenario a fourth team's trials warm every worker
up (a worker's first trial pays seconds of once-per-process costs that a long-lived stack has
paid). Then team A submits N one-epoch trials (generated ``shapes``, 3000 images of 28 px, ``channels [16, 32]``: about a second each; 4 threads posting)
and then a study (parallelism 4); B submits one trial ``b_delay`` seconds after A's first POST; C
submits a study (parallelism 2) ``c_delay`` seconds after B. The bench waits until MLflow shows every
run ended, and reads it back. ``--repeats N`` runs N pairs, the order alternating (fair first, then
fifo first), and judges the medians.

Every figure comes from MLflow's records: a trial's start is its ``convtune.started_at`` tag (a
worker's first start: MLflow's own ``start_time`` of a standalone trial is its accept, since the API
creates the run SCHEDULED), its end the run's ``end_time``; a submit is the bench's clock just before
the POST, an accept its 202 (same host). Worker time is counted on trials (standalone and a
study's), not on a study's parent run; the workers' logs give a second count beside it (each task's
runtime: a study's steps and report included, which its trials' runs leave out).

- **wait**: a team's submit to its first trial's start; split into accept (submit -> 202) and
  queued (202 -> start).
- **share while all wait**: the window opens when the last team's first work is accepted (T0),
  among the teams that still have work waiting then (a trial not yet started); it closes when the
  first of them has nothing left waiting (T1: its last trial started). A team's share is its trials'
  worker-seconds inside [T0, T1] over every trial's worker-seconds inside it; its weight share is its
  weight over the sum of the weights of the teams in the window. A team done before T0 (B, when
  served at once) is outside the window.
- **total wall**: the first submit to the last run's end (the studies' reports included); beside
  it, busy: the workers' task time over (2 workers x the wall).

Targets (of the fair runs; the fifo runs are the baseline shown beside them):

  b_queued_in_trial_durations  B's wait from its 202 to its trial's start / the median trial
                             duration <= 1: one trial duration is the longest any worker can take to
                             free its slot once B's trial is queued. The accept before it (submit ->
                             202) is shown beside it: it is the API's latency while A posts, not the
                             queue's order
  share_vs_weight_<team>     |share / weight share - 1| <= 0.10 for each team in the window (the
                             workers' task times, the default: what each team held a worker for, a
                             study's steps included; ``--share-from mlflow``: the trials' runs only)
  wall_vs_fifo               fair's total wall / fifo's (same repeat) <= 1.05 (work conservation)
  records_complete           every run: each submitted trial and each study's trials in MLflow, in
                             the team's experiment, tagged ``convtune.team`` with its team, started
                             and ended; nothing refused

    python bench/fair_share.py [--quick] [--weights A=2] [--repeats 1] [--modes fair,fifo] [--share-from mlflow|tasks]
                               [--json] [--runs-csv PATH]

Full: A 200 trials + a 40-trial study, B 1 trial after 10 s, C a 10-trial study 20 s later.
``--quick``: A 40 trials + an 8-trial study, B 1 trial, C a 4-trial study, delays 2 s and 4 s. On the
2-core machine ``--quick`` takes 60-90 s and the full scenario about 3 minutes (each stack's start and
warm-up take about 15 s, the MLflow server's about 10 s): ``--quick`` is as short as the scenario
goes, not under a minute. ``--json``: no table, only the JSON
line. ``--runs-csv``: every run's accept, start and end (s from its run's first submit), for plots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Target, convtune_up, emit, median, mlflow_server, note, print_table, private_redis, wait_until

TEAMS = ("A", "B", "C")
WARM_UP_TEAM = "warmup"  # its trials warm every worker up before the scenario (its own experiment, never read back)
MODEL = {"channels": [16, 32], "convs_per_stage": 1, "norm": "none"}
# One epoch of generated shapes: about a second a trial on this machine kind, long beside an accept (0.2-0.5 s),
# so a wait measures the queue, not the API. (digits trains an epoch in 0.2-0.4 s here.)
DATA = {"name": "shapes", "num_samples": 3000, "image_size": 28}
# Divergence checks off: every trial trains its whole epoch (the same work in both runs).
BASE = {"model": MODEL, "optim": {"epochs": 1, "batch_size": 64}, "data": DATA, "divergence": {"enabled": False}, "queue": "cpu"}
TERMINAL = ("FINISHED", "FAILED", "KILLED")
WORKERS = 2
POSTERS = 4  # threads posting A's trials (the API has two gunicorn workers: more only queue there, in front of B's POST)


@dataclass(frozen=True)
class Scenario:
    a_trials: int
    a_study: int
    a_parallelism: int
    b_trials: int
    c_study: int
    c_parallelism: int
    b_delay_s: float
    c_delay_s: float
    timeout_s: float


FULL = Scenario(200, 40, 4, 1, 10, 2, 10.0, 20.0, 1800.0)
QUICK = Scenario(40, 8, 4, 1, 4, 2, 2.0, 4.0, 600.0)


@dataclass
class Submitted:
    """What one run submitted, per team: the first POST's time, trial ids, study ids, refusals."""

    first_submit: dict[str, float] = field(default_factory=dict)
    first_accepted: dict[str, float] = field(default_factory=dict)  # its first 202 received
    trials: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TEAMS})
    studies: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: {t: [] for t in TEAMS})  # (study id, n_trials)
    refused: list[str] = field(default_factory=list)
    a_submit_span_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stamp(self, team: str) -> None:
        with self.lock:
            self.first_submit.setdefault(team, time.time())


def study_body(name: str, n_trials: int, parallelism: int, seed: int) -> dict[str, Any]:
    return {
        "name": name, "base": BASE, "seed": seed, "n_trials": n_trials, "parallelism": parallelism,
        "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}, "optim.batch_size": [32, 64]},
        "sampler": {"name": "random"}, "pruner": {"name": "none"},
    }


# --- tokens and settings ---------------------------------------------------------------------------


def make_tokens() -> tuple[dict[str, str], str]:
    """One submit token per team (its team set explicitly), and CONVTUNE_AUTH_TOKENS for them."""
    from service.api.auth import hash_token, new_token

    tokens = {team: new_token() for team in (*TEAMS, WARM_UP_TEAM)}
    config = [{"name": f"bench-{team}", "team": team, "sha256": hash_token(tok), "scopes": ["read", "submit"]} for team, tok in tokens.items()]
    return tokens, json.dumps(config)


def parse_weights(text: str) -> dict[str, float]:
    weights = {team: 1.0 for team in TEAMS}
    for part in filter(None, (p.strip() for p in text.split(","))):
        team, sep, value = part.partition("=")
        if not sep or team not in TEAMS or float(value) <= 0:
            raise SystemExit(f"--weights: {part!r} is not TEAM=WEIGHT with TEAM one of {', '.join(TEAMS)} and WEIGHT > 0")
        weights[team] = float(value)
    return weights


def stack_env(mode: str, tokens_env: str, weights: dict[str, float], artifacts: Path) -> dict[str, str]:
    return {
        "CONVTUNE_FAIR_SHARE": "true" if mode == "fair" else "false",
        "CONVTUNE_TEAMS": json.dumps({team: {"weight": w} for team, w in weights.items()}),
        "CONVTUNE_AUTH_DISABLED": "false",
        "CONVTUNE_AUTH_TOKENS": tokens_env,
        "CONVTUNE_EXPERIMENT": f"bench-fair-share-{mode}",
        # The service's defaults refuse this scenario: 60 POSTs a minute per token, 200 queued trials per token
        # (A's 200 trials, then its study, is 201). A team posting its backlog at once needs them raised.
        "CONVTUNE_SUBMIT_RATE_LIMIT": "100000/minute",
        "CONVTUNE_RATE_LIMIT": "100000/minute",
        "CONVTUNE_MAX_QUEUED_TRIALS_PER_TOKEN": "100000",
        # The MLflow server is the bench's (shared by both runs): the workers write artifacts into its store, as with the stack's own.
        "CONVTUNE_ARTIFACTS_DESTINATION": str(artifacts),
    }


# --- the scenario ----------------------------------------------------------------------------------


def submit_all(api_url: str, tokens: dict[str, str], sc: Scenario, mode: str) -> Submitted:
    """A's trials then its study; B's trial ``b_delay_s`` after A's first POST; C's study ``c_delay_s`` after B's."""
    import httpx

    out = Submitted()
    clients = {t: httpx.Client(base_url=api_url, timeout=60, headers={"Authorization": f"Bearer {tok}"}) for t, tok in tokens.items()}

    def post_trial(team: str, i: int) -> None:
        out.stamp(team)
        body = {**BASE, "name": f"{team}-trial-{i}"}
        answer = _post(clients[team], "/trials", body)
        if isinstance(answer, str) or answer.status_code != 202:
            out.refused.append(f"{team} trial {i}: {_why(answer)}")
            return
        with out.lock:
            out.trials[team].append(answer.json()["id"])
            out.first_accepted.setdefault(team, time.time())

    def post_study(team: str, n: int, parallelism: int) -> None:
        out.stamp(team)
        answer = _post(clients[team], "/studies", study_body(f"{team} study ({mode})", n, parallelism, seed=ord(team)))
        if isinstance(answer, str) or answer.status_code != 202:
            out.refused.append(f"{team} study: {_why(answer)}")
            return
        with out.lock:
            out.studies[team].append((answer.json()["id"], n))
            out.first_accepted.setdefault(team, time.time())

    def team_a() -> None:
        t = time.time()
        with ThreadPoolExecutor(POSTERS) as pool:
            list(pool.map(lambda i: post_trial("A", i), range(sc.a_trials)))
        post_study("A", sc.a_study, sc.a_parallelism)
        out.a_submit_span_s = time.time() - t

    def team_b(at: float) -> None:
        time.sleep(max(0.0, at - time.time()))
        for i in range(sc.b_trials):
            post_trial("B", i)

    def team_c(at: float) -> None:
        time.sleep(max(0.0, at - time.time()))
        post_study("C", sc.c_study, sc.c_parallelism)

    t0 = time.time()
    threads = [threading.Thread(target=team_a), threading.Thread(target=team_b, args=(t0 + sc.b_delay_s,)),
               threading.Thread(target=team_c, args=(t0 + sc.b_delay_s + sc.c_delay_s,))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for c in clients.values():
        c.close()
    return out


def warm_up(stack: Any, token: str, mlflow_url: str) -> int:
    """Train trials (two at a time) until every worker has ended one: the first trial of a worker process pays
    once-per-process costs (the architecture's export: seconds against a trial's fraction of one) that a
    long-lived stack has paid; left in, they would stand in front of B's trial."""
    import httpx
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_url)
    ran = 0
    with httpx.Client(base_url=stack.api_url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as api:
        for _ in range(5):
            ran += 2
            ids = [api.post("/trials", json={**BASE, "name": "warm-up"}).raise_for_status().json()["id"] for _ in range(2)]
            wait_until(lambda ids=ids: all(client.get_run(i).info.status in TERMINAL for i in ids), 120, 0.5)
            if all(" succeeded in " in p.read_text(errors="replace") for p in stack.worker_logs()):
                return ran
    note("warning: not every worker ran a warm-up trial")
    return ran


def task_spans(stack: Any, sub: Submitted) -> dict[str, list[tuple[float, float]]]:
    """team -> (start, end) of every task its work ran on a worker, from the workers' logs (a study's steps and
    report included, which its trials' MLflow runs leave out)."""
    owner = {i: team for team, ids in sub.trials.items() for i in ids}
    studies = {s: team for team, ss in sub.studies.items() for s, _ in ss}
    spans: dict[str, list[tuple[float, float]]] = {t: [] for t in TEAMS}
    for path in stack.worker_logs():
        for line in path.read_text(errors="replace").splitlines():
            if '"runtime"' not in line:
                continue
            try:
                record = json.loads(line)
                task_id, runtime = record["data"]["id"], float(record["data"]["runtime"])
                end = datetime.strptime(record["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the workers' local time, as this host's
            except (ValueError, KeyError, TypeError):
                continue
            team = owner.get(task_id) or studies.get(task_id.rsplit("-", 1)[0])
            if team:
                spans[team].append((end - runtime, end))
    return spans


def _post(client: Any, path: str, body: dict[str, Any]) -> Any:
    """The answer, or the transport error's text (counted as a refusal, never a dead submitting thread)."""
    import httpx

    try:
        return client.post(path, json=body)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


def _why(answer: Any) -> str:
    return answer[:200] if isinstance(answer, str) else f"HTTP {answer.status_code} {answer.text[:200]}"


def experiments(client: Any, mode: str) -> dict[str, str]:
    """team -> its experiment's id in this run (the API creates a team's experiment at its first submit)."""
    found = {}
    for team in TEAMS:
        exp = client.get_experiment_by_name(f"bench-fair-share-{mode}/{team}")
        if exp is not None:
            found[team] = exp.experiment_id
    return found


def all_runs(client: Any, exp_ids: dict[str, str]) -> dict[str, list[Any]]:
    """team -> every run in its experiment."""
    runs: dict[str, list[Any]] = {}
    for team, exp_id in exp_ids.items():
        got, token = [], None
        while True:
            page = client.search_runs([exp_id], max_results=5000, page_token=token)
            got += list(page)
            token = page.token
            if not token:
                break
        runs[team] = got
    return runs


def expected_runs(sub: Submitted) -> int:
    return sum(len(ids) for ids in sub.trials.values()) + sum(1 + n for studies in sub.studies.values() for _, n in studies)


def wait_ended(client: Any, mode: str, sub: Submitted, timeout_s: float, stack: Any) -> tuple[dict[str, list[Any]], bool]:
    """Wait until MLflow shows every expected run ended (or ``timeout_s``, or the stack stopped); the runs by team, and whether all ended.

    Polled cheaply (one open run asked for per team, every 2 s): the MLflow server is the one the
    workers write to, and reading every run each second would take its time from them. A study's
    parent stays open until its report, and a trial is created at its accept, so no open run
    left means nothing is left to run; then every run is read once.
    """
    deadline, expected, last_note = time.time() + timeout_s, expected_runs(sub), time.time()
    while True:
        exp_ids = experiments(client, mode)
        still_open = len(exp_ids) < len(TEAMS) or any(
            client.search_runs([e], filter_string=f"attributes.status = '{status}'", max_results=1)
            for e in exp_ids.values() for status in ("RUNNING", "SCHEDULED")
        )
        stopped = stack.popen.poll() is not None
        if not still_open or time.time() > deadline or stopped:
            runs = all_runs(client, exp_ids)
            flat = [r for rs in runs.values() for r in rs]
            ended = sum(1 for r in flat if r.info.status in TERMINAL)
            if len(flat) >= expected and ended == len(flat):
                return runs, True
            if time.time() > deadline or stopped:
                why = "the stack stopped" if stopped else f"timed out after {timeout_s:.0f}s"
                note(f"{mode}: {why}: {ended}/{len(flat)} runs ended, {expected} expected ({stack.home / 'up.log'})")
                return runs, False
        if time.time() - last_note > 15:
            note(f"{mode}: runs still open")
            last_note = time.time()
        time.sleep(2.0)


# --- reading it back -------------------------------------------------------------------------------


def _started(run: Any) -> float | None:
    iso = run.data.tags.get("convtune.started_at")
    return datetime.fromisoformat(iso).timestamp() if iso else None


def check_records(runs: dict[str, list[Any]], sub: Submitted, all_ended: bool) -> list[str]:
    """What is wrong with the run's MLflow records (empty: every run present, tagged with its team, ended)."""
    problems = [] if all_ended else ["not every run ended before the timeout"]
    problems += [f"refused: {r}" for r in sub.refused]
    for team in TEAMS:
        team_runs = runs.get(team, [])
        if not team_runs:
            problems.append(f"team {team}: no experiment or no runs in MLflow")
            continue
        by_id = {r.info.run_id: r for r in team_runs}
        missing = [i for i in sub.trials[team] if i not in by_id]
        if missing:
            problems.append(f"team {team}: {len(missing)} submitted trials not in its experiment")
        for study_id, n in sub.studies[team]:
            children = [r for r in team_runs if r.data.tags.get("mlflow.parentRunId") == study_id]
            if study_id not in by_id or len(children) != n:
                problems.append(f"team {team}: study {study_id}: parent {'present' if study_id in by_id else 'missing'}, {len(children)}/{n} trials")
        wrong = [r.info.run_id for r in team_runs if r.data.tags.get("convtune.team") != team]
        if wrong:
            problems.append(f"team {team}: {len(wrong)} runs without convtune.team={team}")
        open_runs = [r.info.run_id for r in team_runs if r.info.status not in TERMINAL or not r.info.end_time]
        if open_runs:
            problems.append(f"team {team}: {len(open_runs)} runs not ended")
        unstarted = [r.info.run_id for r in team_runs if r.info.run_id not in {s for s, _ in sub.studies[team]} and _started(r) is None]
        if unstarted:
            problems.append(f"team {team}: {len(unstarted)} trials never started (no convtune.started_at)")
    return problems


def analyse(runs: dict[str, list[Any]], sub: Submitted, weights: dict[str, float], tasks: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """Waits, the window in which every team with work waits, each team's share in it (by its trials' MLflow
    runs; by its tasks in the workers' logs beside it), the total wall."""
    parents = {s for studies in sub.studies.values() for s, _ in studies}
    # A trial occupies a worker from its start to its end.
    spans = {team: [(s, r.info.end_time / 1000) for r in rs if r.info.run_id not in parents and (s := _started(r)) is not None and r.info.end_time]
             for team, rs in runs.items()}
    durations = [e - s for ss in spans.values() for s, e in ss]
    median_s = statistics.median(durations) if durations else float("nan")
    teams: dict[str, Any] = {}
    for team in TEAMS:
        ss, submit = spans.get(team, []), sub.first_submit.get(team)
        if not ss or submit is None:
            teams[team] = {"trials": 0}
            continue
        first_start = min(s for s, _ in ss)
        teams[team] = {
            "weight": weights[team], "trials": len(ss), "submit": submit, "first_start": first_start, "last_start": max(s for s, _ in ss),
            "last_end": max(e for _, e in ss), "wait_s": first_start - submit, "accept_s": sub.first_accepted.get(team, float("nan")) - submit,
            "queued_s": first_start - sub.first_accepted.get(team, float("nan")), "wait_in_trial_durations": (first_start - submit) / median_s,
            "queued_in_trial_durations": (first_start - sub.first_accepted.get(team, float("nan"))) / median_s,
            "worker_s": sum(e - s for s, e in ss),
        }
    present = [t for t in TEAMS if teams[t].get("trials")]
    t_begin = min(teams[t]["submit"] for t in present)
    # The window opens when the last team's work is accepted (in a queue: nothing can serve it before).
    t0 = max(sub.first_accepted.get(t, teams[t]["submit"]) for t in present)
    waiting = [t for t in present if teams[t]["last_start"] > t0]
    t1 = min((teams[t]["last_start"] for t in waiting), default=t0)
    inside = {t: sum(max(0.0, min(e, t1) - max(s, t0)) for s, e in spans.get(t, [])) for t in TEAMS}
    busy = sum(inside.values())
    inside_tasks = {t: sum(max(0.0, min(e, t1) - max(s, t0)) for s, e in tasks.get(t, [])) for t in TEAMS}
    busy_tasks = sum(inside_tasks.values())
    weight_sum = sum(weights[t] for t in waiting)
    for team in TEAMS:
        if team in waiting and busy > 0:
            share, fair = inside[team] / busy, weights[team] / weight_sum
            teams[team].update(in_window=True, share=share, weight_share=fair, share_vs_weight=share / fair)
            if busy_tasks > 0:
                teams[team]["task_share"] = inside_tasks[team] / busy_tasks
                teams[team]["task_share_vs_weight"] = teams[team]["task_share"] / fair
        else:
            teams[team]["in_window"] = False
    all_ends = [r.info.end_time / 1000 for rs in runs.values() for r in rs if r.info.end_time]
    wall = max(all_ends) - t_begin if all_ends else float("nan")
    task_s = sum(e - s for spans_ in tasks.values() for s, e in spans_)
    for team in TEAMS:  # times relative to the first submit, for reading
        for key in ("submit", "first_start", "last_start", "last_end"):
            if key in teams[team]:
                teams[team][key] = teams[team][key] - t_begin
    return {
        "median_trial_s": median_s, "trials": len(durations), "window": {"t0_s": t0 - t_begin, "t1_s": t1 - t_begin, "length_s": t1 - t0,
        "teams": waiting, "worker_s_inside": busy, "trials_per_worker_inside": busy / median_s / WORKERS if median_s else None},
        "total_wall_s": wall, "a_submit_span_s": sub.a_submit_span_s, "teams": teams,
        # The workers' task time over (workers x the wall): less machine-speed noise than the wall itself.
        "busy_fraction": task_s / (WORKERS * wall) if wall > 0 else None,
    }


# --- main ------------------------------------------------------------------------------------------


def run_mode(mode: str, redis_url: str, mlflow_url: str, mlflow_home: Path, tokens: dict[str, str], tokens_env: str,
             weights: dict[str, float], sc: Scenario, records: list[list[Any]]) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    port = int(mlflow_url.rsplit(":", 1)[1])
    env = stack_env(mode, tokens_env, weights, mlflow_home / "artifacts")
    with convtune_up(redis_url, WORKERS, env, mlflow_port=port, wait_workers=True) as stack:
        if stack.popen.poll() is not None or not all(" ready." in p.read_text(errors="replace") for p in stack.worker_logs()):
            raise RuntimeError(f"the stack's workers are not ready (logs in {stack.home / 'logs'})")
        warmed = warm_up(stack, tokens[WARM_UP_TEAM], mlflow_url)
        note(f"{mode}: {warmed} warm-up trials ran")
        note(f"{mode}: submitting (A {sc.a_trials} trials + a {sc.a_study}-trial study, B {sc.b_trials} trial after {sc.b_delay_s:g}s, "
             f"C a {sc.c_study}-trial study {sc.c_delay_s:g}s later)")
        sub = submit_all(stack.api_url, {t: tokens[t] for t in TEAMS}, sc, mode)
        note(f"{mode}: A's submits took {sub.a_submit_span_s:.1f}s; refused: {len(sub.refused)}" + (f" (first: {sub.refused[0]})" if sub.refused else ""))
        client = MlflowClient(mlflow_url)
        runs, ended = wait_ended(client, mode, sub, sc.timeout_s, stack)
        tasks = task_spans(stack, sub)
    problems = check_records(runs, sub, ended)
    for p in problems:
        note(f"{mode}: records: {p}")
    result = analyse(runs, sub, weights, tasks) if any(runs.values()) else {}
    origin = min(sub.first_submit.values(), default=0.0)
    for team, rs in runs.items():
        for r in rs:
            accepted = r.data.tags.get("convtune.accepted_at")
            started = _started(r)
            records.append([
                mode, team, r.info.run_id, r.data.tags.get("mlflow.parentRunId", ""), r.info.status,
                round(datetime.fromisoformat(accepted).timestamp() - origin, 3) if accepted else "",
                round(started - origin, 3) if started else "", round(r.info.end_time / 1000 - origin, 3) if r.info.end_time else "",
            ])
    result["record_problems"] = problems
    w = result.get("window", {})
    note(f"{mode}: {result.get('trials', 0)} trials, median {result.get('median_trial_s', float('nan')):.2f}s, total wall "
         f"{result.get('total_wall_s', float('nan')):.1f}s; window {w.get('t0_s', 0):.1f}-{w.get('t1_s', 0):.1f}s over {w.get('teams')}")
    return result


def _get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A 40 trials + an 8-trial study, B 1 trial, C a 4-trial study, delays 2 s and 4 s")
    parser.add_argument("--weights", default="", help="TEAM=WEIGHT,... for teams A, B, C (unnamed: 1), e.g. A=2")
    parser.add_argument("--modes", default="fair,fifo", help="which runs: fair, fifo or both (comma-separated)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, the order alternating (fair first, then fifo first); targets on medians")
    parser.add_argument("--share-from", choices=("mlflow", "tasks"), default="tasks",
                        help="which worker-seconds the share targets judge: the trials' MLflow runs, or the workers' task times (their logs)")
    parser.add_argument("--json", action="store_true", help="no table: only the JSON line")
    parser.add_argument("--runs-csv", type=Path, default=None, help="also write every run's times (s from the run's first submit) to this CSV file")
    args = parser.parse_args()
    sc = QUICK if args.quick else FULL
    weights = parse_weights(args.weights)
    modes = [m for m in ("fair", "fifo") if m in args.modes.split(",")]
    tokens, tokens_env = make_tokens()
    note(f"weights {weights}; runs: {', '.join(modes)} x {args.repeats}")

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    records: list[list[Any]] = []
    mlflow_home = Path(tempfile.mkdtemp(prefix="convtune-bench-fair-share-"))
    with private_redis() as redis_url, mlflow_server(mlflow_home) as mlflow_url:
        db = 0
        for repeat in range(args.repeats):
            for mode in modes if repeat % 2 == 0 else modes[::-1]:
                db += 1  # a Redis database per run: no message, heartbeat or share state of one reaches another
                label = mode if args.repeats == 1 else f"{mode}-{repeat + 1}"
                try:
                    result = run_mode(label, f"{redis_url.rsplit('/', 1)[0]}/{db}", mlflow_url, mlflow_home, tokens, tokens_env, weights, sc, records)
                except Exception as exc:  # noqa: BLE001 - a run that fails is reported; the others still run
                    result = {"unavailable": f"{type(exc).__name__}: {str(exc)[:300]}", "record_problems": ["the run failed"]}
                    note(f"{label}: failed: {result['unavailable']}")
                results[mode].append({"label": label, **result})

    if args.runs_csv:
        import csv

        with open(args.runs_csv, "w", newline="") as out:
            csv.writer(out).writerows([["run", "team", "run_id", "parent", "status", "accepted_s", "started_s", "ended_s"], *records])
        note(f"wrote {len(records)} runs to {args.runs_csv}")
    if not args.json:
        show(results, weights)
    targets = judge(results, modes, args.share_from)
    figures = {"scenario": sc.__dict__, "weights": weights, "workers": WORKERS, "repeats": args.repeats, "share_from": args.share_from, **results}
    if args.json:
        _quiet_emit(figures, targets)
    else:
        emit("fair_share", figures, targets)


def judge(results: dict[str, list[dict[str, Any]]], modes: list[str], share_from: str = "mlflow") -> dict[str, Target]:
    """The targets, on the fair runs (medians over repeats); the wall against the fifo run of the same repeat."""
    fair = [r for r in results.get("fair", []) if r.get("teams")]
    fifo = results.get("fifo", [])
    targets: dict[str, Target] = {}
    if fair:
        targets["b_queued_in_trial_durations"] = Target(median([_get(r, "teams", "B", "queued_in_trial_durations") for r in fair]), "<=", 1.0)
        window = sorted({t for r in fair for t in r["window"]["teams"]})
        if len(window) < 2:
            targets["share_vs_weight"] = Target(None, "<=", 0.10)  # fewer than two teams waited together: nothing to share
        for team in window:
            key = "share_vs_weight" if share_from == "mlflow" else "task_share_vs_weight"
            ratios = [r["teams"][team][key] for r in fair if key in r["teams"][team]]
            targets[f"share_vs_weight_{team}"] = Target(median([abs(x - 1) for x in ratios]), "<=", 0.10)
    pairs = [a["total_wall_s"] / b["total_wall_s"] for a, b in zip(results.get("fair", []), fifo) if a.get("total_wall_s") and b.get("total_wall_s")]
    if pairs:
        targets["wall_vs_fifo"] = Target(median(pairs), "<=", 1.05)
    complete = bool(modes) and all(not r.get("record_problems") for m in modes for r in results[m])
    targets["records_complete"] = Target(1.0 if complete else 0.0, ">=", 1)
    return targets


def _quiet_emit(figures: dict[str, Any], targets: dict[str, Target]) -> None:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as buffer:
        emit("fair_share", figures, targets)
    print(buffer.getvalue().splitlines()[-1], flush=True)


def show(results: dict[str, list[dict[str, Any]]], weights: dict[str, float]) -> None:
    runs = [r for rs in results.values() for r in rs]
    rows = []
    for r in runs:
        label = r["label"]
        if "teams" not in r:
            rows.append([label, "-", "-", 0, "-", "-", "-", "-", "-", "-", "-", "-", "-", (r.get("unavailable") or "; ".join(r["record_problems"]))[:60]])
            continue
        for team in TEAMS:
            t = r["teams"].get(team, {})
            if not t.get("trials"):
                rows.append([label, team, weights[team], 0, "-", "-", "-", "-", "-", "-", "-", "-", "-", "no trials"])
                continue
            window = t["in_window"]
            rows.append([
                label, team, weights[team], t["trials"], round(t["submit"], 1), round(t["accept_s"], 2), round(t["queued_s"], 2), round(t["wait_s"], 2),
                round(t["wait_in_trial_durations"], 2), _pct(t.get("share")) if window else "outside", _pct(t.get("task_share")) if window else "-",
                _pct(t.get("weight_share")) if window else "-", round(t["worker_s"], 1), round(t["last_end"], 1),
            ])
    print_table(
        "Per team (times in s from the run's first submit). accept: submit -> its first 202; queued: that 202 -> its first trial's start; "
        "wait: submit -> first trial's start. Share: its trials' worker-seconds inside the window / every trial's (MLflow runs); "
        "by tasks: the same from the workers' task times (their logs: a study's steps and report included)",
        ["run", "team", "weight", "trials", "submit s", "accept s", "queued s", "wait s", "wait / median trial", "share in window", "share by tasks",
         "weight share", "worker-s", "last end s"],
        rows,
    )
    rows = []
    for r in runs:
        if "teams" not in r:
            continue
        w = r["window"]
        rows.append([r["label"], r["trials"], round(r["median_trial_s"], 3), round(r["a_submit_span_s"], 1), f"{w['t0_s']:.1f} -> {w['t1_s']:.1f}",
                     round(w["length_s"], 1), ", ".join(w["teams"]) or "-", round(r["total_wall_s"], 1), _pct(r.get("busy_fraction")),
                     "ok" if not r["record_problems"] else "; ".join(r["record_problems"])[:80]])
    print_table(
        "Per run. Window: opens when the last team's first work is accepted, among the teams with a trial not yet started then; "
        "closes when the first of them has started its last trial. Busy: the workers' task time / (2 workers x total wall)",
        ["run", "trials", "median trial s", "A submits s", "window s", "window length s", "teams in window", "total wall s", "busy", "MLflow records"],
        rows,
    )
    for fair, fifo in zip(results.get("fair", []), results.get("fifo", [])):
        if fair.get("total_wall_s") and fifo.get("total_wall_s"):
            print(f"total wall, {fair['label']} / {fifo['label']}: {fair['total_wall_s'] / fifo['total_wall_s']:.3f}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


if __name__ == "__main__":
    main()
