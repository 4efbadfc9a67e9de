"""The in-process baseline of `bench compare` draws what diffusers draws (no Ray)."""

import base64

from fastapi.testclient import TestClient

from serve.tools.baselines import inprocess_app
from tests.reference import decode_png, max_diff, reference_images, spec


def test_inprocess_baseline_serves_the_reference_image(tiny_checkpoint):
    client = TestClient(inprocess_app(str(tiny_checkpoint.prior), str(tiny_checkpoint.decoder)))
    body = {"prompt": "a red circle", "width": 64, "height": 64, "prior_steps": 3, "steps": 4, "seed": 9, "unknown": 1}
    response = client.post("/v1/text2img", json=body)
    assert response.status_code == 200
    [image] = [decode_png(base64.b64decode(b)) for b in response.json()["images"]]
    [reference] = reference_images(tiny_checkpoint, spec(seeds=(9,), prior_steps=3, steps=4))
    assert max_diff(image, reference) == 0
