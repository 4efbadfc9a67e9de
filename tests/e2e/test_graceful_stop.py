"""``kandinsky-serve run`` stopped by SIGTERM with work in flight: the work finishes, new work
is refused with an explicit 503, and the process exits cleanly. Starts its own Ray instance
(a fresh process, as `make run` does), so it is slow: ``pytest -m slow tests/e2e/test_graceful_stop.py``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest


pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# A synchronous request long enough (several seconds on 2 cores) that the drain starts while
# it runs. The A1111 route runs it as a job, so /sdapi/v1/progress shows when it is inside.
SLOW_REQUEST = {"prompt": "a red circle", "batch_size": 8, "steps": 150}
SHORT_JOB = {"mode": "text2img", "params": {"prompt": "a blue square", "steps": 20}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(check, what: str, timeout_s: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        assert proc.poll() is None, f"the service exited (code {proc.returncode}) waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling interval


def test_sigterm_finishes_what_is_in_flight_refuses_new_work_and_exits_cleanly(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "run.log").open("w+")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from serve.cli import main; raise SystemExit(main())", "run", "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        def status(path: str) -> int | None:
            try:
                return httpx.get(url + path, timeout=10).status_code
            except httpx.TransportError:
                return None

        _poll(lambda: status("/readyz") == 200, "readiness", 300, proc)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, url + "/sdapi/v1/txt2img", json=SLOW_REQUEST, timeout=300)
            _poll(lambda: httpx.get(url + "/sdapi/v1/progress", timeout=10).json()["state"]["job_count"],
                  "the request to be admitted", 60, proc)
            job = httpx.post(url + "/v1/jobs", json=SHORT_JOB, timeout=30).json()
            proc.send_signal(signal.SIGTERM)
            _poll(lambda: status("/readyz") == 503, "the drain to start", 60, proc)
            late = httpx.post(url + "/v1/text2img", json={"prompt": "too late"}, timeout=30)
            # The short job ends well before the long request, so the service is still up.
            job_view = _poll(lambda: (v := httpx.get(url + job["urls"]["self"], timeout=10).json())["state"]
                             in ("succeeded", "failed", "cancelled") and v, "the job to finish", 120, proc)
            finished = in_flight.result(timeout=300)
        assert late.status_code == 503 and late.json()["error"]["type"] == "shutting_down", late.text
        assert late.headers.get("Retry-After")
        assert job_view["state"] == "succeeded", job_view
        assert finished.status_code == 200, finished.text
        assert len(finished.json()["images"]) == SLOW_REQUEST["batch_size"]
        assert proc.wait(timeout=120) == 0
        log.seek(0)
        output = log.read()
        assert "still in flight" in output, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
