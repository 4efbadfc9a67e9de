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
