"""Token hashing and matching, scopes per method, and `convtune token`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from service.api.auth import Principal, TokenAuth, hash_token, new_token, required_scope
from service.api.settings import ApiSettings, TokenConfig
from service.cli.main import main


def test_only_a_configured_token_authenticates_and_only_its_hash_is_kept():
    secret = new_token()
    auth = TokenAuth([TokenConfig(name="ci", sha256=hash_token(secret), scopes=["read", "submit"])])
    principal = auth.authenticate(secret)
    assert principal == Principal("ci", frozenset({"read", "submit"}), team="ci")  # a token without a team is a team of its own
    assert auth.authenticate(secret + "x") is None and auth.authenticate("") is None
    assert secret not in repr(auth.__dict__)


def test_a_token_acts_for_its_team():
    secret = new_token()
    auth = TokenAuth([TokenConfig(name="ci-a", sha256=hash_token(secret), scopes=["read", "submit"], team="vision")])
    assert auth.authenticate(secret) == Principal("ci-a", frozenset({"read", "submit"}), team="vision")


def test_what_each_caller_reads_and_changes():
    member = Principal("m", frozenset({"read", "submit"}), "a")
    dashboard = Principal("d", frozenset({"read-all"}), "ops")
    admin = Principal("root", frozenset({"admin"}), "ops")
    assert member.may_read("a") and not member.may_read("b") and not member.may_read(None)
    assert member.may_change("a") and not member.may_change("b")
    assert dashboard.allows("read") and not dashboard.allows("submit")
    assert dashboard.may_read("a") and dashboard.may_read("b") and dashboard.may_read(None)
    assert not dashboard.may_change("a") and not dashboard.may_change(None)
    assert admin.may_read("b") and admin.may_change("b") and admin.may_change(None)


def test_scopes():
    assert required_scope("GET") == required_scope("HEAD") == "read"
    assert required_scope("POST") == "submit"
    admin, reader = Principal("a", frozenset({"admin"})), Principal("r", frozenset({"read"}))
    assert admin.allows("read") and admin.allows("submit") and reader.allows("read") and not reader.allows("submit")


def test_tokens_come_from_the_environment_as_json(monkeypatch):
    entry = {"name": "ci", "sha256": hash_token("t"), "scopes": ["read"]}
    monkeypatch.setenv("CONVTUNE_AUTH_TOKENS", json.dumps([entry]))
    settings = ApiSettings()
    assert settings.auth_tokens == [TokenConfig(**entry)] and settings.auth_disabled is False


def test_convtune_token_prints_a_token_and_its_hashed_entry():
    result = CliRunner().invoke(main, ["token", "ci", "--scope", "read", "--scope", "submit"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    secret = next(line for line in lines if line.startswith("ct_"))
    entry = json.loads(next(line for line in lines if line.startswith("{")))
    assert entry == {"name": "ci", "sha256": hash_token(secret), "scopes": ["read", "submit"]}


def test_convtune_token_with_a_team_and_read_all():
    result = CliRunner().invoke(main, ["token", "grafana", "--scope", "read-all", "--team", "ops"])
    assert result.exit_code == 0, result.output
    entry = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert entry["team"] == "ops" and entry["scopes"] == ["read-all"]
    assert TokenConfig(**entry).team_name == "ops"
