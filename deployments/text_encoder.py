"""Stage 1: text encoders. The prior's CLIP text encoder (tokenizer + ``CLIPTextModelWithProjection``)
and, for the Kandinsky 2.1 family, the decoder's own multilingual encoder (``MultilingualCLIP``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from ray import serve

from deployments.batching import Queued
from deployments.loading import DECODER_21_LAYOUT, PRIOR_LAYOUT, check_layout, load_pretrained, torch_dtype
from deployments.performance import ModelOptions
from deployments.messages import StageTiming, TextEmbeddings
from deployments.runtime import StageReplica

STAGE = "text_encoder"


class TextEncoderModel:
    """Prompts -> pooled embeddings, last hidden states and masks, as the prior pipeline computes them."""

    reader = "the text encoder"
    """Who reads only ``max_length`` tokens (in the truncation notes)."""

    def __init__(self, tokenizer, text_encoder, device: str = "cpu") -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.max_length = tokenizer.model_max_length

    @classmethod
    def from_pretrained(cls, prior_path: Path | str, device: str = "cpu", dtype: str = "float32",
                        options: ModelOptions = ModelOptions()) -> "TextEncoderModel":
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        root = check_layout(prior_path, PRIOR_LAYOUT, "prior", parts=("tokenizer", "text_encoder"))
        tokenizer = load_pretrained(CLIPTokenizer, root, "tokenizer")
        encoder = load_pretrained(CLIPTextModelWithProjection, root, "text_encoder", device, torch_dtype(dtype),
                                  attn_implementation=options.attention)
        return cls(tokenizer, encoder, device)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encode ``texts`` in one forward pass (rows are independent: padded to the full context)."""
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        output = self.text_encoder(tokens.input_ids.to(self.device))
        return (
            output.text_embeds.float().cpu().numpy(),
            output.last_hidden_state.float().cpu().numpy(),
            tokens.attention_mask.bool().numpy(),
        )

    def truncated(self, texts: list[str]) -> list[str]:
        """Notes for the texts longer than the encoder's window (they are cut to it)."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False).input_ids]
        return [
            f"text {text[:40]!r}{'...' if len(text) > 40 else ''} is {length} tokens; {self.reader} reads "
            f"only the first {self.max_length}"
            for text, length in zip(texts, lengths) if length > self.max_length
        ]

    def health_probe(self) -> None:
        """A tiny forward pass (check_health)."""
        self.encode([""])


class MultilingualTextEncoderModel(TextEncoderModel):
    """Kandinsky 2.1's decoder text encoder: prompts -> pooled embeddings (projected to the CLIP
    image-embedding size), last hidden states and masks, as ``KandinskyPipeline._encode_prompt``
    computes them (XLM-Roberta tokens padded to 77)."""

    reader = "the 2.1 decoder's text encoder"

    def __init__(self, tokenizer, text_encoder, device: str = "cpu") -> None:
        super().__init__(tokenizer, text_encoder, device)
        self.max_length = 77  # the 2.1 pipelines pad and truncate to 77, whatever the tokenizer allows

    @classmethod
    def from_pretrained(cls, decoder_path: Path | str, device: str = "cpu", dtype: str = "float32",
                        options: ModelOptions = ModelOptions()) -> "MultilingualTextEncoderModel":
        """``options`` is accepted for the replica's sake; MultilingualCLIP has one attention path."""
        from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP
        from transformers import XLMRobertaTokenizer

        root = check_layout(decoder_path, DECODER_21_LAYOUT, "decoder", parts=("tokenizer", "text_encoder"))
        tokenizer = load_pretrained(XLMRobertaTokenizer, root, "tokenizer")
        encoder = load_pretrained(MultilingualCLIP, root, "text_encoder", device, torch_dtype(dtype))
        return cls(tokenizer, encoder, device)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encode ``texts`` in one forward pass (rows are independent: padded to the full 77)."""
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_attention_mask=True,
            add_special_tokens=True, return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        embeds, hidden = self.text_encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask)
        return embeds.float().cpu().numpy(), hidden.float().cpu().numpy(), tokens.attention_mask.bool().numpy()


class TextEncoderReplica(StageReplica):
    """Batches prompts from many requests into one encoder forward pass."""

    stage = STAGE
    model_class: type = TextEncoderModel

    def __init__(self, checkpoint_path: str, device: str = "cpu", dtype: str = "float32",
                 options: ModelOptions = ModelOptions()) -> None:
        self.setup(self.stage, device, lambda: self.model_class.from_pretrained(checkpoint_path, device, dtype, options))

    async def encode(self, texts: list[str], request_id: str = "") -> TextEmbeddings:
        return await self.serve_call(self._run_batch(Queued(list(texts))), request_id)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_batch(self, calls: list[Queued[list[str]]]) -> list[TextEmbeddings]:
        started = time.perf_counter()
        flat = [text for call in calls for text in call.payload]
        embeds, hidden, mask = await self.thread.run(self.model.encode, flat)
        notes = await self.thread.run(lambda: [tuple(self.model.truncated(call.payload)) for call in calls])
        compute_ms = self.record_batch(calls, started)
        results, offset = [], 0
        for call, note in zip(calls, notes):
            rows = slice(offset, offset + len(call.payload))
            offset = rows.stop
            timing = StageTiming(call.queue_wait_ms(started), compute_ms, len(calls))
            results.append(TextEmbeddings(embeds[rows], hidden[rows], mask[rows], {self.stage: timing}, note))
        return results


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class TextEncoder(TextEncoderReplica):
    """The prior's CLIP text encoder (reads the prior checkpoint)."""


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.5})
class MultilingualTextEncoder(TextEncoderReplica):
    """Kandinsky 2.1's decoder text encoder (reads the 2.1 decoder checkpoint)."""

    stage = "decoder_text_encoder"
    model_class = MultilingualTextEncoderModel
