"""The ``convtune`` group holds every command under its documented name, and the commands that call
the API map their failures to the documented exit codes (no API needed for these)."""

from __future__ import annotations

from click.testing import CliRunner

import service.cli
from service.cli.follow import EXIT_INVALID, EXIT_UNAVAILABLE
from service.cli.main import main
from tests.conftest import free_port

PROCESS_COMMANDS = {"api", "worker", "up", "demo", "token", "webhook-key", "mlflow-access"}
RUN_COMMANDS = {"submit", "study", "status", "wait", "cancel", "best", "lr-find", "usage", "ls", "logs"}


def test_every_command_is_in_the_group_under_its_name():
    assert service.cli.main is main  # the console script's entry point
    assert set(main.commands) == PROCESS_COMMANDS | RUN_COMMANDS
    assert set(main.commands["study"].commands) == {"create", "extend"}
    assert set(main.commands["mlflow-access"].commands) == {"sync", "add", "remove"}
    listed = CliRunner().invoke(main, ["--help"])
    assert listed.exit_code == 0 and all(f"  {name} " in listed.output for name in PROCESS_COMMANDS | RUN_COMMANDS)
    assert "Exit codes: 0 success" in listed.output


def test_an_api_nobody_serves_exits_3_without_a_traceback():
    api = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["status", "some-id", "--api", api, "--retries", "0"])
    assert result.exit_code == EXIT_UNAVAILABLE, result.output
    assert "is unreachable" in result.output and "Traceback" not in result.output


def test_an_unreadable_spec_or_requirement_exits_2(tmp_path):
    spec = tmp_path / "trial.yaml"
    spec.write_text("- not\n- a mapping\n")
    assert CliRunner().invoke(main, ["submit", str(spec)]).exit_code == EXIT_INVALID
    spec.write_text("optim: {lr: 0.1}\n")
    assert CliRunner().invoke(main, ["submit", str(spec), "--require", "val_accuracy ~ 0.9"]).exit_code == EXIT_INVALID
    assert CliRunner().invoke(main, ["lr-find", str(tmp_path / "missing.yaml")]).exit_code == EXIT_INVALID


def test_webhook_key_prints_the_team_s_key_derived_from_the_secret_key(monkeypatch):
    from models.callbacks import webhook_key, webhook_secret

    monkeypatch.delenv("CONVTUNE_CALLBACK_SECRET", raising=False)
    monkeypatch.delenv("CONVTUNE_SECRET_KEY", raising=False)
    refused = CliRunner().invoke(main, ["webhook-key", "--team", "team-a"])
    assert refused.exit_code == EXIT_INVALID and "CONVTUNE_SECRET_KEY" in refused.output
    monkeypatch.setenv("CONVTUNE_SECRET_KEY", "cli-test-key")
    monkeypatch.setenv("CONVTUNE_WEBHOOK_KEY_VERSIONS", '{"team-a": [2, 1]}')
    shown = CliRunner().invoke(main, ["webhook-key", "--team", "team-a"])
    assert shown.exit_code == 0 and shown.stdout.strip() == webhook_secret(webhook_key("cli-test-key", "team-a", 2))
    token = CliRunner().invoke(main, ["token", "alice", "--team", "team-a"])
    assert token.exit_code == 0 and token.stdout.strip().startswith("ct_") and len(token.stdout.split()) == 1  # stdout: the token alone
    assert webhook_secret(webhook_key("cli-test-key", "team-a", 2)) in token.stderr
