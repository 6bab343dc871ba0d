"""The worker processes ``convtune worker`` and ``convtune up`` start: queues, concurrency, each one's share of the host."""

from __future__ import annotations

import pytest

from service.stack.supervisor import worker_commands


def _concurrency(argv: list[str]) -> int:
    return int(argv[argv.index("-c") + 1])


def test_cpu_workers_share_the_host_between_all_their_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVTUNE_HOST_TRAINING_PROCESSES", raising=False)
    commands = worker_commands(0, 2, trials_per_worker=3)
    trainers = [c for c in commands if c[0].startswith("cpu")]
    assert [name for name, _, _ in trainers] == ["cpu0", "cpu1"]
    for _, argv, env in trainers:
        assert argv[argv.index("-Q") + 1] == "cpu" and _concurrency(argv) == 3
        assert env["CONVTUNE_HOST_TRAINING_PROCESSES"] == "6" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert [c[0] for c in commands][-1] == "callbacks"


def test_trials_sharing_a_gpu_share_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVTUNE_HOST_TRAINING_PROCESSES", raising=False)
    monkeypatch.delenv("CONVTUNE_GPU_MEMORY_FRACTION", raising=False)
    (_, argv, env), *_ = worker_commands(2, 1, trials_per_worker=2)
    assert _concurrency(argv) == 2 and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["CONVTUNE_HOST_TRAINING_PROCESSES"] == "4" and float(env["CONVTUNE_GPU_MEMORY_FRACTION"]) == pytest.approx(0.45)
    (_, _, alone), *_ = worker_commands(1, 1)
    assert "CONVTUNE_GPU_MEMORY_FRACTION" not in alone


def test_an_operator_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVTUNE_HOST_TRAINING_PROCESSES", "8")
    (_, _, env), *_ = worker_commands(0, 2)
    assert env["CONVTUNE_HOST_TRAINING_PROCESSES"] == "8"
