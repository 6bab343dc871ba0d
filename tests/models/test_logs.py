"""JSON log lines carry the ids bound for the trial or study being handled."""

from __future__ import annotations

import io
import json
import logging

from models.logs import bind, clear, configure_logging, log_context


def test_json_lines_carry_trial_and_study_ids(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging("worker", "json", "INFO")
    log = logging.getLogger("convtune.test")
    clear()  # start from no ids, whatever ran before in this process
    try:
        with log_context(trial_id="t1", study_id="s1"):
            log.info("epoch %d done", 3, extra={"epoch": 3})
        log.info("outside")
        bind(trial_id="t2")
        log.warning("bound")
        clear()
        log.info("cleared")
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_convtune", False)]:
            root.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first, outside, bound, cleared = lines
    assert first["message"] == "epoch 3 done" and first["trial_id"] == "t1" and first["study_id"] == "s1" and first["epoch"] == 3
    assert first["level"] == "INFO" and first["logger"] == "convtune.test" and first["process"] == "worker" and first["time"]
    assert "trial_id" not in outside and bound["trial_id"] == "t2" and "trial_id" not in cleared
