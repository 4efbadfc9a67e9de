"""Kosmos-2 grounded captioning (``Kosmos2ForConditionalGeneration`` + its ``AutoProcessor``).

Image + prompt -> caption with entity spans and boxes, as ``microsoft/kosmos-2-patch14-224``
generates them: greedy, with the KV cache, the image encoded once per request, several
requests in one ``generate`` call, parsed by the processor's ``post_process_generation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from ray import serve

from deployments.loading import CheckpointError, torch_dtype
from deployments.runtime import UnderstandingReplica

STAGE = "kosmos2"
DEFAULT_PROMPT = "<grounding>An image of"
MAX_NEW_TOKENS = 64
KOSMOS2_FILES = ("config.json", "*.safetensors", "preprocessor_config.json", "tokenizer_config.json",
                 "tokenizer.json|sentencepiece.bpe.model")
"""The files of ``microsoft/kosmos-2-patch14-224`` that loading needs (one folder, no subfolders)."""


@dataclass(frozen=True)
class Kosmos2Request:
    """One image, (H, W, 3) uint8, and the prompt the caption continues."""

    image: np.ndarray
    prompt: str = DEFAULT_PROMPT


def check_kosmos2_layout(path: Path | str) -> Path:
    """Raise :class:`CheckpointError` naming ``path`` and every file missing from it."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"Kosmos-2 checkpoint directory {root} does not exist")
    missing = []
    for pattern in KOSMOS2_FILES:
        if not any(any(root.glob(option)) for option in pattern.split("|")):
            hint = " (only .safetensors weights are loaded)" if pattern == "*.safetensors" and any(root.glob("*.bin")) else ""
            missing.append(pattern.replace("|", " or ") + hint)
    if missing:
        raise CheckpointError(f"Kosmos-2 checkpoint directory {root} is incomplete: missing {', '.join(missing)} "
                              "(expected the layout of microsoft/kosmos-2-patch14-224)")
    return root


def _count_positions_from_first_token(text_model: Any, pad_token_id: int) -> None:
    """Number each cached decoding step's position from its row's first real token.

    Kosmos-2 places a cached step at ``cache length + 1``, and the cache length counts a
    row's left padding, so a padded row would see shifted positions and generate other
    tokens than it does alone. The prompt pass is already pad-aware (positions count
    non-pad tokens), so only the later steps get explicit ``position_ids``; for an unpadded
    row they equal the model's own.
    """
    prepare = text_model.prepare_inputs_for_generation

    def prepare_inputs_for_generation(input_ids, *args, **kwargs):
        inputs = prepare(input_ids, *args, **kwargs)
        cache, attention_mask = inputs.get("cache"), inputs.get("attention_mask")
        cache_length = cache.get_seq_length() if cache is not None else 0
        if cache_length and attention_mask is not None:
            padding = (attention_mask == 0).sum(dim=1, keepdim=True)  # all of it on the left
            step = inputs["input_ids"]
            real = step.ne(pad_token_id).long()  # the model's own rule: a pad token sits at the pad position
            inputs["position_ids"] = (real.cumsum(dim=1) + cache_length - padding) * real + pad_token_id
        return inputs

    text_model.prepare_inputs_for_generation = prepare_inputs_for_generation


def _visible_region(image_processor: Any, height: int, width: int) -> tuple[float, float, float, float]:
    """(x0, y0, w, h): the part of an input image the model sees (all of it unless the
    processor center-crops after resizing), in the input's pixels."""
    if not getattr(image_processor, "do_center_crop", False):
        return 0.0, 0.0, float(width), float(height)
    size, crop = dict(image_processor.size), dict(image_processor.crop_size)
    if not getattr(image_processor, "do_resize", True):
        resized_h, resized_w = float(height), float(width)
    elif size.get("shortest_edge"):
        scale = size["shortest_edge"] / min(height, width)
        resized_h, resized_w = height * scale, width * scale
    else:
        resized_h, resized_w = float(size["height"]), float(size["width"])
    crop_h, crop_w = min(crop["height"], resized_h), min(crop["width"], resized_w)
    scale_y, scale_x = resized_h / height, resized_w / width
    return (resized_w - crop_w) / 2 / scale_x, (resized_h - crop_h) / 2 / scale_y, crop_w / scale_x, crop_h / scale_y


