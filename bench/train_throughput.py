"""Is convtune's training loop as fast as a minimal hand-written one? Samples/s, and GFLOP/s against the machine's peak.

For each data set (``digits`` 8x8x1, the procedural ``shapes`` 32x32x3) and batch size (32, 256),
in this process, with the same torch threads for both:

  convtune    ``workers.training.train.run_trial`` with a tracker that records nothing but the time
              of each ``log_epoch`` call: an epoch is the interval between two of them (train pass,
              evaluation, the loop's checks; no checkpoint path, so none written)
  hand loop   the same network (``models.nets.build_model``), the same tensors (``models.data.load``),
              AdamW; per epoch a shuffled index, zero_grad / forward / cross-entropy / backward / step,
              then one evaluation pass over the validation split

Each round runs one of each (hand first in even rounds, convtune first in odd ones), --epochs epochs,
the first a warm-up not counted;
a round's ratio is convtune's median epoch against the hand loop's, and the figure is the median of
the rounds' ratios, so drift on a shared machine hits both sides of each ratio. Times are taken
two ways: wall (perf_counter) and this process's CPU time (process_time), which other processes'
load does not inflate; the target uses the CPU-time ratio when --threads is 1 (then both are the
same work on one core), the wall ratio otherwise. Achieved GFLOP/s = samples/s x 3 x the forward
FLOPs a sample (``models.spec.plan.plan_network``; backward ~ 2x forward; plus the evaluation's forward
passes), by the same time as the ratio, against the fp32 peak of a
large ``torch.mm`` measured here with the same threads. Target: convtune >= 0.97x the hand loop in
every configuration.

    python bench/train_throughput.py [--quick] [--threads 1] [--rounds 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Target, emit, median, note, print_table  # noqa: E402

MODEL = {"channels": [32, 64]}  # convtune's default network: 2 stages of 2 conv + batch norm + ReLU, max pool between


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matmul, best of ``repeats`` (after a warm-up)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class EpochRecorder:
    """A tracker that keeps the wall and CPU time of each ``log_epoch`` call and records nothing else."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def log_epoch(self, epoch: int, metrics: dict[str, float], at_ms: int | None = None, after: Any = None) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def trial_spec(data: dict[str, Any], batch_size: int, epochs: int) -> Any:
    from models.spec.trial import TrialSpec

    # The product's defaults (divergence checks on: they are part of the loop's cost); lr 1e-3 does not diverge here.
    return TrialSpec.model_validate({"model": MODEL, "optim": {"lr": 1e-3, "batch_size": batch_size, "epochs": epochs}, "data": data})


def intervals(stamps: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(wall, cpu) seconds of each epoch after the first, from the stamps at each epoch's end."""
    return ([b[0] - a[0] for a, b in zip(stamps, stamps[1:])], [b[1] - a[1] for a, b in zip(stamps, stamps[1:])])


def convtune_epochs(spec: Any) -> tuple[list[float], list[float]]:
    import torch

    from workers.training.train import TrainingContext, run_trial

    recorder = EpochRecorder()
    run_trial(spec, recorder, TrainingContext(device=torch.device("cpu")))
    return intervals(recorder.stamps)


def hand_epochs(spec: Any) -> tuple[list[float], list[float]]:
    import torch
    import torch.nn.functional as F

    from models.data.sets import load
    from models.nets import build_model

    data = load(spec.data, None)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_val, y_val = torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.info)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.optim.lr)
    b = spec.optim.batch_size
    stamps = []
    for _ in range(spec.optim.epochs):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(order), b):
            idx = order[start : start + b]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            float(F.cross_entropy(logits, y_val)), float((logits.argmax(1) == y_val).float().mean())
        stamps.append((time.perf_counter(), time.process_time()))
    return intervals(stamps)


