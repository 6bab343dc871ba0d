"""Callback signatures: HMAC-SHA256 over timestamp and body, checked in constant time, stale ones refused."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from models.callbacks import encode, sign, trial_ended_event, verify_signature


def test_signature_is_hmac_sha256_of_timestamp_and_body():
    body = b'{"event":"trial.ended"}'
    header = sign("k", body, timestamp=1700000000)
    assert header == "t=1700000000,v1=" + hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()


def test_verify_accepts_the_signer_and_nothing_else():
    body = encode(trial_ended_event("a" * 32, name="n", status="succeeded", outcome="succeeded", reason="ok", metrics={"val_accuracy": 0.9}))
    header = sign("secret", body)
    assert verify_signature("secret", header, body)
    assert not verify_signature("other", header, body)
    assert not verify_signature("secret", header, body + b" ")
    assert not verify_signature("secret", header.replace("v1=", "v1=0"), body)
    assert not verify_signature("secret", "garbage", body)
    stale = sign("secret", body, timestamp=int(time.time()) - 3600)
    assert not verify_signature("secret", stale, body)


def test_event_carries_the_trial_and_a_delivery_id():
    event = trial_ended_event("a" * 32, name="n", status="failed", outcome="diverged", reason="NaN", metrics={}, study_id="s" * 32)
    assert event["event"] == "trial.ended" and len(event["delivery_id"]) == 32
    assert event["trial"] == {"id": "a" * 32, "name": "n", "status": "failed", "outcome": "diverged", "reason": "NaN", "metrics": {}, "study_id": "s" * 32}


@pytest.mark.parametrize("header", [
    "t=" + "9" * 5000 + ",v1=00",  # a huge timestamp
    "t=99999999999999999999,v1=00",  # one too large for a float difference... still a clean False
    "t=1,v1=caf\u00e9",  # a non-ASCII signature
    "t=\u0661\u0662,v1=00",  # non-ASCII digits
    "v1=00",
    "garbage",
])
def test_a_malformed_signature_is_refused_never_raised(header: str):
    assert verify_signature("secret", header, b"{}") is False
