"""The standalone script a user writes instead of submitting a trial (bench/trial_overhead.py's baseline).

Trains trial_overhead's spec by hand (digits with convtune's split sizes; two stages of two 3x3
conv + batch norm + ReLU blocks, 32 and 64 channels, a 2x2 max pool between them, global average
pool, a linear head: the same network and FLOPs as convtune's; AdamW, lr 3e-3, batch 32, 9 epochs)
and logs it to an MLflow server the way someone who knows MLflow does: params once, one batched
metrics call per epoch, the model with ``mlflow.pytorch.log_model`` (explicit pip requirements, an
input example), ended FINISHED; ``--threads`` as a user who shares the machine sets it. Run as a user runs it (``python standalone.py``): the harness times
the whole process, imports and exit included. Prints one JSON line with its own phases.

    python bench/peers/standalone.py --tracking-uri http://127.0.0.1:5000 [--epochs 9]
"""

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402

import mlflow  # noqa: E402
import mlflow.pytorch  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

T_IMPORTED = time.perf_counter()


def block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="bench-standalone")
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    x_train, x_val, y_train, y_val = train_test_split(x, d.target.astype(np.int64), test_size=359, stratify=d.target, random_state=0)
    mean, std = x_train.mean(), x_train.std()
    x_train, x_val = torch.from_numpy((x_train - mean) / std), torch.from_numpy((x_val - mean) / std)
    y_train, y_val = torch.from_numpy(y_train), torch.from_numpy(y_val)
    torch.manual_seed(0)
    model = nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    training = 0.0
    with mlflow.start_run(run_name="standalone digits"):
        mlflow.log_params({"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs, "channels": "32,64"})
        for epoch in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(len(x_train))
            total = 0.0
            for start in range(0, len(order), args.batch_size):
                idx = order[start : start + args.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            model.eval()
            with torch.no_grad():
                logits = model(x_val)
            val_loss, val_accuracy = F.cross_entropy(logits, y_val).item(), (logits.argmax(1) == y_val).float().mean().item()
            training += time.perf_counter() - t0
            mlflow.log_metrics({"train_loss": total / len(x_train), "val_loss": val_loss, "val_accuracy": val_accuracy}, step=epoch)
        t_log = time.perf_counter()
        example = x_val[:2].numpy()
        mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        model_s = time.perf_counter() - t_log
    print(json.dumps({
        "import_s": T_IMPORTED - T0, "training_s": training, "model_s": model_s, "in_script_s": time.perf_counter() - T0, "val_accuracy": val_accuracy,
    }), flush=True)


if __name__ == "__main__":
    main()
