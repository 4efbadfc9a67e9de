"""Image understanding over HTTP equals the model layers run in process on the same image."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image


def test_caption_and_grounded_caption_over_http_equal_the_models_in_process(served_app, tiny_florence2, tiny_kosmos2):
    from deployments.florence2 import Florence2Model, Florence2Request
    from deployments.kosmos2 import Kosmos2Model, Kosmos2Request

    url, _ = served_app
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode()}

    caption = httpx.post(f"{url}/v1/caption", json=body, timeout=120)
    grounded = httpx.post(f"{url}/v1/grounded-caption", json=body, timeout=120)
    assert caption.status_code == 200 and grounded.status_code == 200, (caption.text, grounded.text)

    florence = Florence2Model.from_pretrained(tiny_florence2).run([Florence2Request(image, "<CAPTION>")])[0]
    kosmos = Kosmos2Model.from_pretrained(tiny_kosmos2).run([Kosmos2Request(image)])[0]
    assert caption.json()["text"] == florence["text"]
    answer = grounded.json()
    assert {"text": answer["text"], "entities": answer["entities"]} == kosmos
    # Each answer says where its time went: its stage's queue wait, compute and batch.
    for response, stage in ((caption, "florence2"), (grounded, "kosmos2")):
        (timing,) = response.json()["timings"].values()
        assert list(response.json()["timings"]) == [stage], response.json()["timings"]
        assert timing["compute_ms"] > 0 and timing["queue_ms"] >= 0 and timing["batch_size"] >= 1
        assert f"{stage}-compute;dur=" in response.headers["Server-Timing"]


def test_caption_check_over_http_equals_the_caption_and_embeddings_routes_on_the_returned_images(served_app):
    import time

    url, _ = served_app
    params = {"prompt": "a green triangle", "width": 64, "height": 64, "prior_steps": 3, "steps": 4, "seed": 5,
              "num_images": 2, "caption_check": True}
    with httpx.Client(base_url=url, timeout=120.0) as client:
        response = client.post("/v1/text2img", json=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["checks"]) == 2 and {"caption_check", "caption_check_embed"} <= set(body["timings"])
        for image, check in zip(body["images"], body["checks"]):
            caption = client.post("/v1/caption", json={"image": image}).json()["text"]
            similarity = client.post("/v1/embeddings", json={"texts": [params["prompt"]], "images": [image]}).json()
            assert check["caption"] == caption
            assert abs(check["clip_similarity"] - similarity["similarity"][0][0]) < 1e-5

        # The same request as a job: each image's check on its entry in the job's view.
        job = client.post("/v1/jobs", json={"mode": "text2img", "params": params})
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 120
        while (view := client.get(f"/v1/jobs/{job.json()['id']}").json())["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, view
            time.sleep(0.05)  # polling interval
        assert view["state"] == "succeeded", view
        assert [image["check"] for image in view["images"]] == body["checks"]
        # Without it, no checks.
        plain = client.post("/v1/text2img", json={**params, "caption_check": False}).json()
        assert plain["checks"] is None and plain["images"] == body["images"]
