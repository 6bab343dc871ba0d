"""The GPU measurements of bench/gpu.sh: matmul peaks, training throughput per setting, small trials sharing a GPU.

1. peaks      fp32 (TF32 off), TF32 and bf16 ``torch.mm`` of a large square, best of several
2. throughput samples/s of convtune's network (``models.nets.build_model``) on the 32x32 ``shapes``
              set, tensors on the device, at several batch sizes, in each setting:
                fp32            plain
                tf32            TF32 matmuls and convolutions allowed
                bf16            autocast to bfloat16
                bf16 + cl       the same, model and data channels_last
                bf16 + cl + compile   the same, ``torch.compile``d (first batch sizes only: compiling costs)
              and the achieved TFLOP/s (samples/s x 3 x the plan's forward FLOPs) against the bf16 peak
3. sharing    trials/min of the small-trial workload (one-epoch ``digits`` trials through
              ``workers.training.train.run_trial``, nothing logged) with 1, 2, 4, 8 processes
              training at once on the one GPU

Sections stop starting new measurements past their share of --budget-s, so the whole run fits its
slot; the sharing processes each warm up first and start together. ``--cpu`` runs everything with tiny sizes on the CPU (a check that the script works). Prints
the tables and, as its last line, the JSON object every benchmark prints.

    python bench/gpu_bench.py [--cpu] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Target, emit, note, print_table  # noqa: E402

START = time.monotonic()


def over(budget_s: float) -> bool:
    return time.monotonic() - START > budget_s


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: Any, dtype: Any, n: int, tf32: bool = False, repeats: int = 10) -> float:
    """TFLOP/s of an n x n matmul in ``dtype``, best of ``repeats`` after a warm-up."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 5)
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * n**3 / best / 1e12


SETTINGS = ("fp32", "tf32", "bf16", "bf16 + cl", "bf16 + cl + compile")


