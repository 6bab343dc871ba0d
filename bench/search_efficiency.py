"""What the search saves: epochs trained until a trial reaches 0.97 validation accuracy on digits, TPE + ASHA vs random.

Two searches over the same space, each run until some trial's validation accuracy reaches the target
after an epoch, or --max-trials (10-epoch trials of a small network: channels [16, 32], one conv a
stage). ``--space wide`` (the default): lr log-uniform 1e-5..1, optimizer sgd/adamw/rmsprop, batch
size 16..256, batch norm or none, activation relu/gelu/tanh/sigmoid, downsampling: most of it learns
slowly or not at all, as a first search does. ``--space narrow``: bench/study_pruning.py's space
(lr 1e-4..1e-1, adamw, batch norm), where nearly every configuration reaches 0.97 within 2-3 epochs,
so the first trial decides and both searches tie. Same seed for both searches (TPE's random
start-up trials are then the random search's first trials):

  tpe + asha   the TPE sampler (8 random start-up trials) and the successive-halving pruner
               (min_resource 1, reduction_factor 3), as a study spec asks for them
  random       the random sampler, no pruning

The studies run in this process, one trial at a time, through Optuna with convtune's own pieces:
the study spec (``models.spec.study.StudySpec``), its sampler and pruner
(``models.store.search.make_sampler`` / ``make_pruner``), its sampling (``suggest``,
``models.spec.space.apply_params``) and its training loop (``workers.training.train.run_trial``,
reporting the objective after each epoch and raising ``Pruned`` when the pruner says so; pruned and
diverged trials end PRUNED, as a worker's study step ends them). No stack, no MLflow: the count of
epochs does not depend on them, and the stack's own pruning run is bench/study_pruning.py.
Counted: epochs trained (each epoch a trial finished) up to and including the one that reached the
target. Median over seeds. Target: TPE + ASHA <= 0.35x random's epochs.

    python bench/search_efficiency.py [--quick] [--seeds 5] [--target 0.97] [--space wide|narrow]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Target, emit, median, note, print_table  # noqa: E402

SPACES = {
    # What a user searches who does not know the good region yet: most of it trains slowly or not at all.
    "wide": {
        "optim.lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
        "optim.optimizer": ["sgd", "adamw", "rmsprop"],
        "optim.batch_size": [16, 32, 64, 128, 256],
        "model.norm": ["batch", "none"],
        "model.activation": ["relu", "gelu", "tanh", "sigmoid"],
        "model.downsample": ["stride", "maxpool", "avgpool", "dilation"],
    },
    # bench/study_pruning.py's space (less the kernel size): nearly every configuration reaches 0.97 in a few epochs.
    "narrow": {
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "optim.batch_size": [16, 32, 64, 128],
        "model.downsample": ["stride", "maxpool", "avgpool", "dilation"],
        "model.activation": ["relu", "gelu", "silu", "tanh"],
    },
}
BASE_MODEL = {"channels": [16, 32], "convs_per_stage": 1}
SEARCHES = {
    "tpe + asha": {"sampler": {"name": "tpe", "n_startup_trials": 8}, "pruner": {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3}},
    "random, no pruning": {"sampler": {"name": "random"}, "pruner": {"name": "none"}},
}


class Reached(Exception):
    """A trial reached the target: the search ends."""


class _Null:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def search(kind: str, space: str, seed: int, epochs: int, target: float, max_trials: int) -> dict[str, Any]:
    """One search until a trial reaches ``target``; epochs trained, trials, outcomes, wall."""
    import optuna
    import torch

    from models.spec.space import apply_params
    from models.spec.study import StudySpec
    from models.store.search import make_pruner, make_sampler, suggest
    from workers.training.outcomes import Pruned, TrialStopped
    from workers.training.train import TrainingContext, run_trial

    spec = StudySpec.model_validate({
        "base": {"model": BASE_MODEL, "optim": {"epochs": epochs}, "data": {"name": "digits"}},
        "search_space": SPACES[space], "seed": seed, "n_trials": max_trials, "parallelism": 1, **SEARCHES[kind],
    })
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # models.store.search sets WARNING on import
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec, spec.seed), pruner=make_pruner(spec))
    counted = {"epochs": 0, "outcomes": {}}

    def objective(trial: optuna.Trial) -> float:
        trial_spec = apply_params(spec.base, suggest(trial, spec)).model_copy(update={"seed": trial.number})
        last: dict[str, float] = {}

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            counted["epochs"] += 1
            last.update(metrics)
            if metrics["val_accuracy"] >= target:
                counted["outcomes"]["reached"] = 1
                raise Reached(f"trial {trial.number} epoch {epoch}")
            trial.report(metrics["val_accuracy"], epoch)
            if trial.should_prune():
                raise Pruned(f"pruned after epoch {epoch}")

        try:
            run_trial(trial_spec, _Null(), TrainingContext(device=torch.device("cpu"), on_epoch_end=on_epoch_end))
        except TrialStopped as exc:  # pruned, diverged: the configuration is bad, the sampler learns it
            counted["outcomes"][exc.outcome] = counted["outcomes"].get(exc.outcome, 0) + 1
            raise optuna.TrialPruned(str(exc)) from None
        counted["outcomes"]["succeeded"] = counted["outcomes"].get("succeeded", 0) + 1
        return last["val_accuracy"]

    t0 = time.perf_counter()
    reached = None
    try:
        study.optimize(objective, n_trials=max_trials)
    except Reached as exc:
        reached = str(exc)
    return {"epochs": counted["epochs"], "trials": len(study.trials), "reached": reached, "outcomes": counted["outcomes"], "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds, at most 30 trials a search")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of each search (5; --quick 2)")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of a full trial")
    parser.add_argument("--max-trials", type=int, default=None, help="a search that has not reached the target by then counts its epochs so far (60; --quick 30)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--space", choices=sorted(SPACES), default="wide")
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 5)
    args.max_trials = args.max_trials or (30 if args.quick else 60)

    import optuna
    import torch

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in SEARCHES}
    for seed in range(seeds):
        for kind in SEARCHES:
            result = search(kind, args.space, seed, args.epochs, args.target, args.max_trials)
            runs[kind].append(result)
            note(f"seed {seed} {kind}: {result['epochs']} epochs, {result['trials']} trials, {result['outcomes']} ({result['wall_s']:.1f}s)")

    rows, figures = [], {"target_val_accuracy": args.target, "seeds": seeds, "epochs_per_trial": args.epochs, "mode": "in-process Optuna + run_trial", "space": args.space}
    for kind, results in runs.items():
        epochs = [r["epochs"] for r in results]
        unreached = sum(1 for r in results if r["reached"] is None)
        rows.append([kind, median(epochs), round(sum(epochs) / len(epochs), 1), " ".join(map(str, epochs)), median([r["trials"] for r in results]),
                     unreached, round(median([r["wall_s"] for r in results]), 1)])
        figures[kind] = {"median_epochs": median(epochs), "mean_epochs": sum(epochs) / len(epochs), "epochs_per_seed": epochs,
                         "trials_per_seed": [r["trials"] for r in results], "not_reached": unreached}
    print_table(
        f"epochs trained until a trial reaches val_accuracy >= {args.target} on digits ({args.space} space, {seeds} seeds, {args.epochs}-epoch trials, at most {args.max_trials} trials)",
        ["search", "median epochs", "mean epochs", "per seed", "median trials", "not reached", "median wall s"], rows,
    )
    ratio = figures["tpe + asha"]["median_epochs"] / max(figures["random, no pruning"]["median_epochs"], 1)
    mean_ratio = figures["tpe + asha"]["mean_epochs"] / max(figures["random, no pruning"]["mean_epochs"], 1)
    figures["ratio_median"], figures["ratio_mean"] = ratio, mean_ratio
    print(f"TPE + ASHA / random: {ratio:.2f}x epochs (median over seeds; mean: {mean_ratio:.2f}x)")
    emit("search_efficiency", figures, {"tpe_asha_vs_random_epochs": Target(ratio, "<=", 0.35)})


if __name__ == "__main__":
    main()
