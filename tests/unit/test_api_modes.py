"""Every mode's HTTP contract with a fake backend: what reaches the graph, and every bad input
refused with a 4xx naming the field before anything runs. No Ray, no models."""

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve.http.app import create_app
from serve.graph.ingress import unavailable_modes
from deployments.registry import STAGE_NAMES
from serve.settings import ApiLimits
from tests.unit.test_api import FakeBackend


def encode(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def picture(width: int = 64, height: int = 64, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)


IMAGE = encode(picture())
MASK = encode(Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)))
GOOD = {
    "img2img": {"image": IMAGE, "prompt": "a cat"},
    "inpaint": {"image": IMAGE, "mask": MASK, "prompt": "a cat"},
    "mix": {"items": [{"text": "a cat"}, {"image": IMAGE}], "weights": [0.5, 0.5]},
    "variations": {"image": IMAGE},
    "controlnet": {"hint": IMAGE, "prompt": "a cat"},
}


class ModesBackend(FakeBackend):
    async def embeddings(self, texts, images, request_id):
        self.calls.append((texts, images))
        return np.ones((len(texts), 4), np.float32), np.ones((len(images), 4), np.float32)


@pytest.fixture
def backend():
    return ModesBackend()


@pytest.fixture
def client(backend):
    return TestClient(create_app(ApiLimits(max_body_bytes=1024 * 1024, max_image_pixels=512 * 512), backend))


@pytest.mark.parametrize("mode", list(GOOD))
def test_each_mode_reaches_the_graph_with_decoded_images(client, backend, mode):
    response = client.post(f"/v1/{mode}", json={**GOOD[mode], "seed": 3, "num_images": 2})
    assert response.status_code == 200, response.text
    [(spec, _)] = backend.calls
    assert spec.mode == mode and spec.seeds == (3, 4) and (spec.width, spec.height) == ((512, 512) if mode == "mix" else (64, 64))
    if mode == "inpaint":
        assert spec.mask.shape == (64, 64) and spec.mask[32, 32] == 255 and spec.mask[0, 0] == 0
    if mode == "mix":
        assert [item.weight for item in spec.mix] == [0.5, 0.5] and spec.mix[1].image.shape == (64, 64, 3)
    else:
        assert (spec.image if mode != "controlnet" else spec.hint).dtype == np.uint8


def test_defaults_strength_scheduler_and_invert_mask(client, backend):
    client.post("/v1/inpaint", json={**GOOD["inpaint"], "invert_mask": True})
    client.post("/v1/img2img", json={**GOOD["img2img"], "scheduler": "unipc"})
    client.post("/v1/controlnet", json=GOOD["controlnet"])
    inpaint, img2img, controlnet = (call[0] for call in backend.calls)
    assert inpaint.mask[32, 32] == 0 and inpaint.mask[0, 0] == 255  # flipped
    assert img2img.strength == 0.3 and img2img.scheduler == "unipc"
    assert controlnet.strength is None and controlnet.image is None  # no image: plain ControlNet


def test_image_modes_default_to_the_input_size_rounded_to_64(client, backend):
    client.post("/v1/img2img", json={"image": encode(picture(200, 90)), "prompt": "x"})
    client.post("/v1/img2img", json={"image": encode(picture(200, 90)), "prompt": "x", "width": 128, "height": 256})
    assert [(c[0].width, c[0].height) for c in backend.calls] == [(192, 64), (128, 256)]


def test_embeddings_return_vectors_and_similarity(client):
    body = client.post("/v1/embeddings", json={"texts": ["a", "b"], "images": [IMAGE]}).json()
    assert len(body["text_embeddings"]) == 2 and np.allclose(body["similarity"], [[1.0], [1.0]])
    assert client.post("/v1/embeddings", json={"texts": ["a"]}).json()["similarity"] is None


def _bomb(pixels_side: int) -> str:
    # A 1-bit PNG compresses to almost nothing however large it claims to be.
    return encode(Image.new("1", (pixels_side, pixels_side)))