class Kosmos2Model:
    """Images and prompts -> grounded captions, batched into one ``generate`` call."""

    def __init__(self, processor: Any, model: Any, device: str = "cpu", max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        self.processor = processor
        self.model = model
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.pad_token_id = processor.tokenizer.pad_token_id
        if self.pad_token_id != model.config.text_config.pad_token_id:
            raise CheckpointError(f"Kosmos-2 tokenizer pads with id {self.pad_token_id} but the model's padding id is "
                                  f"{model.config.text_config.pad_token_id}")
        # Kosmos-2 generates after its prompt, so prompts of several lengths are padded on the left.
        processor.tokenizer.padding_side = "left"
        _count_positions_from_first_token(model.text_model, self.pad_token_id)

    @classmethod
    def from_pretrained(cls, path: Path | str, device: str = "cpu", dtype: str = "float32",
                        max_new_tokens: int = MAX_NEW_TOKENS) -> "Kosmos2Model":
        from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

        root = check_kosmos2_layout(path)
        try:
            processor = AutoProcessor.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
            model = Kosmos2ForConditionalGeneration.from_pretrained(
                str(root), local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=torch_dtype(dtype))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"could not load Kosmos-2 from {root}: {error}") from error
        model = model.to(device).eval().requires_grad_(False)
        return cls(processor, model, device, max_new_tokens)

    def inputs(self, requests: Sequence[Kosmos2Request]) -> dict[str, torch.Tensor]:
        """The processor's tensors for a batch: left-padded ids, attention and image-position masks, pixels."""
        for index, request in enumerate(requests):
            image = request.image
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
                raise ValueError(f"requests[{index}].image must be an (H, W, 3) uint8 array")
        encoding = self.processor(
            images=[Image.fromarray(request.image) for request in requests], text=[request.prompt for request in requests],
            num_image_tokens=self.model.config.latent_query_num, return_tensors="pt",
        )
        encoding["pixel_values"] = encoding["pixel_values"].to(self.model.dtype)
        return {name: tensor.to(self.device) for name, tensor in encoding.items()}

    @torch.inference_mode()
    def generate(self, requests: Sequence[Kosmos2Request], max_new_tokens: int | None = None) -> list[list[int]]:
        """Each request's token ids without padding: its prompt, then what was generated up to
        and including the end token (or the cap)."""
        inputs = self.inputs(requests)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                     do_sample=False, num_beams=1, use_cache=True)
        prompt_length = inputs["input_ids"].shape[1]
        eos = self.model.generation_config.eos_token_id
        ends = {eos} if isinstance(eos, int) else set(eos or ())
        sequences = []
        for row, padding in zip(output.tolist(), (inputs["attention_mask"] == 0).sum(dim=1).tolist()):
            new = row[prompt_length:]
            stop = next((i + 1 for i, token in enumerate(new) if token in ends), len(new))
            sequences.append(row[padding:prompt_length] + new[:stop])
        return sequences

    def parse(self, token_ids: list[int], height: int, width: int) -> dict:
        """Decoded ids -> {"text", "entities": [{"phrase", "span", "boxes"}]}, boxes as
        [x1, y1, x2, y2] in the pixels of a ``height`` x ``width`` input image."""
        caption, entities = self.processor.post_process_generation(
            self.processor.decode(token_ids, skip_special_tokens=True))
        x0, y0, visible_w, visible_h = _visible_region(self.processor.image_processor, height, width)
        return {
            "text": caption,
            "entities": [
                {"phrase": phrase, "span": [start, end],
                 "boxes": [[x0 + x1 * visible_w, y0 + y1 * visible_h, x0 + x2 * visible_w, y0 + y2 * visible_h]
                           for x1, y1, x2, y2 in boxes]}
                for phrase, (start, end), boxes in entities
            ],
        }

    def run(self, requests: Sequence[Kosmos2Request]) -> list[dict]:
        """One ``generate`` call for all requests; each result as :meth:`parse` returns it."""
        sequences = self.generate(requests)
        return [self.parse(ids, *request.image.shape[:2]) for ids, request in zip(sequences, requests)]

    def health_probe(self) -> None:
        """A one-token generation (check_health)."""
        self.generate([Kosmos2Request(np.zeros((16, 16, 3), np.uint8))], max_new_tokens=1)


def check_request(request: Kosmos2Request) -> None:
    """Raise ``ValueError`` naming what is wrong with the image or prompt."""
    image = request.image
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError("image must be an (H, W, 3) uint8 array")
    if not request.prompt.strip():
        raise ValueError("prompt must not be empty")


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
class Kosmos2(UnderstandingReplica):
    """Batches grounded-caption requests into one ``generate`` call."""

    check_request = staticmethod(check_request)

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32") -> None:
        self.setup(STAGE, device, lambda: Kosmos2Model.from_pretrained(path, device, dtype))
