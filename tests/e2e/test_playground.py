"""/playground in a real browser: Debian's headless Chromium driven by Playwright, against the
session's served app over HTTP (and, for API keys, the guarded app).

Screenshots go to ``test-artifacts/playground/`` (``$KANDINSKY_TEST_ARTIFACTS`` overrides it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

import httpx
import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("KANDINSKY_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "playground"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""No GPU, no sandbox (root in CI), and none of Chromium's own network calls (this machine's network is closed)."""
SMALL = {"prompt": "a red circle on a white background", "width": "64", "height": "64", "steps": "4", "prior_steps": "2",
         "seed": "7"}
TIMEOUT_MS = 60_000
"""How long a page may take to show what a test waits for (the first job on a cold ingress takes seconds)."""


def chromium_path() -> str | None:
    """``$KANDINSKY_CHROMIUM``, else Debian's chromium (``make test`` installs it with apt)."""
    for candidate in (os.environ.get("KANDINSKY_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found: install Debian's chromium (apt-get install chromium) or set KANDINSKY_CHROMIUM")
    with sync_playwright() as driver:
        # launch() gives each run a fresh, temporary user-data-dir.
        browser = driver.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{request.node.name}.png", full_page=True)
    context.close()


def fill(page, values: dict[str, str]) -> None:
    for field, value in values.items():
        page.fill(f"#{field}", value)


def test_text2img_from_the_page_reaches_100_percent_and_shows_the_image(page, served_app):
    url, _ = served_app
    page.goto(f"{url}/playground")
    expect(page.locator("#health-label")).to_have_text("ready")
    fill(page, {**SMALL, "num_images": "2"})
    page.click("#generate")
    expect(page.locator("#progress-label")).to_have_text("100 %")
    expect(page.locator("#job-state")).to_have_text("succeeded")
    images = page.locator(".results img.result")
    expect(images).to_have_count(2)
    assert images.evaluate_all("all => all.map(i => i.naturalWidth)") == [64, 64]
    expect(page.locator(".results figcaption").first).to_contain_text("seed 7")
    expect(page.locator("#gallery .recent").first).to_contain_text("text2img · succeeded")
    # "Reuse seed" on image 1 puts its seed (7 + 1) back in the form, for one image.
    page.locator(".reuse-seed").nth(1).click()
    assert (page.input_value("#seed"), page.input_value("#num_images")) == ("8", "1")


def png(size: int = 64) -> bytes:
    """A red disc on white: the input image of the image modes."""
    y, x = np.mgrid[:size, :size]
    pixels = np.full((size, size, 3), 255, np.uint8)
    pixels[(x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 4) ** 2] = (220, 30, 30)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "mix", "variations"])
def test_each_image_mode_runs_from_the_page(page, served_app, mode):
    url, _ = served_app
    page.goto(f"{url}/playground")
    page.check(f"input[name=mode][value={mode}]")
    page.set_input_files("#image", files=[{"name": "disc.png", "mimeType": "image/png", "buffer": png()}])
    expect(page.locator("#image")).to_have_attribute("data-loaded", "disc.png")
    fill(page, {**SMALL, "strength": "0.5"} if mode in ("img2img", "variations") else SMALL)
    if mode == "inpaint":  # paint a stroke across the mask canvas
        box = page.locator("#mask").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] / 2, steps=5)
        page.mouse.up()
    with page.expect_request(lambda request: request.url.endswith("/v1/jobs") and request.method == "POST") as sent:
        page.click("#generate")
    body = json.loads(sent.value.post_data)
    assert body["mode"] == mode
    params = body["params"]
    if mode == "inpaint":  # white where painted, black elsewhere, the image's size
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(params["mask"]))).convert("L"))
        assert mask.shape == (64, 64) and mask[32, 32] == 255 and mask[2, 2] == 0
    if mode == "mix":
        assert [sorted(item) for item in params["items"]] == [["text"], ["image"]] and params["weights"] == [0.5, 0.5]
    expect(page.locator("#job-state")).to_have_text("succeeded")
    expect(page.locator(".results img.result")).to_have_count(1)


def test_cancel_stops_a_long_job(page, served_app):
    url, _ = served_app
    page.goto(f"{url}/playground")
    fill(page, {**SMALL, "width": "256", "height": "256", "steps": "150"})  # seconds of work
    page.click("#generate")
    expect(page.locator("#job-state")).to_have_text("running")
    # Live: a preview from the event stream (every 15 of 150 steps) while the bar is part way.
    expect(page.locator("#preview")).to_be_visible()
    assert page.evaluate("document.getElementById('preview').naturalWidth") > 0
    assert 0 < page.evaluate("document.getElementById('progress').value") < 100
    expect(page.locator("#cancel")).to_be_enabled()
    page.click("#cancel")
    expect(page.locator("#job-state")).to_have_text("cancelled")
    job = httpx.get(f"{url}/v1/jobs/{page.inner_text('#job-id')}").json()
    assert job["state"] == "cancelled" and job["progress"] < 1 and job["images"] == []
    expect(page.locator(".results img")).to_have_count(0)


def test_an_oversized_size_shows_the_apis_422_message_next_to_the_field(page, served_app):
    url, _ = served_app
    page.goto(f"{url}/playground")
    fill(page, {**SMALL, "width": "4096"})
    page.click("#generate")
    answer = httpx.post(f"{url}/v1/jobs", json={"mode": "text2img", "params": {"prompt": SMALL["prompt"], "width": 4096}})
    assert answer.status_code == 422
    message = next(d["message"] for d in answer.json()["error"]["details"] if d["field"] == "params.width")
    expect(page.locator('.field[data-field="width"] .field-error')).to_have_text(message)
    expect(page.locator('.field[data-field="width"]')).to_have_class("field invalid")
    expect(page.locator("#job-panel")).to_be_hidden()


def test_with_api_keys_the_page_asks_for_one_and_sends_it_on_every_call(page, guarded_app):
    url, keys = guarded_app
    key = keys["normal"]
    calls = []
    page.on("request", lambda request: calls.append((request.url, request.headers.get("authorization"))))
    page.goto(f"{url}/playground")  # the page itself needs no key
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#key-message")).to_contain_text("Authorization: Bearer")
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-bar")).to_be_visible()
    fill(page, SMALL)
    page.click("#generate")
    expect(page.locator("#job-state")).to_have_text("succeeded")
    expect(page.locator(".results img.result")).to_have_count(1)
    assert page.evaluate("k => sessionStorage.getItem('kandinsky-serve.api-key') === k", key)
    assert key not in page.evaluate("JSON.stringify(localStorage)")
    entered = next(i for i, (address, _) in enumerate(calls) if address.endswith("/v1/models") and calls[i][1])
    api_calls = [(address, auth) for address, auth in calls[entered:] if address.startswith(url) and "/playground" not in address]
    assert any("/v1/jobs/" in address and "/events" in address for address, _ in api_calls)
    assert all(auth == f"Bearer {key}" for _, auth in api_calls), api_calls
