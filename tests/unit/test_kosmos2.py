"""Kosmos-2 model layer on the tiny checkpoint: published layout, batch = each request alone, boxes in pixels."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.kosmos2 import Kosmos2Model, Kosmos2Request
from deployments.loading import CheckpointError

GRID = 32  # location tokens per side (1024 <patch_index_NNNN> tokens)


@pytest.fixture(scope="module")
def kosmos2(tiny_kosmos2):
    return Kosmos2Model.from_pretrained(tiny_kosmos2, max_new_tokens=24)


@pytest.fixture(scope="module")
def reference(tiny_kosmos2):
    """The unmodified transformers classes, as a user would load the checkpoint."""
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration.from_pretrained(tiny_kosmos2, local_files_only=True, use_safetensors=True)
    return AutoProcessor.from_pretrained(tiny_kosmos2, local_files_only=True), model.eval()


def _requests() -> list[Kosmos2Request]:
    rng = np.random.default_rng(7)
    return [
        Kosmos2Request(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)),
        Kosmos2Request(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8), "<grounding>A photo of a red cat on the left of"),
        Kosmos2Request(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8), "a"),
    ]


def test_tiny_checkpoint_has_the_published_layout(tiny_kosmos2, reference):
    from transformers import Kosmos2Processor

    processor, model = reference
    names = {path.name for path in tiny_kosmos2.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".bin") for name in names)
    assert isinstance(processor, Kosmos2Processor)
    tokenizer = processor.tokenizer
    for token in ("<image>", "</image>", "<grounding>", "<phrase>", "</phrase>", "<object>", "</object>",
                  "</delimiter_of_multi_objects/>", "<patch_index_0000>", "<patch_index_1023>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id, token
    assert len(tokenizer) <= model.config.text_config.vocab_size
    encoding = processor(images=Image.new("RGB", (30, 20)), text="<grounding>An image of", return_tensors="pt")
    assert int(encoding["image_embeds_position_mask"].sum()) == model.config.latent_query_num


def test_batch_equals_each_request_alone(kosmos2, reference):
    processor, model = reference
    requests = _requests()
    batch = kosmos2.inputs(requests)
    assert (batch["attention_mask"] == 0).any(), "the prompts must need padding for this test to mean anything"
    sequences = kosmos2.generate(requests)
    results = kosmos2.run(requests)
    for request, ids, result in zip(requests, sequences, results):
        alone = processor(images=Image.fromarray(request.image), text=request.prompt, return_tensors="pt")
        with torch.inference_mode():
            expected = model.generate(**alone, max_new_tokens=24, do_sample=False, use_cache=True)[0].tolist()
        assert ids == expected
        caption, entities = processor.post_process_generation(processor.batch_decode([expected], skip_special_tokens=True)[0])
        height, width = request.image.shape[:2]
        assert result == {
            "text": caption,
            "entities": [{"phrase": phrase, "span": [start, end],
                          "boxes": [[x1 * width, y1 * height, x2 * width, y2 * height] for x1, y1, x2, y2 in boxes]}
                         for phrase, (start, end), boxes in entities],
        }


def test_run_is_one_generate_call(kosmos2, monkeypatch):
    calls = []
    generate = kosmos2.model.generate
    monkeypatch.setattr(kosmos2.model, "generate", lambda **kwargs: calls.append(kwargs) or generate(**kwargs))
    assert len(kosmos2.run(_requests())) == 3
    assert len(calls) == 1 and calls[0]["input_ids"].shape[0] == 3 and calls[0]["use_cache"]


def _ids(kosmos2, text: str) -> list[int]:
    return kosmos2.processor.tokenizer(text, add_special_tokens=False).input_ids


def _cell_centre(index: int) -> tuple[float, float]:
    return (index % GRID + 0.5) / GRID, (index // GRID + 0.5) / GRID


def test_boxes_are_in_input_pixels(kosmos2):
    text = ("<grounding> An image of<phrase> a cat</phrase><object><patch_index_0044><patch_index_0863></object> and"
            "<phrase> two dogs</phrase><object><patch_index_0000><patch_index_0033></delimiter_of_multi_objects/>"
            "<patch_index_0100><patch_index_0100></object>")
    result = kosmos2.parse(_ids(kosmos2, text), height=100, width=200)
    assert result["text"] == "An image of a cat and two dogs"
    cat, dogs = result["entities"]
    assert cat["phrase"] == "a cat" and result["text"][slice(*cat["span"])] == "a cat"
    (left, top), (right, bottom) = _cell_centre(44), _cell_centre(863)  # corners in different rows and columns
    assert cat["boxes"] == [pytest.approx([left * 200, top * 100, right * 200, bottom * 100])]
    assert dogs["phrase"] == "two dogs" and result["text"][slice(*dogs["span"])] == "two dogs"
    # 0 and 33 share no row or column: cell centres; 100 alone: the whole cell (row 3, column 4).
    assert dogs["boxes"] == [pytest.approx([200 * 0.5 / GRID, 100 * 0.5 / GRID, 200 * 1.5 / GRID, 100 * 1.5 / GRID]),
                             pytest.approx([200 * 4 / GRID, 100 * 3 / GRID, 200 * 5 / GRID, 100 * 4 / GRID])]


def test_boxes_follow_a_center_crop(tiny_kosmos2):
    from transformers import CLIPImageProcessor

    kosmos2 = Kosmos2Model.from_pretrained(tiny_kosmos2)
    kosmos2.processor.image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    text = "<grounding><phrase> a cat</phrase><object><patch_index_0000><patch_index_1023></object>"
    (cat,) = kosmos2.parse(_ids(kosmos2, text), height=100, width=200)["entities"]
    # A 200x100 input resized to 112x56 and cropped to its central 56x56: the model saw x in [50, 150].
    (left, top), (right, bottom) = _cell_centre(0), _cell_centre(1023)
    assert cat["boxes"] == [pytest.approx([50 + left * 100, top * 100, 50 + right * 100, bottom * 100])]


def test_pickle_weights_are_refused(tiny_kosmos2, tmp_path):
    checkpoint = tmp_path / "kosmos-2"
    shutil.copytree(tiny_kosmos2, checkpoint)
    from safetensors.torch import load_file

    torch.save(load_file(checkpoint / "model.safetensors"), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing \*\.safetensors \(only \.safetensors weights are loaded\)"):
        Kosmos2Model.from_pretrained(checkpoint)


def test_missing_files_are_named(tiny_kosmos2, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Kosmos2Model.from_pretrained(tmp_path / "nope")
    checkpoint = tmp_path / "kosmos-2"
    shutil.copytree(tiny_kosmos2, checkpoint)
    (checkpoint / "preprocessor_config.json").unlink()
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as error:
        Kosmos2Model.from_pretrained(checkpoint)
    assert str(checkpoint) in str(error.value)
    assert "preprocessor_config.json" in str(error.value) and "tokenizer.json or sentencepiece.bpe.model" in str(error.value)


def test_images_must_be_uint8_rgb(kosmos2):
    with pytest.raises(ValueError, match=r"requests\[1\]\.image"):
        kosmos2.run([_requests()[0], Kosmos2Request(np.zeros((8, 8, 3), np.float32))])


def test_make_tiny_cli_writes_kosmos2(tmp_path, capsys):
    from serve.cli import main

    assert main(["make-tiny", str(tmp_path / "out"), "--family", "kosmos2"]) == 0
    path = tmp_path / "out" / "kosmos-2-patch14-224"
    assert (path / "model.safetensors").is_file() and (path / "preprocessor_config.json").is_file()
    assert "kosmos2:" in capsys.readouterr().out