def throughput(device: Any, setting: str, batch: int, model_spec: dict[str, Any], data: Any, steps: int) -> float:
    """Training samples/s of one setting and batch size (after warm-up steps)."""
    import torch
    import torch.nn.functional as F

    from models.nets import build_model
    from models.spec.trial import ConvNetSpec

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setting == "tf32"
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(ConvNetSpec.model_validate(model_spec), data.info).to(device)
    x, y = data.x, data.y
    if "cl" in setting.split(" + "):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step_model = torch.compile(model) if setting.endswith("compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting.startswith("bf16"))
    n = len(x)

    def step(i: int) -> None:
        idx = torch.randint(0, n, (batch,), device=device)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(step_model(x[idx]), y[idx])
        loss.backward()
        opt.step()

    for i in range(3 if not setting.endswith("compile") else 5):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return steps * batch / (time.perf_counter() - t0)


class _Data:
    def __init__(self, x: Any, y: Any, info: Any):
        self.x, self.y, self.info = x, y, info


def shapes_on(device: Any, num_samples: int) -> _Data:
    import torch

    from models.data.sets import load
    from models.spec.trial import DataSpec

    data = load(DataSpec(name="shapes", image_size=32, num_samples=num_samples), None)
    return _Data(torch.from_numpy(data.x_train).to(device), torch.from_numpy(data.y_train).to(device), data.info)


# --- trials sharing the device ---------------------------------------------------------------------

TRIAL = {"model": {"channels": [32, 64], "convs_per_stage": 2, "norm": "none"}, "optim": {"epochs": 1, "batch_size": 32, "lr": 1e-3}, "data": {"name": "digits"},
         "divergence": {"enabled": False}}


def share_worker(trials: int, device_name: str) -> None:
    """One process of the sharing test: warm up, say "ready", wait for "go" on stdin, train ``trials`` one-epoch trials; prints its times."""
    import torch

    from models.spec.trial import TrialSpec
    from workers.training.train import TrainingContext, run_trial

    class Null:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    if device_name == "cpu":
        torch.set_num_threads(1)
    device = torch.device(device_name)
    spec = TrialSpec.model_validate(TRIAL)
    run_trial(spec, Null(), TrainingContext(device=device))  # warm: CUDA context, kernels, first optimizer
    sync(device)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    for i in range(trials):
        run_trial(spec.model_copy(update={"seed": i}), Null(), TrainingContext(device=device))
    sync(device)
    print(json.dumps({"start": t0, "end": time.time()}), flush=True)


def sharing(device_name: str, processes: int, trials: int) -> float:
    """Trials/min of ``processes`` processes each training ``trials`` one-epoch trials at once on the device."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--share-worker", str(trials), "--device", device_name]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    try:
        for p in procs:  # every process imported and warmed up: then all start together
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a sharing process exited before it was ready ({p.wait()})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    return 60 * processes * trials / span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing of a GPU")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new measurement after this many seconds (360; --cpu 90)")
    parser.add_argument("--share-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.share_worker is not None:
        share_worker(args.share_worker, args.device)
        return

    import torch

    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --cpu to check the script")
    if args.cpu:
        torch.set_num_threads(1)
    budget = args.budget_s or (90 if args.cpu else 360)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    note(f"device {name}, torch {torch.__version__}")
    cpu = args.cpu
    figures: dict[str, Any] = {"device": name, "torch": torch.__version__}

    # 1. peaks
    n = 512 if cpu else 8192
    peaks = {"fp32": matmul_peak(device, torch.float32, n)}
    if not cpu:
        peaks["tf32"] = matmul_peak(device, torch.float32, n, tf32=True)
    peaks["bf16"] = matmul_peak(device, torch.bfloat16, n)
    figures["matmul_peak_tflops"] = peaks
    print_table(f"matmul peak, {n}x{n} (best of 10)", ["dtype", "TFLOP/s"], [[k, round(v, 3)] for k, v in peaks.items()])

    # 2. throughput of the 32x32 set
    from models.spec.plan import plan_network
    from models.spec.trial import ConvNetSpec

    models = {"convtune default [32, 64]": {"channels": [32, 64]}}
    if not cpu:
        models["wider [64, 128, 256]"] = {"channels": [64, 128, 256]}
    batches = (32,) if cpu else (128, 512, 2048, 8192)
    compiled_batches = batches[:1] if cpu else (512, 2048)
    data = shapes_on(device, 256 if cpu else 16384)
    rows, best = [], {}
    for label, model_spec in models.items():
        flops = 3 * plan_network(ConvNetSpec.model_validate(model_spec), data.info).flops
        for batch in batches:
            row: list[Any] = [label, batch]
            for setting in SETTINGS:
                skipped = setting == "tf32" and cpu or (setting.endswith("compile") and batch not in compiled_batches)
                if skipped or (over(budget * 0.6) and best):  # past its share of the budget once something is measured
                    row.append(float("nan"))
                    continue
                try:
                    rate = throughput(device, setting, batch, model_spec, data, steps=3 if cpu else 30)
                except Exception as exc:  # noqa: BLE001 - a setting that fails here is reported, the rest goes on
                    note(f"{label} b{batch} {setting}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                    rate = float("nan")
                row.append(round(rate))
                figures.setdefault("throughput", {}).setdefault(label, {}).setdefault(str(batch), {})[setting] = rate
                if rate == rate and rate * flops > best.get(label, (0, "", 0))[0] * flops:
                    best[label] = (rate, f"{setting} b{batch}", rate * flops / 1e12)
            rows.append(row)
        note(f"throughput of {label} done")
    print_table(f"training samples/s, 32x32x3 shapes, {name}", ["model", "batch", *SETTINGS], rows)
    print_table(
        f"best achieved TFLOP/s (3 x forward FLOPs a sample) against the bf16 matmul peak {peaks['bf16']:.2f} TFLOP/s",
        ["model", "best setting", "samples/s", "TFLOP/s", "of bf16 peak"],
        [[label, s, round(r), round(t, 3), f"{100 * t / peaks['bf16']:.1f} %"] for label, (r, s, t) in best.items()],
    )
    figures["best"] = {label: {"setting": s, "samples_per_s": r, "tflops": t, "fraction_of_bf16_peak": t / peaks["bf16"]} for label, (r, s, t) in best.items()}

    # 3. small trials sharing the device
    share_rows, rates = [], {}
    for processes in (1, 2) if cpu else (1, 2, 4, 8):
        if over(budget * 0.9) and rates:
            break
        rates[processes] = sharing(device.type, processes, trials=1 if cpu else 10)
        share_rows.append([processes, round(rates[processes], 1), round(rates[processes] / rates[1], 2)])
        note(f"{processes} process(es) sharing: {rates[processes]:.1f} trials/min")
    print_table("one-epoch digits trials (run_trial, nothing logged) sharing the device", ["processes", "trials/min", "vs 1 process"], share_rows)
    figures["sharing_trials_per_min"] = {str(k): v for k, v in rates.items()}
    figures["elapsed_s"] = time.monotonic() - START
    best_sharing = max(rates.values()) / rates[1] if rates else float("nan")
    emit("gpu", figures, {"finished_within_480_s": Target(time.monotonic() - START, "<=", 480), "sharing_speedup_best": Target(best_sharing, ">=", 1.0)})


if __name__ == "__main__":
    main()
