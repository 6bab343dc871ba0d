"""The MLflow UI, for real: a study's parent run with its child trials and their metrics, in headless Chromium.

Starts the real components (Redis, ``mlflow server``, a Celery worker, the Flask app), runs a 3-trial
study through ``POST /studies``, then opens ``{mlflow}/#/experiments/{id}/runs`` in Debian's Chromium
driven by Playwright (no browser is downloaded) and checks what a person would see: the parent run,
its child runs (expanded) and a metric column. The screenshot is kept under test-artifacts/.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest

from service.api import create_app
from service.api.settings import ApiSettings
from tests.conftest import ARTIFACTS, start_worker
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


@pytest.fixture(scope="module")
def finished_study(redis_url: str, mlflow_uri: str, worker_env: dict[str, str]) -> dict:
    settings = ApiSettings(
        redis_url=redis_url, mlflow_tracking_uri=mlflow_uri, experiment=f"ui-{uuid.uuid4().hex[:8]}", default_queue="cpu",
        study_storage=worker_env["CONVTUNE_STUDY_STORAGE"], auth_disabled=True,
    )
    client = create_app(settings).test_client()
    worker = start_worker("ui-worker", worker_env)
    try:
        body = {
            "name": "ui study", "base": tiny_trial(optim={"epochs": 2}), "sampler": "grid", "pruner": "none", "parallelism": 1,
            "search_space": {"optim.lr": [1e-3, 3e-3, 1e-2]},
        }
        response = client.post("/studies", json=body)
        assert response.status_code == 202, response.get_json()
        study_id = response.get_json()["id"]
        deadline = time.monotonic() + 180
        while (study := client.get(f"/studies/{study_id}").get_json())["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, study
            time.sleep(0.5)
        assert study["state"] == "succeeded", study["reason"]
        trials = client.get(f"/studies/{study_id}/trials").get_json()["items"]
        experiment_id = study["mlflow_url"].split("/#/experiments/")[1].split("/")[0]
        return {"study": study, "trials": trials, "experiment_id": experiment_id}
    finally:
        worker.stop()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install -y chromium); .ci/run installs it")
def test_mlflow_ui_shows_the_study_parent_with_child_trials_and_metrics(finished_study: dict, mlflow_uri: str, capsys: pytest.CaptureFixture) -> None:
    from playwright.sync_api import expect, sync_playwright

    study, trials = finished_study["study"], finished_study["trials"]
    screenshot = (ARTIFACTS / "mlflow_ui_study.png").resolve()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 2400, "height": 900})
            page.goto(f"{mlflow_uri}/#/experiments/{finished_study['experiment_id']}/runs", wait_until="domcontentloaded")
            parent = page.get_by_text("ui study", exact=True).first
            expect(parent).to_be_visible(timeout=60_000)
            # The assistant panel takes a third of the page: close it when this version shows one.
            close = page.locator("button[aria-label*='lose']").last
            if close.count() and close.is_visible():
                close.click()
            # Child runs are folded under their parent: unfold them as a person would (the [+] by its name).
            page.locator(f'[row-id="{study["id"]}"] button[data-component-id*="runnamecellrenderer"]').first.click()
            for trial in trials:
                name = f"#{trial['number']}"
                expect(page.get_by_text(re.compile(re.escape(name) + "$")).first).to_be_visible(timeout=30_000)
            # Metric columns are opt-in: add val_accuracy through the column picker, as a person would.
            page.get_by_text("Show more columns").first.click()
            page.keyboard.type("val_accuracy")
            page.get_by_text(re.compile(r"^Metrics \(\d+\)$")).first.click()  # tick the group: val_accuracy and best_val_accuracy
            page.keyboard.press("Escape")
            expect(page.get_by_role("columnheader", name=re.compile("val_accuracy")).first).to_be_visible(timeout=30_000)
            # Each child's row shows its val_accuracy (the trial's value: its last epoch), the parent its best.
            for trial in trials:
                cell = page.locator(f'[row-id="{trial["trial_id"]}"] [col-id="metrics.`val_accuracy`"]')
                expect(cell).to_contain_text(str(trial["value"])[:6], timeout=30_000)
            parent_cells = page.locator(f'[row-id="{study["id"]}"] [col-id="metrics.`best_val_accuracy`"]')
            expect(parent_cells).to_contain_text(str(study["best"]["value"])[:6], timeout=30_000)
        finally:
            if browser.contexts and browser.contexts[0].pages:
                page = browser.contexts[0].pages[0]
                page.screenshot(path=str(screenshot), full_page=True)  # also when a check failed: it shows why
                (screenshot.with_suffix(".html")).write_text(page.content())
            browser.close()
    with capsys.disabled():  # shown in every run, not only a failing one
        print(f"\nMLflow UI screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000
