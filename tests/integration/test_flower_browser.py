"""Flower's tasks page in headless Chromium: runs .ci/browser-check.sh where Chromium exists.

CI installs no browser, so this skips there; run `.ci/browser-check.sh` by hand after
`apt-get install -y chromium`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")
def test_the_tasks_page_lists_the_job_in_a_real_browser(redis_url: str, tmp_path: Path) -> None:
    # Given Redis, Chromium and the check script
    db = redis_url.rsplit("/", 1)[1]
    env = {**os.environ, "PYTHON": sys.executable, "DOCQ_CHECK_REDIS_DB": db}
    # When the script runs a job and loads Flower's tasks page
    done = subprocess.run(["bash", str(ROOT / ".ci" / "browser-check.sh"), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    # Then anonymous requests were refused, every batch row was listed, and a screenshot saved
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "/tasks without credentials: 401" in done.stdout
    assert done.stdout.rstrip().endswith("OK")
    assert (tmp_path / "flower-tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # and a batch's page showed its story: counts, tokens, cost and a failed chunk's reason
    assert "its result shows counts, tokens, cost and a failed chunk's reason" in done.stdout
    assert (tmp_path / "flower-batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