def split_sizes(data: dict[str, Any]) -> tuple[int, int]:
    from models.data.sets import load
    from models.spec.trial import DataSpec

    loaded = load(DataSpec.model_validate(data), None)
    return len(loaded.y_train), len(loaded.y_val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 epochs, 512 shapes images")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both loops (1: a worker's share of 2 cores)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per configuration, each a hand and a convtune run, the first alternating (4; --quick 2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run, the first not counted (4; --quick 3)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 4)
    epochs = args.epochs or (3 if args.quick else 4)

    import torch

    from models.spec.plan import builtin_input, plan_network
    from models.spec.trial import DataSpec

    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    note(f"fp32 matmul peak with {args.threads} thread(s): {peak:.1f} GFLOP/s")
    datasets = {"digits 8x8x1": {"name": "digits"}, "shapes 32x32x3": {"name": "shapes", "image_size": 32, "num_samples": 512 if args.quick else 2000}}
    rows, figures, ratios = [], {"threads": args.threads, "matmul_peak_gflops": peak, "configs": {}}, []
    for label, data in datasets.items():
        for batch in (32, 256):
            spec = trial_spec(data, batch, epochs)
            flops = 3 * plan_network(spec.model, builtin_input(DataSpec.model_validate(data))).flops
            n_train, n_val = split_sizes(data)
            epoch_flops = flops * n_train + flops // 3 * n_val  # train: forward + backward; evaluation: forward
            measure = 1 if args.threads == 1 else 0  # index into (wall, cpu)
            per_round = []  # (hand wall, hand cpu, convtune wall, convtune cpu): median seconds per epoch
            for r in range(rounds):
                if r % 2 == 0:  # which goes first alternates: neither always finds the caches and allocator as the other left them
                    h_wall, h_cpu = hand_epochs(spec)
                    c_wall, c_cpu = convtune_epochs(spec)
                else:
                    c_wall, c_cpu = convtune_epochs(spec)
                    h_wall, h_cpu = hand_epochs(spec)
                per_round.append((median(h_wall), median(h_cpu), median(c_wall), median(c_cpu)))
            round_ratios = [r[measure] / r[2 + measure] for r in per_round]  # the hand loop's seconds over convtune's = convtune's rate over the hand loop's
            ratio = median(round_ratios)
            h, c = (n_train / median([r[i] for r in per_round]) for i in (0, 2))
            c_measured = epoch_flops / median([r[2 + measure] for r in per_round]) / 1e9
            ratios.append(ratio)
            note(f"{label} batch {batch}: hand {h:,.0f}/s, convtune {c:,.0f}/s (wall); ratio {ratio:.3f} ({'CPU time' if measure else 'wall'}; rounds {[round(r, 3) for r in round_ratios]})")
            rows.append([label, batch, round(h), round(c), round(c / h, 3), round(ratio, 3), round(c_measured, 2), f"{100 * c_measured / peak:.0f} %"])
            figures["configs"][f"{data['name']} b{batch}"] = {
                "hand_samples_per_s": h, "convtune_samples_per_s": c, "wall_ratio": c / h, "ratio": ratio, "round_ratios": round_ratios,
                "ratio_measured_by": "cpu_time" if measure else "wall", "train_flops_per_sample": flops,
                "convtune_gflops": c_measured, "fraction_of_peak": c_measured / peak,
            }
    print_table(
        f"training throughput: training samples per second of epoch wall time (train pass + evaluation; median of {rounds} rounds x {epochs - 1} epochs), "
        f"{args.threads} thread(s)\nratio (target) and GFLOP/s by {'CPU time' if args.threads == 1 else 'wall time'}; fp32 matmul peak {peak:.1f} GFLOP/s",
        ["data", "batch", "hand loop", "convtune", "wall ratio", "ratio (target)", "convtune GFLOP/s", "of peak"], rows,
    )
    figures["min_ratio"] = min(ratios)
    emit("train_throughput", figures, {"convtune_vs_hand_loop_min": Target(min(ratios), ">=", 0.97)})


if __name__ == "__main__":
    main()
