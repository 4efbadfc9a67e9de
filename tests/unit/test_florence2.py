"""Florence-2 model layer on the tiny checkpoint: real transformers classes, batched
generation equal to one request at a time, the processor's own post-processing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from deployments.florence2 import TASKS, Florence2Model, Florence2Request
from deployments.loading import CheckpointError

MAX_NEW_TOKENS = 24  # enough for a few boxes; random weights rarely stop on their own


@pytest.fixture(scope="module")
def model(tiny_florence2):
    return Florence2Model.from_pretrained(tiny_florence2)


def _image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _requests() -> list[Florence2Request]:
    return [
        Florence2Request(_image(1, 48, 80), "<CAPTION>"),
        Florence2Request(_image(2, 120, 60), "<OD>"),
        Florence2Request(_image(3, 64, 64), "<CAPTION_TO_PHRASE_GROUNDING>", "a red cat on the left"),
    ]


def _alone(tiny_florence2, request: Florence2Request) -> tuple[list[int], dict]:
    """The model's own generate + post_process_generation for one request, as its model card does."""
    from PIL import Image
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    processor = Florence2Processor.from_pretrained(tiny_florence2, local_files_only=True)
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_florence2, local_files_only=True, use_safetensors=True)
    inputs = processor(text=request.task + (request.text or ""), images=Image.fromarray(request.image), return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                             max_new_tokens=MAX_NEW_TOKENS, num_beams=1, do_sample=False, use_cache=True)
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    height, width = request.image.shape[:2]
    return ids[0].tolist(), processor.post_process_generation(text, task=request.task, image_size=(width, height))


def test_tiny_checkpoint_loads_with_the_real_classes(tiny_florence2):
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    model = Florence2ForConditionalGeneration.from_pretrained(tiny_florence2, local_files_only=True, use_safetensors=True)
    processor = Florence2Processor.from_pretrained(tiny_florence2, local_files_only=True)
    assert processor.image_token_id == model.config.image_token_id
    tokens = processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("<loc_10><od><sep>", add_special_tokens=False).input_ids)
    assert tokens == ["<loc_10>", "<od>", "<sep>"]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
                 "tokenizer_config.json", "tokenizer.json"):
        assert (tiny_florence2 / name).is_file(), name


def test_a_batch_equals_each_request_alone(model, tiny_florence2):
    model.max_new_tokens = MAX_NEW_TOKENS
    requests = _requests()
    batched_ids = model.generate(requests)
    results = model.run(requests)
    for request, ids, result in zip(requests, batched_ids, results):
        alone_ids, alone_parsed = _alone(tiny_florence2, request)
        assert ids == alone_ids
        answer = alone_parsed[request.task]
        expected = {"task": request.task, **(answer if isinstance(answer, dict) else {"text": answer})}
        assert result == expected
    # The three answers differ, so equality above is not trivially one repeated sequence.
    assert len({tuple(ids) for ids in batched_ids}) == 3


def test_results_are_plain_json(model):
    import json

    model.max_new_tokens = MAX_NEW_TOKENS
    for result in model.run(_requests()):
        assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize("height, width", [(100, 200), (300, 50)])
def test_boxes_are_in_input_pixels(model, height, width):
    """A known answer through the processor's decoding: bins of a 0–999 grid -> this image's pixels."""
    tokenizer = model.processor.tokenizer
    request = Florence2Request(_image(4, height, width), "<OD>")
    ids = tokenizer("</s><s>cat<loc_100><loc_200><loc_500><loc_900></s>", add_special_tokens=False).input_ids
    answer = model.parse(ids, request)
    assert answer["labels"] == ["cat"]
    (box,) = answer["bboxes"]
    assert box == [int((100.5) * width / 1000), int(200.5 * height / 1000), int(500.5 * width / 1000),
                   int(900.5 * height / 1000)]
    assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height


def test_ocr_regions_are_in_input_pixels(model):
    tokenizer = model.processor.tokenizer
    request = Florence2Request(_image(5, 50, 400), "<OCR_WITH_REGION>")
    quad = "".join(f"<loc_{b}>" for b in (0, 0, 999, 0, 999, 999, 0, 999))
    ids = tokenizer(f"</s><s>sale{quad}</s>", add_special_tokens=False).input_ids
    answer = model.parse(ids, request)
    assert answer["labels"] == ["sale"]
    assert answer["quad_boxes"] == [[0, 0, 399, 0, 399, 49, 0, 49]]


def test_trailing_padding_is_cut(model):
    """A shorter answer in a batch ends at its first </s>; the padding after it is not part of it."""
    tokenizer = model.processor.tokenizer
    ids = tokenizer("</s><s>a cat</s>", add_special_tokens=False).input_ids
    pad = tokenizer.pad_token_id
    model_generate = model.model.generate
    try:
        model.model.generate = lambda **kwargs: torch.tensor([ids + [pad, pad]])
        (row,) = model.generate([Florence2Request(_image(6, 32, 32), "<CAPTION>")])
    finally:
        model.model.generate = model_generate
    assert row == ids


@pytest.mark.parametrize("task", ["<NOPE>", "<REGION_TO_SEGMENTATION>", "caption"])
def test_unknown_task_is_named(model, task):
    with pytest.raises(ValueError, match=task):
        model.run([Florence2Request(_image(7, 32, 32), task)])


def test_text_input_rules(model):
    with pytest.raises(ValueError, match="<CAPTION_TO_PHRASE_GROUNDING>"):
        model.run([Florence2Request(_image(7, 32, 32), "<CAPTION_TO_PHRASE_GROUNDING>")])
    with pytest.raises(ValueError, match="<CAPTION>"):
        model.run([Florence2Request(_image(7, 32, 32), "<CAPTION>", "extra")])
    with pytest.raises(ValueError, match="uint8"):
        model.run([Florence2Request(np.zeros((8, 8), np.float32), "<CAPTION>")])


def test_too_long_a_text_is_refused(model):
    with pytest.raises(ValueError, match="too long.*limit 256"):
        model.run([Florence2Request(_image(7, 32, 32), "<CAPTION_TO_PHRASE_GROUNDING>", "cat " * 300)])


def test_supported_tasks_all_run(model):
    model.max_new_tokens = 4
    requests = [Florence2Request(_image(8, 40, 40), task, "a cat" if "GROUNDING" in task else None) for task in sorted(TASKS)]
    assert [result["task"] for result in model.run(requests)] == sorted(TASKS)


def test_bin_only_directory_is_refused(tiny_florence2, tmp_path):
    copy = tmp_path / "florence2"
    shutil.copytree(tiny_florence2, copy)
    from safetensors.torch import load_file

    torch.save(load_file(copy / "model.safetensors"), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"\*\.safetensors \(only \.safetensors weights are loaded\)"):
        Florence2Model.from_pretrained(copy)


def test_missing_files_are_named(tiny_florence2, tmp_path):
    copy = tmp_path / "florence2"
    shutil.copytree(tiny_florence2, copy)
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json.*Florence-2-base"):
        Florence2Model.from_pretrained(copy)
    with pytest.raises(CheckpointError, match="does not exist"):
        Florence2Model.from_pretrained(tmp_path / "nowhere")
