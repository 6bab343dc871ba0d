"""Callback signatures (Standard Webhooks, a key per team), sealed secrets, and where callbacks may go."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from models.callbacks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    delivery_body,
    destination_problem,
    embedded_ipv4,
    encode,
    signed_headers,
    trial_ended_event,
    verify_signature,
    webhook_key,
    webhook_secret,
)
from models.sealing import SealBroken, Sealer, SecretKeySettings, shown_secrets, split_secrets, with_secrets

MASTER = "test-master-key"
HOOK = "https://hooks.example.com:8443/in/T0K3N?sig=abc"


def _delivery(team: str | None, destination: str = HOOK, *, timestamp: int | None = None, keys: list[bytes] | None = None) -> tuple[dict[str, str], bytes]:
    event = trial_ended_event("a" * 32, name="n", status="succeeded", outcome="succeeded", reason="ok", metrics={"val_accuracy": 0.9})
    body = delivery_body(event, team, destination)
    return signed_headers(keys or [webhook_key(MASTER, team)], event["delivery_id"], body, timestamp), body


# --- the key of each team ---


def test_a_team_s_key_is_hmac_sha256_of_the_master_key_over_its_name_and_version():
    assert webhook_key(MASTER, "team-a", 3) == hmac.new(MASTER.encode(), b"convtune-webhook:team-a:3", hashlib.sha256).digest()
    assert webhook_key(MASTER, None) == webhook_key(MASTER, "default", 1)  # no teams (auth off): the default team's
    keys = {webhook_key(MASTER, "team-a", 1), webhook_key(MASTER, "team-b", 1), webhook_key(MASTER, "team-a", 2), webhook_key("another", "team-a", 1)}
    assert len(keys) == 4
    assert webhook_secret(webhook_key(MASTER, "team-a")) == "whsec_" + base64.b64encode(webhook_key(MASTER, "team-a")).decode()


def test_a_run_s_callbacks_are_signed_for_its_team_and_without_auth_for_the_default_team():
    from models.store.teams import callback_team

    assert callback_team({"convtune.owner": "alice-ci", "convtune.team": "alpha"}) == "alpha"
    assert callback_team({"convtune.owner": "alice-ci"}) == "alice-ci"  # before teams: the token was its team
    assert callback_team({"convtune.owner": "anonymous"}) is None  # authentication off
    assert callback_team({"convtune.owner": "anonymous", "convtune.team": "anonymous"}) == "anonymous"  # a token so named


def test_key_versions_come_from_the_settings_and_both_sign_while_a_team_rotates():
    settings = SecretKeySettings(secret_key=MASTER, webhook_key_versions={"team-a": [2, 1], "team-b": 3})
    assert settings.webhook_versions("team-a") == [2, 1] and settings.webhook_versions("team-b") == [3] and settings.webhook_versions("team-c") == [1]
    assert settings.webhook_keys("team-a") == [webhook_key(MASTER, "team-a", 2), webhook_key(MASTER, "team-a", 1)]
    headers, body = _delivery("team-a", keys=settings.webhook_keys("team-a"))
    assert len(headers[SIGNATURE_HEADER].split(" ")) == 2
    for version in (1, 2):  # a receiver still on the old key, and one on the new, both verify
        assert verify_signature(webhook_secret(webhook_key(MASTER, "team-a", version)), headers, body)
        Webhook(webhook_secret(webhook_key(MASTER, "team-a", version))).verify(body, headers)
    assert not verify_signature(webhook_secret(webhook_key(MASTER, "team-a", 3)), headers, body)
    with pytest.raises(ValueError, match="whole numbers"):
        SecretKeySettings(webhook_key_versions={"team-a": 0})


def test_the_old_setting_name_is_the_secret_key_and_none_means_no_callbacks():
    assert SecretKeySettings(callback_secret="old").master_key == "old"
    assert SecretKeySettings(secret_key="new", callback_secret="old").master_key == "new"
    assert SecretKeySettings().master_key is None and SecretKeySettings().sealer() is None and SecretKeySettings().webhook_keys("a") == []
    assert "new" not in repr(SecretKeySettings(secret_key="new"))


# --- Standard Webhooks signatures ---


def test_the_signature_is_standard_webhooks_v1_over_id_timestamp_and_body():
    key = webhook_key(MASTER, "team-a")
    headers, body = _delivery("team-a", timestamp=1700000000)
    expected = base64.b64encode(hmac.new(key, f"{headers[ID_HEADER]}.1700000000.".encode() + body, hashlib.sha256).digest()).decode()
    assert headers[SIGNATURE_HEADER] == f"v1,{expected}" and headers[TIMESTAMP_HEADER] == "1700000000"
    assert json.loads(body)["delivery_id"] == headers[ID_HEADER]
    assert {"team": "team-a", "destination": HOOK}.items() <= json.loads(body).items()


def test_the_standard_library_verifies_a_delivery_with_the_team_s_key_only():
    headers, body = _delivery("team-a")
    assert Webhook(webhook_secret(webhook_key(MASTER, "team-a"))).verify(body, headers)["team"] == "team-a"
    assert verify_signature(webhook_secret(webhook_key(MASTER, "team-a")), headers, body, destination=HOOK)
    for other in (webhook_key(MASTER, "team-b"), webhook_key(MASTER, "default"), webhook_key("guessed", "team-a")):
        with pytest.raises(WebhookVerificationError):
            Webhook(webhook_secret(other)).verify(body, headers)
        assert not verify_signature(webhook_secret(other), headers, body)


def test_a_delivery_captured_from_team_a_fails_at_team_b_and_one_replayed_elsewhere_names_its_destination():
    headers, body = _delivery("team-a", destination="https://a.example/hook")
    assert not verify_signature(webhook_secret(webhook_key(MASTER, "team-b")), headers, body)  # team B's receiver
    secret_a = webhook_secret(webhook_key(MASTER, "team-a"))
    assert verify_signature(secret_a, headers, body, destination="https://a.example/hook")
    assert not verify_signature(secret_a, headers, body, destination="https://a.example/other-hook")  # replayed to another URL
    moved = body.replace(b"https://a.example/hook", b"https://a.example/other-hook")
    assert not verify_signature(secret_a, headers, moved, destination="https://a.example/other-hook")  # and it cannot say otherwise


def test_a_tampered_body_a_moved_signature_and_a_stale_or_future_timestamp_are_refused():
    secret = webhook_secret(webhook_key(MASTER, "team-a"))
    headers, body = _delivery("team-a")
    assert verify_signature(secret, headers, body)
    altered = json.loads(body)
    altered["trial"]["outcome"] = "failed"
    assert not verify_signature(secret, headers, encode(altered))
    assert not verify_signature(secret, headers, body + b" ")
    assert not verify_signature(secret, {**headers, TIMESTAMP_HEADER: str(int(headers[TIMESTAMP_HEADER]) + 60)}, body)
    assert not verify_signature(secret, {**headers, ID_HEADER: "another-id"}, body)
    for t in (int(time.time()) - 301, int(time.time()) + 301):
        stale_headers, stale_body = _delivery("team-a", timestamp=t)
        assert not verify_signature(secret, stale_headers, stale_body)
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(stale_body, stale_headers)
    assert verify_signature(secret, {k.upper(): v for k, v in headers.items()}, body)  # header names are case-insensitive


@pytest.mark.parametrize("changed", [
    {TIMESTAMP_HEADER: "9" * 5000},  # a huge timestamp
    {TIMESTAMP_HEADER: "\u0661\u0662"},  # non-ASCII digits
    {TIMESTAMP_HEADER: ""},
    {ID_HEADER: ""},
    {SIGNATURE_HEADER: "v1,caf\u00e9"},  # a non-ASCII signature
    {SIGNATURE_HEADER: "garbage"},
    {SIGNATURE_HEADER: ""},
])
def test_a_malformed_header_is_refused_never_raised(changed: dict[str, str]):
    headers, body = _delivery("team-a")
    assert verify_signature(webhook_secret(webhook_key(MASTER, "team-a")), {**headers, **changed}, body) is False
    assert verify_signature("whsec_not base64!", headers, body) is False


# --- sealed secrets ---


def test_secret_fields_are_split_out_at_any_depth_and_put_back():
    study = {"name": "s", "callback_url": HOOK, "base": {"callback_url": "https://b.example/x?t=1", "tags": {"callback_url": "kept? no"}}, "points": [{"callback_url": None}]}
    public, secrets = split_secrets(study)
    assert secrets == {"callback_url": HOOK, "base.callback_url": "https://b.example/x?t=1", "base.tags.callback_url": "kept? no"}
    assert HOOK not in json.dumps(public) and public["callback_url"] is None and public["base"]["callback_url"] is None
    assert with_secrets(public, secrets) == study
    assert shown_secrets(study)["callback_url"] == "https://hooks.example.com:8443/..." and shown_secrets(study)["points"] == [{"callback_url": None}]


def test_sealed_secrets_open_with_the_same_key_only():
    sealed = Sealer(MASTER).seal({"callback_url": HOOK})
    assert "T0K3N" not in sealed and "hooks.example.com" not in sealed
    assert Sealer(MASTER).unseal(sealed) == {"callback_url": HOOK}
    with pytest.raises(SealBroken):
        Sealer("another key").unseal(sealed)
    with pytest.raises(SealBroken):
        Sealer(MASTER).unseal(sealed[:-4] + "AAAA")


def test_run_tags_hold_the_spec_without_its_secrets_and_the_reconciler_gets_them_back():
    from models.store.runs import TAG, run_spec, spec_tags

    spec = {"name": "t", "callback_url": HOOK, "optim": {"lr": 0.1}}
    sealer = Sealer(MASTER)
    tags = spec_tags(spec, sealer)
    assert "T0K3N" not in json.dumps(tags) and json.loads(tags[TAG.SPEC])["callback_url"] is None
    assert run_spec(tags, sealer) == spec
    assert run_spec({TAG.SPEC: tags[TAG.SPEC]}, None) == {**spec, "callback_url": None}  # a run with no secrets
    with pytest.raises(SealBroken):
        run_spec(tags, None)
    assert TAG.SEALED not in spec_tags(spec, None) and "T0K3N" not in json.dumps(spec_tags(spec, None))  # no sealer: dropped


def test_flatten_params_keeps_callback_url_out_of_mlflow_params():
    from models.spec.trial import TrialSpec, flatten_params
    from tests.helpers import tiny_trial

    params = flatten_params(TrialSpec.model_validate(tiny_trial(callback_url=HOOK)))
    assert not any("callback" in k or "T0K3N" in v for k, v in params.items())


# --- addresses callbacks may not reach, hidden in IPv6 ---


@pytest.mark.parametrize(("address", "inner"), [
    ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
    ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64, well-known prefix
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64 to the metadata service
    ("64:ff9b:1::a00:1", "10.0.0.1"),  # NAT64, local-use prefix
    ("2002:a00:1::1", "10.0.0.1"),  # 6to4
    ("::10.0.0.1", "10.0.0.1"),  # IPv4-compatible
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),  # Teredo: the client is the inverted last 32 bits
])
def test_an_ipv4_address_embedded_in_ipv6_is_judged_like_the_plain_one(address: str, inner: str):
    assert [str(a) for a in embedded_ipv4(ipaddress.ip_address(address))] == [inner]
    assert "not a public address" in destination_problem(address, 443, [], [80, 443])


def test_embedded_public_ipv4_passes_and_allowed_networks_still_count():
    assert destination_problem("64:ff9b::5db8:d822", 443, [], [80, 443]) is None  # NAT64 to 93.184.216.34
    assert destination_problem("2002:5db8:d822::1", 443, [], [80, 443]) is None  # 6to4 of it
    assert destination_problem("64:ff9b::7f00:1", 8000, ["127.0.0.0/8", "64:ff9b::/96"], None) is None
    assert embedded_ipv4(ipaddress.ip_address("2606:4700::1111")) == [] and embedded_ipv4(ipaddress.ip_address("::1")) == []
    assert "not a public address" in destination_problem("64:ff9b:1::5db8:d822", 443, [], None)  # the local-use prefix is never public


def test_event_carries_the_trial_and_a_delivery_id():
    event = trial_ended_event("a" * 32, name="n", status="failed", outcome="diverged", reason="NaN", metrics={}, study_id="s" * 32)
    assert event["event"] == "trial.ended" and len(event["delivery_id"]) == 32
    assert event["trial"] == {"id": "a" * 32, "name": "n", "status": "failed", "outcome": "diverged", "reason": "NaN", "metrics": {}, "study_id": "s" * 32}
