"""Image understanding: Florence-2 (``Florence2ForConditionalGeneration`` + ``Florence2Processor``).

One seq2seq model answers task prompts (captions, detection, phrase grounding, OCR). A batch
of requests, any mix of tasks, is one ``generate`` call (greedy, KV cache, each image encoded
once); every answer is parsed by the processor's own ``post_process_generation``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from ray import serve

from deployments.messages import Florence2Request
from deployments.runtime import UnderstandingReplica
from deployments.loading import FLORENCE2_LAYOUT, CheckpointError, check_layout, torch_dtype

STAGE = "florence2"
PUBLISHED = "florence-community/Florence-2-base"

TASKS_WITHOUT_TEXT = frozenset({
    "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>", "<OCR>", "<OCR_WITH_REGION>",
})
TASKS_WITH_TEXT = frozenset({"<CAPTION_TO_PHRASE_GROUNDING>"})
TASKS = TASKS_WITHOUT_TEXT | TASKS_WITH_TEXT
"""The task tokens served; the grounding task also takes a text (the phrase or caption)."""

MAX_NEW_TOKENS = 256  # Florence-2's examples use 1024; captions and boxes of a few objects fit in 256


def check_florence2_layout(root: Path | str) -> Path:
    """Raise :class:`CheckpointError` naming what a Florence-2 directory lacks."""
    return check_layout(root, FLORENCE2_LAYOUT, "florence2", published=PUBLISHED)


def check_request(request: Florence2Request) -> None:
    """Raise ``ValueError`` naming the task, or the text it lacks or does not take."""
    if request.task not in TASKS:
        raise ValueError(f"unknown task {request.task!r}; supported: {', '.join(sorted(TASKS))}")
    if request.task in TASKS_WITH_TEXT and not (request.text or "").strip():
        raise ValueError(f"task {request.task} needs a text input")
    if request.task in TASKS_WITHOUT_TEXT and request.text:
        raise ValueError(f"task {request.task} takes no text input")
    image = request.image
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError("image must be an (H, W, 3) uint8 array")


class Florence2Model:
    """Task requests -> parsed answers (JSON-able dicts, boxes in the input image's pixels)."""

    def __init__(self, processor, model, device: str = "cpu", max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        self.processor = processor
        self.model = model
        self.device = device
        # Prompt and answer each stay within BART's learned positions.
        self.max_positions = model.config.text_config.max_position_embeddings
        self.max_new_tokens = min(max_new_tokens, self.max_positions - 1)

    @classmethod
    def from_pretrained(cls, path: Path | str, device: str = "cpu", dtype: str = "float32") -> "Florence2Model":
        from transformers import Florence2ForConditionalGeneration, Florence2Processor

        root = check_florence2_layout(path)
        try:
            processor = Florence2Processor.from_pretrained(str(root), local_files_only=True)
            model = Florence2ForConditionalGeneration.from_pretrained(
                str(root), local_files_only=True, use_safetensors=True, dtype=torch_dtype(dtype))
        except (OSError, ValueError, EnvironmentError) as error:
            raise CheckpointError(f"could not load Florence-2 from {root}: {error}") from error
        return cls(processor, model.to(device).eval().requires_grad_(False), device)

    def inputs(self, requests: list[Florence2Request]) -> dict[str, torch.Tensor]:
        """The processor's batch: prompts padded to the longest, images resized to the model's size."""
        prompts = [request.task + (request.text or "") for request in requests]
        images = [Image.fromarray(request.image) for request in requests]
        batch = self.processor(text=prompts, images=images, padding="longest", return_tensors="pt")
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for request, length in zip(requests, lengths):
            if length > self.max_positions:
                raise ValueError(
                    f"text of task {request.task} is too long: {length} tokens with the image's, "
                    f"limit {self.max_positions}")
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
            "pixel_values": batch["pixel_values"].to(self.device, self.model.dtype),
        }

    @torch.inference_mode()
    def generate(self, requests: list[Florence2Request]) -> list[list[int]]:
        """Generated token ids per request, from one greedy ``generate`` call, each cut after its
        first end-of-sequence token (the batch pads shorter answers)."""
        for request in requests:
            check_request(request)
        output = self.model.generate(
            **self.inputs(requests), max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False, use_cache=True)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        rows = []
        for row in output.tolist():
            end = next((i + 1 for i, token in enumerate(row[1:], 1) if token in eos_ids), len(row))
            rows.append(row[:end])
        return rows

    def parse(self, token_ids: list[int], request: Florence2Request) -> dict[str, Any]:
        """One answer through the processor's own decoding and ``post_process_generation``."""
        text = self.processor.batch_decode([token_ids], skip_special_tokens=False)[0]
        height, width = request.image.shape[:2]
        parsed = self.processor.post_process_generation(text, task=request.task, image_size=(width, height))
        return _plain(parsed[request.task])

    def run(self, requests: list[Florence2Request]) -> list[dict[str, Any]]:
        """Each request's answer: ``{"task", "text"}`` for text tasks, plus ``bboxes``/``labels``
        (or ``quad_boxes``/``labels`` for OCR with regions) in pixels."""
        if not requests:
            return []
        results = []
        for request, token_ids in zip(requests, self.generate(requests)):
            answer = self.parse(token_ids, request)
            results.append({"task": request.task, **(answer if isinstance(answer, dict) else {"text": answer})})
        return results

    def health_probe(self) -> None:
        """A tiny caption (check_health)."""
        self.run([Florence2Request(np.zeros((16, 16, 3), np.uint8), "<CAPTION>")])


def _plain(value: Any) -> Any:
    """Tensors and tuples from post-processing -> lists and Python numbers."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
class Florence2(UnderstandingReplica):
    """Batches task requests (any mix of tasks) into one ``generate`` call."""

    check_request = staticmethod(check_request)

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32") -> None:
        self.setup(STAGE, device, lambda: Florence2Model.from_pretrained(path, device, dtype))