def _truncated() -> str:
    raw = base64.b64decode(IMAGE)
    return base64.b64encode(raw[: len(raw) // 2]).decode("ascii")


BAD = [
    ("img2img", {"image": _truncated()}, "image", "truncated"),
    ("img2img", {"image": encode(picture(), "GIF")}, "image", "GIF images are not accepted"),
    ("img2img", {"image": base64.b64encode(b"not an image at all").decode()}, "image", "not a PNG, JPEG or WebP"),
    ("img2img", {"image": "***"}, "image", "not valid base64"),
    ("img2img", {"image": _bomb(600)}, "image", "the limit is 262144 pixels"),
    ("inpaint", {"mask": encode(Image.new("L", (32, 64)))}, "mask", "mask is 32x64 but image is 64x64"),
    ("mix", {"weights": [1.0]}, "weights", "2 items but 1 weights"),
    ("mix", {"items": [{"text": "a", "image": IMAGE}], "weights": [1.0]}, "items.0", "exactly one of text or image"),
    ("mix", {"items": [{"text": "a"}] * 9, "weights": [0.1] * 9}, "items", "at most 8"),
    ("img2img", {"strength": 1.5}, "strength", "less than or equal to 1"),
    ("variations", {"strength": -0.1}, "strength", "greater than 0"),
    ("img2img", {"strength": 0.01}, "strength", "leaves no denoising step"),
    ("img2img", {"scheduler": "euler"}, "scheduler", "ddpm"),
    ("controlnet", {"hint": None}, "hint", ""),
    ("inpaint", {"mask_blur": 100}, "mask_blur", "less than or equal to 64"),
]


@pytest.mark.parametrize("mode, patch, field, message", BAD, ids=[f"{m}-{f}-{i}" for i, (m, _, f, _) in enumerate(BAD)])
def test_bad_input_is_refused_naming_the_field_before_any_stage(client, backend, mode, patch, field, message):
    response = client.post(f"/v1/{mode}", json={**GOOD[mode], **patch})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert any(d["field"] == field for d in error["details"]), error
    assert message in error["message"]
    assert backend.calls == []


def test_decompression_bomb_over_pillows_own_guard(backend):
    client = TestClient(create_app(ApiLimits(max_image_pixels=16384 * 16384), backend))
    response = client.post("/v1/img2img", json={"image": _bomb(14000), "prompt": "x"})
    assert response.status_code == 422 and "decompression bomb" in response.json()["error"]["message"]
    assert backend.calls == []


def test_body_over_the_byte_cap_is_413(client, backend):
    big = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (700, 700, 3), dtype=np.uint8)))
    response = client.post("/v1/img2img", json={"image": big, "prompt": "x"})
    assert response.status_code == 413 and backend.calls == []


def test_unconfigured_mode_is_404_naming_what_to_configure(backend):
    deployed = set(STAGE_NAMES) - {"InpaintDenoiser"}
    client = TestClient(create_app(ApiLimits(), backend, unavailable=unavailable_modes(deployed)))
    response = client.post("/v1/inpaint", json=GOOD["inpaint"])
    assert response.status_code == 404
    assert "args.models.inpaint_decoder_path" in response.json()["error"]["message"]
    assert client.post("/v1/controlnet", json=GOOD["controlnet"]).status_code == 200
    assert len(backend.calls) == 1


def test_defaults_obey_tight_caps(backend):
    """Found by fuzzing: a default wider than max_side would bypass the cap."""
    client = TestClient(create_app(ApiLimits(max_side=64, max_steps=8, max_prior_steps=4), backend))
    assert client.post("/v1/text2img", json={"prompt": "x"}).status_code == 200
    assert client.post("/v1/mix", json={"items": [{"text": "a"}], "weights": [1.0]}).status_code == 200
    for spec, _ in backend.calls:
        assert (spec.width, spec.height, spec.steps, spec.prior_steps) == (64, 64, 8, 4)


def test_the_pixel_caps_follow_max_side_unless_set():
    assert ApiLimits().max_image_pixels == 2048 * 2048 and ApiLimits().max_request_pixels == 2 * 2048 * 2048
    small = ApiLimits(max_side=256)
    assert small.max_image_pixels == 512 * 512 and small.max_request_pixels == 2 * 512 * 512
    assert ApiLimits(max_image_pixels=100 * 100, max_request_pixels=300 * 100).max_request_pixels == 30_000
    with pytest.raises(ValueError, match="max_request_pixels"):
        ApiLimits(max_image_pixels=200 * 200, max_request_pixels=100 * 100)


@pytest.mark.parametrize("route, body, field", [
    ("/v1/mix", lambda image: {"items": [{"image": image}] * 3, "weights": [1.0, 1.0, 1.0], "width": 64, "height": 64},
     "items.2.image"),
    ("/v1/embeddings", lambda image: {"images": [image] * 3}, "images.2"),
])
def test_a_requests_images_share_one_pixel_budget(backend, route, body, field):
    limits = ApiLimits(max_image_pixels=128 * 128, max_request_pixels=2 * 128 * 128, max_mix_items=4)
    client = TestClient(create_app(limits, backend))
    response = client.post(route, json=body(encode(picture(128, 128))))
    assert response.status_code == 422, response.text
    detail = response.json()["error"]["details"][0]
    assert detail["field"] == field and "max_request_pixels" in detail["message"]
    assert backend.calls == []
    two = body(encode(picture(128, 128)))
    if route == "/v1/mix":
        two.update(items=two["items"][:2], weights=[1.0, 1.0])
    else:
        two.update(images=two["images"][:2])
    assert client.post(route, json=two).status_code == 200, "two at the cap fit the budget"


