"""Jobs outlive their store actor (SQLite records), webhooks are called over real HTTP, and
the SSRF guard answers through Ray Serve's proxy."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import ray

from serve.jobs.actor import NAMESPACE
from serve.settings import JobSettings
from tests.e2e.test_jobs_http import SMALL, poll

SLOWER = {**SMALL, "width": 128, "height": 128, "steps": 60, "seed": 5}


@pytest.fixture(scope="module")
def client(served_app):
    url, _ = served_app
    with httpx.Client(base_url=url, timeout=120.0) as client:
        yield client


def submit(client, params, **fields) -> dict:
    response = client.post("/v1/jobs", json={"mode": "text2img", "params": params, **fields})
    assert response.status_code == 202, response.text
    return response.json()


def test_a_job_survives_killing_the_store_actor(client, jobs_database):
    done = submit(client, SMALL)
    final = poll(lambda: client.get(f"/v1/jobs/{done['id']}").json(), lambda v: v["state"] == "succeeded", "job 1")
    image = client.get(final["images"][0]["url"]).content
    running = submit(client, SLOWER)
    poll(lambda: client.get(f"/v1/jobs/{running['id']}").json(), lambda v: v["state"] == "running", "job 2 to start")

    store = ray.get_actor(JobSettings().store_name, namespace=NAMESPACE)
    ray.kill(store)  # no restart: the next call finds it gone and makes it again, from its file
    assert jobs_database.exists()

    again = client.get(f"/v1/jobs/{done['id']}")
    assert again.status_code == 200 and again.json() == final
    assert client.get(final["images"][0]["url"]).content == image
    # The job that was running goes on: its runner reports to the new store and finishes there.
    ended = poll(lambda: client.get(f"/v1/jobs/{running['id']}").json(), lambda v: v["state"] != "running"
                 and v["state"] != "queued", "job 2 to end", timeout_s=120)
    assert ended["state"] == "succeeded", ended
    assert client.get(ended["images"][0]["url"]).status_code == 200


class Hooks(BaseHTTPRequestHandler):
    received: list[tuple[dict, dict]] = []
    arrived = threading.Event()

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hooks.received.append((dict(self.headers), json.loads(body)))
        Hooks.arrived.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_job_calls_its_webhook_when_it_ends(client):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)  # 127.0.0.1 is allow-listed for the test app
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job = submit(client, SMALL, webhook_url=f"http://127.0.0.1:{server.server_port}/hooks/job?id=1")
        assert Hooks.arrived.wait(60), "the webhook was never called"
    finally:
        server.shutdown()
    headers, payload = Hooks.received[0]
    assert payload["event"] == "job.succeeded" and payload["job"]["id"] == job["id"]
    assert payload["job"]["state"] == "succeeded" and payload["job"]["images"]
    assert headers["X-Kandinsky-Signature"].startswith("sha256=") and headers["X-Kandinsky-Event"] == "job.succeeded"


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/", "http://[::1]:80/"])
def test_a_webhook_to_a_private_address_is_refused_with_a_422_naming_the_field(client, url):
    response = client.post("/v1/jobs", json={"mode": "text2img", "params": SMALL, "webhook_url": url})
    error = response.json()["error"]
    assert response.status_code == 422 and error["details"][0]["field"] == "webhook_url", response.text
    assert "allowed_hosts" in error["message"]
