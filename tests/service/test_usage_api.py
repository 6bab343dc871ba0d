"""The API's pieces of compute accounting that need no server: times in /usage, the quota problem, the CLI's table."""

from __future__ import annotations

import pytest

from models.store.usage import QuotaRefusal
from service.api.errors import BadRequest, QuotaExceeded
from service.api.usage import parse_time
from service.cli.usage import usage_table


def test_times_are_iso_8601_or_unix_seconds_and_a_naive_time_is_utc():
    assert parse_time("1700000000", "since", 0) == 1_700_000_000
    assert parse_time("2023-11-14T22:13:20Z", "since", 0) == 1_700_000_000
    assert parse_time("2023-11-14T22:13:20", "since", 0) == 1_700_000_000
    assert parse_time("2023-11-14T23:13:20+01:00", "since", 0) == 1_700_000_000
    assert parse_time(None, "since", 5.0) == 5.0


def test_a_time_that_is_neither_is_a_400_naming_the_field():
    with pytest.raises(BadRequest) as caught:
        parse_time("yesterday", "until", 0)
    assert caught.value.errors[0].field == "until"


def test_a_quota_refusal_is_a_429_problem_naming_the_team_limit_use_estimate_and_when_it_frees_up():
    refusal = QuotaRefusal("device_seconds_per_day", 3600.0, 3000.0, 900.0, retry_after_s=120, frees_at=1_700_000_000.0)
    error = QuotaExceeded("over", team="vision", refusal=refusal)
    problem = error.to_problem().model_dump(exclude_none=True)
    assert error.status == 429 and error.headers["Retry-After"] == "120"
    assert problem["type"].endswith("/quota-exceeded")
    assert problem["quota"] == {
        "team": "vision", "quota": "device_seconds_per_day", "limit": 3600.0, "used": 3000.0, "estimate": 900.0,
        "retry_after_s": 120, "frees_at": "2023-11-14T22:13:20+00:00",
    }


def test_a_submit_alone_over_its_limit_says_it_never_frees_up():
    refusal = QuotaRefusal("queued_device_seconds", 100.0, 0.0, 900.0, retry_after_s=60, frees_at=None)
    quota = QuotaExceeded("over", team="vision", refusal=refusal).to_problem().quota
    assert quota.frees_at is None and quota.retry_after_s is None


def test_the_cli_table_has_a_row_per_team_and_device_kind_and_a_total():
    from rich.console import Console

    row = {"team": "a", "device_kind": "cpu", "device_seconds": 7200.0, "cpu_seconds": 3600.0, "flops": 2e12, "runs": 3}
    doc = {"since": "s", "until": "u", "teams": ["a", "b"], "items": [row, {**row, "team": "b"}], "total": {**row, "team": None, "device_kind": "all", "runs": 6}}
    console = Console(width=200, record=True)
    console.print(usage_table(doc))
    text = console.export_text()
    assert "2.000" in text and "(total)" in text and text.count("cpu") == 2