def test_images_are_decoded_off_the_event_loop(backend, monkeypatch):
    import threading

    import serve.http.schemas as schemas

    threads = []
    real = schemas.decode_image

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(schemas, "decode_image", recording)
    client = TestClient(create_app(ApiLimits(), backend))
    response = client.post("/v1/img2img", json={"prompt": "a cat", "image": encode(picture()), "strength": 0.5,
                                                "steps": 4, "prior_steps": 2})
    assert response.status_code == 200, response.text
    assert threads and all(name.startswith("decode") for name in threads), threads


@pytest.mark.parametrize("route, body", [
    ("/v1/embeddings", lambda image: {"images": [image] * 4}),
    ("/v1/mix", lambda image: {"items": [{"image": image}] * 4, "weights": [1.0] * 4, "width": 64, "height": 64}),
])
def test_a_request_over_its_pixel_budget_by_headers_decodes_nothing(backend, monkeypatch, route, body):
    import serve.http.schemas as schemas

    decoded = []
    real = schemas.decode_image
    monkeypatch.setattr(schemas, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    limits = ApiLimits(max_image_pixels=128 * 128, max_request_pixels=2 * 128 * 128, max_mix_items=4)
    response = TestClient(create_app(limits, backend)).post(route, json=body(encode(picture(128, 128))))
    assert response.status_code == 422 and "nothing was decoded" in response.text
    assert decoded == [], "refused from the headers, before any image was decoded"


def test_input_images_are_fitted_to_the_output_size_with_the_stages_own_resize(client, backend):
    """img2img images and ControlNet hints are resized right after decoding, exactly as the
    MOVQ stage's preprocessor and the denoiser would: what the stages compute is unchanged."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    big = picture(200, 90)
    client.post("/v1/img2img", json={"image": encode(big), "prompt": "x", "width": 128, "height": 64})
    client.post("/v1/controlnet", json={"hint": encode(big), "image": encode(big), "prompt": "x", "width": 128, "height": 64})
    img2img, controlnet = (call[0] for call in backend.calls)
    assert img2img.image.shape == controlnet.image.shape == controlnet.hint.shape == (64, 128, 3)
    processor = VaeImageProcessor(vae_scale_factor=4, vae_latent_channels=4, resample="bicubic", reducing_gap=1)
    for fitted in (img2img.image, controlnet.image):
        assert torch.equal(processor.preprocess(Image.fromarray(fitted), height=64, width=128),
                           processor.preprocess(big, height=64, width=128))
    as_denoiser = np.asarray(big.resize((128, 64), resample=Image.BICUBIC))
    assert np.array_equal(controlnet.hint, as_denoiser)


def test_jpeg_draft_decodes_large_jpegs_at_a_reduced_scale_only_when_enabled(backend, monkeypatch):
    import serve.http.schemas as schemas

    photo = encode(picture(512, 512), "JPEG")
    seen: list[tuple] = []
    original = schemas.decode_image

    def spy(*args, **kwargs):
        decoded = original(*args, **kwargs)
        seen.append(decoded.shape)
        return decoded

    monkeypatch.setattr(schemas, "decode_image", spy)
    sizes = {}
    for draft in (False, True):
        client = TestClient(create_app(ApiLimits(max_body_bytes=4 * 1024 * 1024, jpeg_draft=draft), backend))
        seen.clear()
        assert client.post("/v1/img2img", json={"image": photo, "prompt": "x", "width": 128, "height": 128}).status_code == 200
        assert client.post("/v1/img2img", json={"image": photo, "prompt": "x"}).status_code == 200
        sizes[draft] = list(seen)
    assert sizes[False] == [(512, 512, 3), (512, 512, 3)]
    # 1/4 scale is the smallest still >= 128x128; without a requested size the output size is
    # the image's own, so nothing is reduced.
    assert sizes[True] == [(128, 128, 3), (512, 512, 3)]


def test_the_decode_pool_hands_freed_memory_back_once_idle():
    import asyncio
    import threading

    from serve.http.images import DecodePool, release_freed_memory

    trimmed = threading.Event()
    calls = []

    def trim():
        calls.append(threading.current_thread().name)
        trimmed.set()

    async def scenario():
        pool = DecodePool(2, trim_after_s=0.05, trim=trim)
        assert await asyncio.gather(*(pool.run(pow, 2, n) for n in range(3))) == [1, 2, 4]
        assert calls == []  # not while the burst's requests may still hold their images
        for _ in range(200):  # poll, up to about 2 s
            if trimmed.is_set():
                break
            await asyncio.sleep(0.01)
        assert len(calls) == 1 and calls[0].startswith("decode"), calls
        trimmed.clear()
        await pool.run(pow, 2, 3)
        await asyncio.get_running_loop().run_in_executor(None, trimmed.wait, 5.0)
        assert len(calls) == 2

    asyncio.run(scenario())
    release_freed_memory()  # on this platform: no error either way
