"""The API process never imports torch (DESIGN: processes), nor the workers' code."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import service
from service.api import create_app
from service.api.settings import ApiSettings
app = create_app(ApiSettings(redis_url="redis://127.0.0.1:1/0", mlflow_tracking_uri="http://127.0.0.1:1", auth_disabled=True))
import service.cli.main, service.client, service.stack.supervisor, service.stack.demo
client = app.test_client()
client.post("/trials", json={"model": {"kernel_size": 4}})  # validation and sizing run too
client.post("/trials", json={"model": {"kernel_size": 27}})
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "workers")))
print(",".join(heavy))
"""


def test_api_process_imports_no_torch_and_no_workers():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the API imported: {result.stdout.strip()}"
